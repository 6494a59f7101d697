r"""Names every layer shares: what a name may be, the operator's name, where a path
enters an agent's view, and how fs9 prints a path or a text in a line-oriented file.

A vault name may be any bytes Linux allows (all but "/" and NUL). fs9 holds names as
str, each byte that is not UTF-8 as a surrogate escape (os.fsdecode; os.fsencode gives
the same bytes back). Printed in a line-oriented file (search answers, events, err),
a path is `shown_path`: one line of UTF-8 that reads back to the same bytes; a text
that may hold names is `one_line`.
"""
import re

# agents, definitions, topics, models, memory notes: one file name each
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
OS_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a federation member's name: one NATS token
OPERATOR = "operator"  # the person at the mount: a mailbox, a budget, never an agent

# What shown_path escapes: a backslash, C0 and C1 controls, the Unicode line and
# paragraph separators, surrogates (a surrogate escape is a byte that is not UTF-8).
# one_line escapes the same but backslashes and tabs (readable text, still one line).
_PATH_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_TEXT_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(m: re.Match) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    o = ord(c)
    if 0xdc80 <= o <= 0xdcff:  # surrogateescape's stand-in for byte o - 0xdc00
        return f"\\x{o - 0xdc00:02x}"
    return f"\\x{o:02x}" if o < 0x80 else f"\\u{o:04x}"


def shown_path(path: tuple[str, ...] | str) -> str:
    r"""How fs9 prints a path (a tuple of names, or names already joined by "/") in a
    line-oriented file: the names joined by "/", a backslash written `\\`, a newline
    `\n`, a tab `\t`, a carriage return `\r`, any other ASCII control and any byte that
    is not UTF-8 `\xHH`, a C1 control, U+2028, U+2029 `\uHHHH`; all else as it is
    (spaces, ":", any other character). One line of UTF-8, whatever the names; bash's
    $'...' reads it back to the same bytes."""
    text = path if isinstance(path, str) else "/".join(path)
    return _PATH_UNSAFE.sub(_escape, text)


def one_line(text: str) -> str:
    """text (a reason, a snippet) as one line of UTF-8: escaped as shown_path does,
    but a backslash or a tab is kept as it is."""
    return _TEXT_UNSAFE.sub(_escape, text)


def split_view(path: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """(the agent whose view path is in, the path inside it); (None, path): the
    operator's. `agents/NAME/view/P` is P as agent NAME sees it."""
    if len(path) >= 3 and path[0] == "agents" and path[2] == "view":
        return path[1], path[3:]
    return None, path


def remote_topic(name: str) -> bool:
    """TOPIC@OS: a peer's exported topic as it arrives here (kernel/federation/topics.py)."""
    topic, at, osname = name.partition("@")
    return bool(at) and bool(NAME_RE.fullmatch(topic)) and bool(OS_RE.fullmatch(osname))
