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
"""
import os

FDS_MAX = 4096  # descriptors of one process looked through at most


def nonblocking_now(pid: int, ino: int, mount: str) -> bool | None:
    """True or False: thread pid's descriptions of our inode ino (under mount) all have
    O_NONBLOCK set, or none has; None if there is none or they disagree."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    if len(fds) > FDS_MAX:
        return None
    seen: set[bool] = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target != mount and not target.startswith(mount + "/"):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
            if int(info.get("ino", "-1")) != ino:
                continue
            seen.add(bool(int(info["flags"], 8) & os.O_NONBLOCK))
        except (OSError, ValueError, KeyError):
            continue
    return seen.pop() if len(seen) == 1 else None
