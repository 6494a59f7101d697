"""Messages: a header block, a blank line, the body. Parsed and rendered here, no I/O.

Header keys follow the federation message format. The kernel stamps `id`,
`from` and `date`, and the extension keys of what it composes itself (`x-task`,
`x-status`, `x-exit` on results, `x-topic` on subscription events); a sender that
sets them is refused (EPERM), so neither `from` nor a result can be forged. Other
extension keys start with `x-` and travel untouched. A deadline is a finite time
at most MAX_DEADLINE_S ahead.

The header block is the schema of a message, checked line by line: lines end at
"\n" only; a key is ASCII letters, digits and `-`; a value is one printable line
(no control character, no Unicode line break) and a whole line is at most
MAX_LINE characters (RFC 5322's limit); the known keys' values are tokens. The
body is bytes, as the sender wrote them (at most MAX_MESSAGE with the headers).
"""
import errno
import math
import os
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime, timezone

from ...errors import Fs9Error

MAX_MESSAGE = 1 << 20  # bytes, headers and body
PRIORITIES = ("critical", "high", "normal", "low")  # delivery order
CLASSIFICATIONS = ("public", "internal", "confidential")  # ascending
STAMPED = ("id", "from", "date", "x-task", "x-status", "x-exit", "x-topic")  # kernel's only
MAX_DEADLINE_S = 366 * 86400  # a deadline further ahead is a mistake (or an attack)
# on-status-change / on-completion: where a cross-OS work_request's status updates and
# result go on the requesting OS (kernel/federation/requests.py); local mail ignores them
SETTABLE = ("to", "type", "priority", "classification", "correlation-id", "reply-to",
            "deadline", "idempotency-key", "on-status-change", "on-completion")
ORDER = ("id", "from", "to", "date", "type", "priority", "classification", "correlation-id",
         "reply-to", "deadline", "idempotency-key", "on-status-change", "on-completion")
TOKEN = re.compile(r"[A-Za-z0-9_.:@/+-]{1,200}")
KEY = re.compile(r"[a-z][a-z0-9-]{0,63}")
MAX_LINE = 998  # characters of one header line, key and value (RFC 5322)
HEADED = re.compile(rb"[A-Za-z][A-Za-z0-9-]*:")  # data starting so has a header block


@dataclass
class Message:
    to: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # every header, stamped ones too
    seq: int = 0  # the log sequence number of its send: arrival order
    # from another OS: its mail_sent also feeds federation's inbox, so a snapshot's
    # replay keeps it once acknowledged (kernel/snapshot.py)
    fed: bool = False
    # sent by an agent or the operator (Bus.send, mail/batch): its body is in its
    # mail_sent's row, never kept apart, so its acknowledgement forgets nothing (Bus.forget)
    in_row: bool = False
    # its mail/stream line, kept once a read took only part of it: every open reading it
    # in pieces shares this one copy (kernel/bus/mailstream.py)
    line: bytes | None = field(default=None, repr=False, compare=False)
    # its delivery is on the record (mail_delivered) this mount: a reread logs nothing
    # more, else rereading pending mail grew the log without bound (a remount: again)
    logged: bool = field(default=False, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.headers["id"]

    @property
    def priority(self) -> str:
        return self.headers["priority"]

    @cached_property  # (asked at every delivery; its priority and seq never change)
    def name(self) -> str:
        """Its file name in mail/: sorts by priority, then arrival."""
        return f"{PRIORITIES.index(self.priority)}-{self.priority}-{self.seq:010d}"

    @property
    def deadline(self) -> float | None:
        value = self.headers.get("deadline")
        return parse_time(value) if value else None

    def render(self) -> bytes:
        headers = self.headers
        keys = [k for k in ORDER if k in headers]
        if len(keys) < len(headers):  # (extension keys, sorted: most messages have none)
            keys += sorted(k for k in headers if k not in ORDER)
        head = "".join([f"{k}: {headers[k]}\n" for k in keys])
        return head.encode() + b"\n" + self.body


def parse(data: bytes, *, to: str, sender: str, now: float | None = None,
          label: str = "internal", limit: int = MAX_MESSAGE) -> Message:
    """Check a message written by `sender` for `to`; raise Fs9Error naming what is wrong.

    Header lines are `key: value`; a blank line ends them. A message with no
    header block at all (its first line is not a header) is all body. `label`: the
    classification of a message that states none; `limit`: its size at most (a
    cross-OS result reassembled from chunks may be larger than mail)."""
    if len(data) > limit:
        raise Fs9Error(errno.EFBIG, f"message over {limit} bytes")
    headers: dict[str, str] = {}
    head, sep, body = data.partition(b"\n\n")
    if not sep or not HEADED.match(head):
        head, body = b"", data  # no header block
    try:
        lines = head.decode().split("\n") if head else []
    except UnicodeDecodeError:
        raise Fs9Error(errno.EINVAL, "message headers are not UTF-8")
    for n, line in enumerate(lines, 1):
        key, colon, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not colon or not key:
            raise Fs9Error(errno.EINVAL, f"malformed header line {n}: {line!r} (want key: value)")
        if not KEY.fullmatch(key):
            raise Fs9Error(errno.EINVAL, f"bad header name {key[:80]!r} in line {n}: ASCII "
                                         "letters, digits and -, at most 64")
        if len(line) > MAX_LINE:
            raise Fs9Error(errno.EINVAL, f"header line {n} ({key}) is over {MAX_LINE} "
                                         "characters")
        if not value.isprintable():
            raise Fs9Error(errno.EINVAL, f"bad value for {key}: {value[:80]!r} (one line of "
                                         "printable text: no control characters)")
        if key in STAMPED:
            raise Fs9Error(errno.EPERM, f"header {key!r} is stamped by the kernel, not the sender")
        if key not in SETTABLE and not key.startswith("x-"):
            raise Fs9Error(errno.EINVAL, f"unknown header {key!r} (known: {', '.join(SETTABLE)})")
        if key in headers:
            raise Fs9Error(errno.EINVAL, f"header {key!r} given twice")
        if key in SETTABLE and not TOKEN.fullmatch(value):
            raise Fs9Error(errno.EINVAL, f"bad value for {key}: {value!r}")
        headers[key] = value
    if headers.setdefault("to", to) != to:
        raise Fs9Error(errno.EINVAL, f"to: {headers['to']} does not match this mailbox ({to})")
    headers.setdefault("type", "event")
    if headers.setdefault("priority", "normal") not in PRIORITIES:
        raise Fs9Error(errno.EINVAL, f"bad priority {headers['priority']!r}: "
                                     f"one of {', '.join(PRIORITIES)}")
    if headers.setdefault("classification", label) not in CLASSIFICATIONS:
        raise Fs9Error(errno.EINVAL, f"bad classification {headers['classification']!r}: "
                                     f"one of {', '.join(CLASSIFICATIONS)}")
    now = time.time() if now is None else now
    if "deadline" in headers:
        deadline = parse_time(headers["deadline"], now)
        if deadline is None or not now - MAX_DEADLINE_S <= deadline <= now + MAX_DEADLINE_S:
            raise Fs9Error(errno.EINVAL, f"bad deadline {headers['deadline']!r}: an ISO 8601 "
                                         "time or +SECONDS, within a year of now")
        headers["deadline"] = format_time(deadline)
    headers["from"] = sender
    headers["date"] = format_time(now)
    return Message(to=to, body=body, headers=headers)


def new_id() -> str:
    """A message's id: 16 hex digits from the OS's random source, drawn ID_DRAW at a time
    (a getrandom call a message was a noticeable part of a send)."""
    try:
        return _ids.pop()
    except IndexError:
        raw = os.urandom(8 * ID_DRAW)
        _ids.extend(raw[i:i + 8].hex() for i in range(0, len(raw), 8))
        return _ids.pop()


ID_DRAW = 512
_ids: list[str] = []  # drawn, not yet given (list.pop: one step, whatever thread asks)


def parse_time(value: str, now: float | None = None) -> float | None:
    """`+SECONDS` (from now) or an ISO 8601 time (UTC unless it says) as epoch seconds;
    None if it is neither, or not a finite number (+inf, +nan)."""
    try:
        if value.startswith("+"):
            seconds = float(value[1:])
            if not math.isfinite(seconds):
                return None
            return (time.time() if now is None else now) + seconds
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    except (ValueError, OverflowError):
        return None


def format_time(ts: float) -> str:
    """ts as ISO 8601 in UTC, to the millisecond (`2026-12-07T21:45:21.123Z`). The part
    up to the second is kept for the next call (the messages of a second share it)."""
    global _second
    second = math.floor(ts)
    us = round((ts - second) * 1e6)  # (as datetime rounds a timestamp)
    if us >= 1_000_000:
        second, us = second + 1, us - 1_000_000
    ms = us // 1000
    known = _second  # (one read: another thread may replace it meanwhile)
    if known[0] != second:
        known = _second = (second, datetime.fromtimestamp(second, timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S"))
    return f"{known[1]}.{ms:03d}Z"


_second: tuple = (None, "")  # format_time's last second and its text


def clearance_allows(clearance: str, classification: str) -> bool:
    return CLASSIFICATIONS.index(classification) <= CLASSIFICATIONS.index(clearance)


def load(data: bytes, seq: int) -> Message:
    """A message as the kernel stored it (already checked and stamped)."""
    head, _, body = data.partition(b"\n\n")
    headers = dict(line.split(": ", 1) for line in head.decode().split("\n"))
    return Message(to=headers["to"], body=body, headers=headers, seq=seq)
