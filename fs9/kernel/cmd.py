"""Ctl verbs as tables, after lib9p's Cmdtab/lookupcmd.

Each object that takes ctl writes declares a tuple of Cmd; `parse` checks a
whole write (every line) before anything is applied, so a bad line in the
middle of a write changes nothing. Errors quote the offending command.

A ctl write is text: lines end at "\n" (a "\r" before it is dropped), and a line
holds no other control character (tabs aside): Python's str.splitlines would end
lines at \x1c, \x85 or U+2028 too, so `stop\x1cstart` would be two commands.
What each argument means is checked by its verb before any line applies.
"""
import errno
import re
import shlex
from dataclasses import dataclass

from ..errors import BAD_NARG, UNKNOWN_VERB, Fs9Error

CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")  # (tab is text)


@dataclass(frozen=True)
class Cmd:
    verb: str
    method: str  # name of the method on the target that carries the verb out
    min_args: int = 0
    max_args: int | None = 0  # None: unbounded
    rest: bool = False  # the argument is the rest of the line, verbatim ("run TEXT")
    usage: str = ""


@dataclass(frozen=True)
class Parsed:
    cmd: Cmd
    args: list[str]
    line: str


def parse(table: tuple[Cmd, ...], data: bytes) -> list[Parsed]:
    """Parse a ctl write into commands, or raise Fs9Error for the first bad line."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise Fs9Error(errno.EINVAL, "ctl write is not UTF-8 text")
    lines = (line.strip(" \t\r") for line in text.split("\n"))
    parsed = [_parse_line(table, line) for line in lines if line and not line.startswith("#")]
    if not parsed:
        raise Fs9Error(errno.EINVAL, "empty ctl write")
    return parsed


_by_verb: dict[int, tuple[tuple, dict]] = {}  # id(table) -> (table, its verbs)


def _verbs(table: tuple[Cmd, ...]) -> dict[str, Cmd]:
    """A table by verb (tables are modules' constants: a handful; keyed by identity, as
    hashing a table hashes every Cmd in it)."""
    known = _by_verb.get(id(table))
    if known is None or known[0] is not table:
        known = _by_verb[id(table)] = (table, {c.verb: c for c in table})
    return known[1]


def _parse_line(table: tuple[Cmd, ...], line: str) -> Parsed:
    bad = CONTROL.search(line)
    if bad:
        raise Fs9Error(errno.EINVAL, f"control character U+{ord(bad.group()):04X} in "
                                     f"{line[:200]!r}")
    verb, _, rest = line.partition(" ")
    cmd = _verbs(table).get(verb)
    if cmd is None:
        verbs = ", ".join(c.verb for c in table)
        raise Fs9Error(errno.EINVAL, f"{UNKNOWN_VERB} {line!r} (verbs: {verbs})")
    if cmd.rest:
        rest = rest.strip()
        args = [rest] if rest else []
    else:
        try:
            args = shlex.split(rest)
        except ValueError as e:
            raise Fs9Error(errno.EINVAL, f"cannot parse {line!r}: {e}")
    if len(args) < cmd.min_args or (cmd.max_args is not None and len(args) > cmd.max_args):
        raise Fs9Error(errno.EINVAL, f"{BAD_NARG} {line!r}: usage: {cmd.usage}")
    return Parsed(cmd, args, line)
