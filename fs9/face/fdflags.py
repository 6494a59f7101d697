"""Whether a reader's descriptor is non-blocking now, not only at open.

A program may set O_NONBLOCK after open (`fcntl(F_SETFL)`, FIONBIO: Node.js and Go's
poller do) or clear it. The kernel sends the descriptor's flags with each read, but
pyfuse3 3.5's read handler does not pass them on. So at a stream read that would wait
(or answer EAGAIN), fs9 looks at the opener's open descriptions of this file in /proc:
the flags of a description are shared by every process that holds it, and /proc shows
them (`fdinfo`) without asking the file system anything. A description is known as ours
by its link (a path under the mount point) and its inode number (fdinfo's `ino`).
Nothing is found (the opener exited and a child reads, several descriptions of the file
disagree, too many to look through): the flag as it was at open stands.

This runs on fs9's loop, at a read the caller chooses to make, so its cost is bounded:
the descriptors found last for a handle are looked at first (one or two, as a rule);
a walk of all the opener's descriptors is paid from a budget of its readers'
(SCAN_RATE descriptors a second), and more than MATCHES_MAX descriptions of one file in
a process are too many. A program holding thousands of descriptors, or of dups of the
file, and reading in a loop, once took the loop 150 ms a read (tests/test_nonblock.py).
"""
import os
import time

from ..kernel.latest import Latest

FDS_MAX = 4096  # descriptors of one process looked through at most
MATCHES_MAX = 4  # descriptions of the file in one process; more: the flag at open
SCAN_RATE = 2000  # descriptors an opener's readers may have walked, a second (and burst)
OPENERS_KEPT = 4096  # openers whose budget is remembered (a new one starts full)


class Budget:
    """Descriptors an opener may walk: a walk starts only out of debt, and its cost
    (known once /proc has listed them) is paid after, so the rate holds on average."""

    def __init__(self, now: float) -> None:
        self.level, self.when = float(SCAN_RATE), now

    def open(self, now: float) -> bool:
        self.level = min(float(SCAN_RATE), self.level + (now - self.when) * SCAN_RATE)
        self.when = now
        return self.level > 0

    def pay(self, n: int) -> None:
        self.level -= n


class FdFlags:
    """The lookups of one mount: each opener's budget (handles remember their fds)."""

    def __init__(self, mount: str) -> None:
        self.mount = mount
        self._budgets: Latest = Latest(OPENERS_KEPT)

    def nonblocking_now(self, handle) -> bool | None:
        """True or False: the opener's descriptions of handle's file all have
        O_NONBLOCK set, or none has; None if there is none, they disagree, or looking
        would cost more than the opener's budget has left."""
        pid, ino = handle.pid, handle.ino
        if handle.fds:
            flags = [self._flag(pid, fd, ino) for fd in handle.fds]
            if None not in flags:
                return _agreed(flags)
        handle.fds = ()
        budget = self._budgets.get(handle.opener)
        now = time.monotonic()
        if budget is None:
            budget = self._budgets[handle.opener] = Budget(now)
        if not budget.open(now):
            return None
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return None
        budget.pay(len(fds))
        if len(fds) > FDS_MAX:
            return None
        found, flags = [], []
        for fd in fds:
            flag = self._flag(pid, fd, ino)
            if flag is None:
                continue
            if len(found) == MATCHES_MAX:
                return None
            found.append(fd)
            flags.append(flag)
        handle.fds = tuple(found)
        return _agreed(flags)

    def _flag(self, pid: int, fd: str, ino: int) -> bool | None:
        """Descriptor fd of pid: its O_NONBLOCK, if it is of our inode ino; else None."""
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target != self.mount and not target.startswith(self.mount + "/"):
                return None
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
            if int(info.get("ino", "-1")) != ino:
                return None
            return bool(int(info["flags"], 8) & os.O_NONBLOCK)
        except (OSError, ValueError, KeyError):
            return None


def _agreed(flags: list[bool]) -> bool | None:
    return flags[0] if flags and len(set(flags)) == 1 else None
