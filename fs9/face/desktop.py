"""The mount as desktop programs meet it: streams they read as snapshots, and ctl state
they save back.

A stream (`out`, `events`, `mail/next`...) blocks like a pipe until its end: that is
fs9's interface for `cat`, `tail -f` and read(2). But a desktop program opens a file by a
double-click and reads it to its end before it shows a window, so a stream froze it until
the task ended, or forever (`events`). A program built on a desktop toolkit (GIO: GNOME,
Xfce, `gio`; Qt: KDE) that the operator runs gets a stream as a snapshot instead: what
is there now, then the end. Every other program streams. The toolkit is recognised by
the libraries the opening process has mapped (its /proc/PID/maps), read at its first open
of a stream and remembered for that process (by pid and start time, so a reused pid is
read afresh): a long-lived program's map list takes ~0.4 ms to read, a mail receiver's
every `mail/next`.
Agents always stream: a view's opens are never snapshots (what an agent links cannot
change what it is shown anyway; only when its read ends).

An editor's save writes back what it read, from the start of the file: for a ctl, the
state line reading it shows (`echoes_state`), which is no command. Such a write is
accepted and changes nothing. (A write past the start is a command: kinds.CtlHandle.)
"""
import collections
import os
import re

# the toolkits whose programs open files for people (file managers, editors, viewers)
TOOLKITS = (b"/libgio-2.0.so", b"/libQt5Core.so", b"/libQt6Core.so")
MAPS_MAX = 4 << 20  # bytes of a process's map list read at most
KNOWN_MAX = 1024  # processes remembered (the least recently seen forgotten first)
_known: collections.OrderedDict[tuple[int, bytes], bool] = collections.OrderedDict()


def is_desktop_program(pid: int) -> bool:
    """Thread pid's process maps a desktop toolkit (False if it is gone)."""
    try:
        # read at every open of a stream by the operator (a receiver's every mail/next):
        # a bare descriptor, as Python's file object doubles the cost (~55 -> ~28 us)
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            # field 22, start time, after the name in parentheses (which may hold anything)
            key = pid, os.read(fd, 4096).rsplit(b")", 1)[1].split()[19]
        finally:
            os.close(fd)
    except (OSError, IndexError):
        return False
    known = _known.get(key)
    if known is not None:
        _known.move_to_end(key)
        return known
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            maps = f.read(MAPS_MAX)
    except OSError:
        return False
    _known[key] = found = any(lib in maps for lib in TOOLKITS)
    if len(_known) > KNOWN_MAX:
        _known.popitem(last=False)
    return found


KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*=")
NUMBER = re.compile(r"[0-9.]+|-")


def _shape(text: str) -> tuple:
    """A state text's form, whatever its values: per line, "=" (a KEY=VALUE line) or its
    first word and what each other word is (a number or `-`: "#"; else "w")."""
    shape = []
    for line in text.split("\n"):
        words = line.split()
        if words:
            shape.append("=" if KEY.match(words[0]) else (words[0], *(
                "#" if NUMBER.fullmatch(w) else "w" for w in words[1:])))
    return tuple(shape)


def echoes_state(data: bytes, state: str) -> bool:
    """data is a ctl's state text as reading it shows (now or earlier: its values, and
    which KEY=VALUE lines it has, may have changed since), saved back by an editor: no
    command. A verb is a word without "=", so no KEY=VALUE line is a command; a state
    line of words (an agent's ctl: `NAME STATE PID ...`) is its form exactly."""
    try:
        written, shown = _shape(data.decode()), _shape(state)
    except UnicodeDecodeError:
        return False
    if not written:
        return False
    if all(line == "=" for line in shown):
        return all(line == "=" for line in written)
    return written == shown
