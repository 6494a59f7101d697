"""When the log's commits reach the disk: the durability setting and group commit.

The log commits each event into SQLite's WAL in WAL mode with synchronous=NORMAL: a
write(2) into the page cache, so it survives a crash of this process (kill -9) but
not a power cut. What happens next is the `durability` setting:

- "process" (the default): every SYNC_EVERY_S the WAL is fsynced (SQLite also syncs
  it before each checkpoint). A power cut can take what was acknowledged since the
  last sync; the next mount says so (an `unclean_stop` event, with the last seq known
  synced).
- "power": a write is acknowledged only once its event is on disk. That is what
  synchronous=FULL gives, but FULL fsyncs inside each commit, on the one trio thread
  that serves every request (~5 ms each here). Here the WAL is fsynced by a worker
  thread instead, and every writer that committed before an fsync began shares it
  (group commit): concurrent writers pay one fsync per round, not one each, and
  commits go on while it runs. One fsync of the WAL covers every frame written to it
  before it began, and SQLite syncs the WAL header itself when it restarts the WAL.

After each sync (at most every MARK_EVERY_S) the seq it covered is written to
STATE/synced and fdatasynced: a log that later ends before that seq lost a tail that
had reached the disk (a torn or damaged WAL), and is refused (state.py).

A failed fsync (EIO, ENOSPC) may have dropped the pages it was given (Linux clears
the error once reported), so no later sync can vouch for them: the log is faulted,
every waiting and later write is refused with that errno, and it stays so until the
next mount (which reads what truly reached the disk).
"""
import errno
import logging
import os
import sqlite3
import time
from dataclasses import dataclass

import trio

from ..errors import Fs9Error
from .stream import Changes

log = logging.getLogger("fs9")

DURABILITY = ("process", "power")
SYNC_EVERY_S = 1.0  # at "process": the most a power cut can take
MARK_EVERY_S = 1.0  # how often STATE/synced is rewritten (an fdatasync of its own)
MARK = "synced"


def read_mark(state_dir: str) -> int:
    """The last seq known to have reached the disk (0 if none recorded)."""
    try:
        with open(os.path.join(state_dir, MARK)) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def write_mark(state_dir: str, seq: int) -> None:
    """Record seq as synced (a new file: fsynced, its name too)."""
    with open(os.path.join(state_dir, MARK), "w") as f:
        f.write(f"{seq}\n")
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Syncer:
    """Brings committed events to the disk and says how far that went (`synced`)."""

    def __init__(self, state_dir: str, db_path: str, durability: str, last_seq: int) -> None:
        if durability not in DURABILITY:
            raise ValueError(f"durability is one of {', '.join(DURABILITY)}, not {durability!r}")
        self.state_dir, self.wal = state_dir, db_path + "-wal"
        self.db_path = db_path
        self.durability = durability
        self.wal_fd = -1
        self.fault: Fs9Error | None = None  # set once a sync failed: nothing more is vouched
        self._sync_file(db_path)  # what the last server left in the page cache, and
        self._sync_wal()          # the WAL and its name: all of it is on disk from here
        self.synced = last_seq
        self.changes = Changes()  # bumps when `synced` moves or a fault is found
        self._mark_fd = os.open(os.path.join(state_dir, MARK),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self._marked_at, self._marked = 0.0, 0
        self._mark(last_seq)
        self._sync_dir()

    def close(self) -> None:
        for fd in (self.wal_fd, self._mark_fd):
            if fd >= 0:
                os.close(fd)
        self.wal_fd = self._mark_fd = -1

    # --- blocking parts (a worker thread, or the opening) ---------------------------

    def _sync_file(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_dir(self) -> None:
        fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_wal(self) -> None:
        """fsync the WAL; the first time (or if SQLite made a new one), its name too."""
        if self.wal_fd >= 0 and os.fstat(self.wal_fd).st_ino != _ino(self.wal):
            os.close(self.wal_fd)
            self.wal_fd = -1
        if self.wal_fd < 0:
            if not os.path.exists(self.wal):
                return  # no WAL yet: nothing committed outside the database file
            self.wal_fd = os.open(self.wal, os.O_RDONLY | os.O_CLOEXEC)
            self._sync_dir()
        os.fsync(self.wal_fd)

    def _mark(self, seq: int) -> None:
        os.pwrite(self._mark_fd, f"{seq}\n".encode().ljust(24), 0)
        os.fdatasync(self._mark_fd)
        self._marked_at, self._marked = time.monotonic(), seq

    def sync(self, seq: int) -> None:
        """Blocking: make every event up to seq durable (and maybe mark it)."""
        self._sync_wal()
        if time.monotonic() - self._marked_at >= MARK_EVERY_S:
            self._mark(seq)

    # --- the trio side -----------------------------------------------------------------

    async def keep_synced(self, events) -> None:
        """Sync rounds, for as long as the log is open. `events` is the EventLog: at
        "power" a round starts as soon as events wait unsynced, at "process" every
        SYNC_EVERY_S. Ends at the first failed sync (the log is faulted)."""
        while self.fault is None:
            if self.durability == "power":
                with trio.move_on_after(MARK_EVERY_S):
                    while events.last_seq == self.synced:
                        await events.changes.wait_past(events.changes.version)
            else:
                await trio.sleep(SYNC_EVERY_S)
            target = events.last_seq  # every commit up to here has been written
            if target == self.synced:
                if self._marked < self.synced:  # a quiet log: the mark catches up
                    await self._off_thread(self._mark, self.synced, "marking the synced seq")
                continue
            if await self._off_thread(self.sync, target, "syncing the event log to disk"):
                self.synced = target
                self.changes.bump()

    async def _off_thread(self, fn, seq: int, doing: str) -> bool:
        """fn(seq) in a worker thread; False (the log faulted) if it failed."""
        try:
            await trio.to_thread.run_sync(fn, seq)
            return True
        except OSError as e:
            self.failed(e, doing)
            return False

    def failed(self, e: OSError, doing: str) -> None:
        """The log can no longer vouch for writes: refuse them from now on."""
        code = e.errno if e.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO
        self.fault = Fs9Error(code, f"the event log is unusable until fs9 is mounted again: "
                                    f"{doing} failed ({e.strerror or e}); nothing after seq "
                                    f"{self.synced} is known to be on disk")
        log.error("%s", self.fault.text)
        self.changes.bump()

    async def wait_synced(self, seq: int) -> None:
        """Block until event seq is on disk (at "power"; at once at "process");
        Fs9Error if the log faulted before it got there."""
        if self.durability != "power":
            return
        while self.synced < seq:
            if self.fault is not None:
                raise self.fault
            await self.changes.wait_past(self.changes.version)


def _ino(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return -1


def last_stop(previous: dict) -> list[tuple[str, dict]]:
    """The events to log at mount about how the last server ended (previous: what it
    left in STATE/lock): `log_fault` if its log faulted, `unclean_stop` if it never
    unmounted (with what its durability says a power cut could have taken)."""
    said = []
    if previous.get("fault"):
        said.append(("log_fault", dict(pid=previous["pid"], reason=previous["fault"])))
    unclean = _unclean_stop(previous)
    if unclean is not None:
        said.append(("unclean_stop", unclean))
    return said


def _unclean_stop(previous: dict) -> dict | None:
    if "pid" not in previous or "stopped" in previous:
        return None
    was, synced = previous.get("durability", "process"), previous.get("synced", 0)
    if was == "power":
        said = "every write it acknowledged had reached the disk (durability=power)"
    else:
        said = (f"if the machine lost power, writes it acknowledged after event {synced} "
                f"(the last known on disk) were lost (durability=process); a crash of "
                f"fs9 alone loses none")
    return dict(pid=previous["pid"], mountpoint=previous.get("mount", ""), durability=was,
                synced=synced, reason=f"fs9 pid {previous['pid']} stopped without "
                                      f"unmounting: {said}")


# --- a write the disk refused ----------------------------------------------------------

SQLITE_IOERR, SQLITE_FULL = 10, 13  # primary result codes (the low byte of extended ones)


@dataclass
class Trouble:
    """Writes to the log fail now (a full disk, an I/O error): since when, how many."""
    error: Fs9Error
    since: float
    refused: int = 0


def write_error(e: sqlite3.Error, state_dir: str) -> Fs9Error:
    """What a writer is told when SQLite could not commit its event: nothing was logged."""
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF
    if code == SQLITE_FULL:
        return Fs9Error(errno.ENOSPC, f"the file system of the state {state_dir} is full: the "
                                      f"event log cannot grow, so this write was not logged "
                                      f"(reads go on; writes resume once there is space)")
    return Fs9Error(errno.EIO, f"the event log could not be written ({e}): this write was "
                               f"not logged (the log is left as it was for the next mount)")
