"""The state directory's owner: one server per state, for the server's whole life.

Two servers appending to one log break it for both (each numbers events from its own
idea of the last one), so the log is opened only by the holder of an exclusive flock
on STATE/lock. flock belongs to the open file, and the kernel drops it when the last
descriptor closes, which a `kill -9` or a power cut does too: a dead server never
leaves a stale lock behind. The descriptor is close-on-exec, so no agent program
inherits (and outlives the server holding) it. The file's text names the holder (pid,
mount point), written after the lock is taken, so a refused mount can say who has it.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import time

from ..errors import StateError
from . import sync

LOCK = "lock"


class StateLock:
    """The exclusive claim on a state directory; release() or the process's end drops it."""

    def __init__(self, state_dir: str, mount: str = "", **about) -> None:
        """Take the lock now, or raise StateError naming its holder. Does not block.
        `previous`: what the last holder wrote (with `stopped` if it let go cleanly)."""
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
        self.previous = read_holder(self.fd)
        self.holder = {"pid": os.getpid(), "mount": mount, "since": round(time.time(), 3),
                       **about}
        self._write(self.holder)
        os.fsync(self.fd)  # so a power cut cannot pass this server off as a clean stop

    def _write(self, holder: dict) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self, stopped: int | None = None, **about) -> None:
        """Let go; stopped: the last seq of a clean stop, for the next holder to read
        (with `about` it, e.g. a fault)."""
        if self.fd >= 0:
            if stopped is not None:
                self._write({**self.holder, "stopped": stopped, **about})
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


# --- the log file: refused unless it is whole, fs9's, and of a version we read -----------

LOG = "log.sqlite"
APP_ID = 0x66733921  # "fs9!" in the SQLite header (PRAGMA application_id): an fs9 log
VERSION = 1  # PRAGMA user_version of the layout this fs9 writes


def _unversioned_to_1(db) -> None:
    """Logs written before versions (user_version 0, no application id) have the layout
    of version 1 already: they only get the marks."""


MIGRATIONS = {0: _unversioned_to_1}  # from version N to N+1, run in order at open


def fingerprint(path: str) -> dict | None:
    """What identifies the log file as a clean stop left it (None: a WAL is left, so
    its state is not the file's alone). Kept in the lock file at a clean stop."""
    if os.path.lexists(path + "-wal"):
        return None
    st = os.stat(path, follow_symlinks=False)
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def open_log(state_dir: str, schema: str, left: dict | None = None) -> sqlite3.Connection:
    """The state's log, checked, migrated to VERSION and ready to append to; StateError,
    with the files left exactly as they were, if it is damaged, foreign or newer.
    left: the fingerprint a clean stop recorded; a file that still matches it (nothing
    has written, moved or changed it since fs9 closed it whole) skips SQLite's
    quick_check and the count of events, which read the whole file: 5 s of a
    million-event mount, more than all the rest of it."""
    path = os.path.join(state_dir, LOG)
    if os.path.lexists(path):
        same = left is not None and left == fingerprint(path)
        problems = verify(path, quick=True, owned=True, whole=not same)
        if problems:
            raise StateError(f"{path}: {problems[0]}; the files are left as they are "
                             f"(fs9 check {state_dir}; restore a backup or move it aside)")
    elif any(os.path.lexists(path + tail) for tail in ("-wal", "-journal")):
        raise StateError(f"{path} is missing but its {'WAL' if os.path.lexists(path + '-wal') else 'journal'}"
                         f" is there: the log was moved or deleted; refusing to start empty")
    else:
        _create(path, schema)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for step in range(version, VERSION):
        db.execute("BEGIN IMMEDIATE")
        MIGRATIONS[step](db)
        db.execute(f"PRAGMA user_version={step + 1}")
        db.execute(f"PRAGMA application_id={APP_ID}")
        db.execute("COMMIT")
    return db


def _create(path: str, schema: str) -> None:
    """A new, empty log, made whole under another name and renamed into place: a
    log.sqlite that exists was always fs9's and complete, so an empty or truncated one
    is damage, never a log that was being born."""
    tmp = path + ".new"
    for leftover in (tmp, tmp + "-journal"):
        if os.path.lexists(leftover):
            os.unlink(leftover)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        # Small pages: every commit appends whole pages to the WAL, and most events are
        # far smaller than the default 4 KiB (fixed when the file is made).
        db.execute("PRAGMA page_size=1024")
        db.executescript(schema)
        db.execute(f"PRAGMA user_version={VERSION}")
        db.execute(f"PRAGMA application_id={APP_ID}")
    finally:
        db.close()
    _install(tmp, path)


def sync_dir(path: str) -> None:
    """fsync a directory: the names made or renamed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: str, quick: bool = False, owned: bool = False,
           whole: bool = True) -> list[str]:
    """What is wrong with the log at path, in sentences ([] if nothing). Read-only: a
    read-only connection neither checkpoints nor deletes the WAL when it closes, so what
    is checked stays as it was. quick: SQLite's quick_check, else its integrity_check
    (also indexes against their tables, slower). owned: the caller holds the state's
    lock, so the empty WAL and index SQLite makes beside a WAL-mode file it reads can
    go again (no server can have made them meanwhile). whole False: neither SQLite's
    check nor the count of events, which read every page (open_log says when)."""
    if os.path.getsize(path) == 0:
        return ["the log is empty (truncated?): fs9 never leaves an empty log.sqlite"]
    made = [] if not owned or os.path.lexists(path + "-wal") else [path + "-wal", path + "-shm"]
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        app, version = (db.execute(f"PRAGMA {p}").fetchone()[0]
                        for p in ("application_id", "user_version"))
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app not in (0, APP_ID) or (app == 0 and (version != 0 or "events" not in tables)):
            return ["this is not an fs9 log (another program's SQLite database)"]
        if version > VERSION:
            return [f"the log was written by a newer fs9 (schema version {version}; this "
                    f"fs9 reads up to {VERSION})"]
        problems = []
        if whole:  # (not: the file is as fs9's clean stop left it, open_log)
            rows = db.execute("PRAGMA quick_check" if quick else "PRAGMA integrity_check").fetchall()
            if [r[0] for r in rows] != ["ok"]:
                return [f"SQLite finds the file damaged: {r[0]}" for r in rows[:10]]
            problems = _sequence(db)
        high = db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        mark = sync.read_mark(os.path.dirname(path))
        if high < mark:
            problems.append(f"the log ends at event {high} but event {mark} had reached the "
                            f"disk (STATE/{sync.MARK}): its tail was lost (a torn or damaged WAL)")
        return problems
    except sqlite3.DatabaseError as e:
        return [f"the file is damaged or not a database (SQLite: {e})"]
    finally:
        db.close()
        for extra in made:
            if os.path.lexists(extra) and (extra.endswith("-shm") or not os.path.getsize(extra)):
                os.unlink(extra)


def _sequence(db) -> list[str]:
    """Events are numbered 1, 2, 3... and only retention deletes any: a gap no
    `events_retired` record accounts for is a lost event (event_retention.gaps)."""
    low, high, count = db.execute("SELECT min(seq), max(seq), count(*) FROM events").fetchone()
    if count and (low != 1 or high != count):
        from .event_retention import gaps  # (it imports this module)
        return gaps(db, low, high, count)
    return []



# --- check and backup (fs9 check, fs9 backup): safe while a server runs -------------------

CONFIG = ("models.toml", "search.toml")  # the operator's settings kept beside the log


def check(state_dir: str) -> tuple[list[str], str]:
    """(problems, summary) of a state directory; a full integrity_check. Read-only."""
    path = os.path.join(state_dir, LOG)
    if not os.path.lexists(path):
        return [f"{path} does not exist"], ""
    with _unless_served(state_dir) as owned:
        problems = verify(path, owned=owned)
    if problems:
        return problems, ""
    from .log import set_aside  # (log.py imports this module)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        count, high, version = (*db.execute("SELECT count(*), coalesce(max(seq), 0)"
                                            " FROM events").fetchone(),
                                db.execute("PRAGMA user_version").fetchone()[0])
        aside = set_aside(db)  # no fault of the file: replay left them out, said at mount
    finally:
        db.close()
    summary = f"{count} events numbered 1 to {high}" + (
        f" ({high - count} cut by retention: events_retired)" if high != count else "") + \
        f", schema version {version}"
    if aside:
        summary += f"; {len(aside)} set aside at replay, not dismissed:" + "".join(
            f"\n  {r.describe()}" for r in aside)
    return [], summary


def backup(state_dir: str, dest: str) -> int:
    """Copy the state's log (and settings) into the new directory dest, consistent as of
    one moment even while a server appends (SQLite's online backup API reads one
    snapshot; in WAL mode that never blocks the writer). dest can then be mounted as a
    state. Returns the number of events copied; StateError if there is nothing sound to
    copy or dest is not new."""
    src_path = os.path.join(state_dir, LOG)
    if not os.path.exists(src_path):
        raise StateError(f"{src_path} does not exist: nothing to back up")
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise StateError(f"{dest} exists and is not an empty directory")
    with _unless_served(state_dir) as owned:
        problems = verify(src_path, quick=True, owned=owned)
    if problems:
        raise StateError(f"{src_path}: {problems[0]}: not backed up")
    os.makedirs(dest, mode=0o700, exist_ok=True)
    tmp = os.path.join(dest, LOG + ".new")
    src = sqlite3.connect(f"file:{src_path}?mode=ro", uri=True)
    dst = sqlite3.connect(tmp)
    try:
        src.backup(dst)  # all pages in one step: one snapshot
        events, high = dst.execute("SELECT count(*), coalesce(max(seq), 0)"
                                   " FROM events").fetchone()
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    finally:
        dst.close()
        src.close()
    _install(tmp, os.path.join(dest, LOG))
    sync.write_mark(dest, high)  # (the last event's number: retention may have cut some)
    for name in CONFIG:
        try:
            with open(os.path.join(state_dir, name), "rb") as f, \
                    open(os.path.join(dest, name), "xb") as out:
                out.write(f.read())
                os.fsync(out.fileno())
        except FileNotFoundError:
            pass
    sync_dir(dest)
    return events


@contextlib.contextmanager
def _unless_served(state_dir: str):
    """Hold the state's lock for a while if no server does (yields whether it does)."""
    try:
        lock = StateLock(state_dir)
    except StateError:
        yield False
        return
    try:
        yield True
    finally:
        lock._write(lock.previous)  # the next server learns of the last one, not of us
        lock.release()


def install_archive(tmp: str, path: str) -> str:
    """An archive file written whole at tmp installed at path (retention.py,
    event_retention.py); its SHA-256, which the record of the cut names."""
    with open(tmp, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    _install(tmp, path)
    return digest


def _install(tmp: str, path: str) -> None:
    """tmp, a complete new file, becomes path: synced, renamed, its directory synced (a
    crash leaves the old path or the whole new one, never a part)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    sync_dir(os.path.dirname(path))
