"""The state directory's owner: one server per state, for the server's whole life.

Two servers appending to one log break it for both (each numbers events from its own
idea of the last one), so the log is opened only by the holder of an exclusive flock
on STATE/lock. flock belongs to the open file, and the kernel drops it when the last
descriptor closes, which a `kill -9` or a power cut does too: a dead server never
leaves a stale lock behind. The descriptor is close-on-exec, so no agent program
inherits (and outlives the server holding) it. The file's text names the holder (pid,
mount point), written after the lock is taken, so a refused mount can say who has it.
"""
import fcntl
import json
import os
import time

LOCK = "lock"


class StateError(Exception):
    """The state directory cannot be served, said in one line (the mount's answer)."""


class StateLock:
    """The exclusive claim on a state directory; release() or the process's end drops it."""

    def __init__(self, state_dir: str, mount: str = "") -> None:
        """Take the lock now, or raise StateError naming its holder. Does not block."""
        self.path = os.path.join(state_dir, LOCK)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe(read_holder(self.fd))
            os.close(self.fd)
            raise StateError(f"state {state_dir} is in use by {holder}: one server per "
                             f"state (fs9 umount its mount point first)") from None
        self.holder = {"pid": os.getpid(), "mount": mount, "since": round(time.time(), 3)}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(self.holder) + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the flock goes with the last descriptor
            self.fd = -1


def read_holder(fd: int) -> dict:
    """What the lock file says about its holder ({} if nothing readable yet)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if "pid" not in holder:  # it has the lock but has not written its name yet
        return "another fs9 server (starting)"
    where = f" serving {holder['mount']}" if holder.get("mount") else ""
    return f"fs9 pid {holder['pid']}{where}"
