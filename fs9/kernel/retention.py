"""Retention of finished tasks' output: a policy in STATE/retention.toml (read at mount).

    outputs_days = 30               # output of retired tasks that ended longer ago is cut
    events_days = 90                # events no replay needs are cut (event_retention.py)
    archive = "/srv/fs9-archive"    # ... after a copy there (optional)

No file, or no `outputs_days`: every output is kept, as before. What is cut: the `chunks`
rows (stdout, stderr) of tasks that ended (done, failed, cancelled) more than
`outputs_days` ago *and* are retired from memory (finished.py: past their agent's
latest 1,000 finished tasks). Never a queued or running task's, never one `tasks/`
lists. What stays: every event (unless events_days cuts it), so the task's lifecycle,
its input (in its `task_queued` event), `log/trace/ID`, replay and snapshots are
untouched; `tasks/ID/out` and `err` of a cut task read empty, its `status` as before.

With `archive`, the rows are first copied into `ARCHIVE/outputs-FIRST-LAST.sqlite` (a
`chunks` table of the log's own layout; FIRST and LAST the lowest and highest task ids),
written whole under another name, synced and renamed, before anything is deleted. Each
cut is one transaction with an `outputs_retired` event: how many tasks, their lowest
and highest ids, the bytes, and the archive file with its SHA-256, so the audit trail
says what went where. A cut the disk refuses leaves everything as it was (the next
round tries again). Rounds run an hour apart (the first a minute after the mount), the
search for candidates in a worker thread with its own read-only connection.
"""
import errno
import logging
import os
import sqlite3
import time
import tomllib
from dataclasses import dataclass

import trio

from ..errors import Fs9Error
from . import event_retention, state

log = logging.getLogger("fs9.retention")

FILE = "retention.toml"
ROUND_S = 3600.0
FIRST_ROUND_S = 60.0
BATCH = 1000  # tasks cut in one transaction
ENDED = ("task_done", "task_failed", "task_cancelled")


@dataclass(frozen=True)
class Policy:
    outputs_days: float | None = None  # None: keep every output
    archive: str = ""  # a directory, or "" (no copy)
    events_days: float | None = None  # None: keep every event (event_retention.py)

    @classmethod
    def load(cls, state_dir: str) -> "Policy":
        """STATE/retention.toml's policy (none: keep everything); Fs9Error(EINVAL) if it
        is unreadable or wrong."""
        path = os.path.join(state_dir, FILE)
        try:
            with open(path, "rb") as f:
                config = tomllib.load(f)
        except FileNotFoundError:
            return cls()
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise Fs9Error(errno.EINVAL, f"{path}: {e}") from None
        if set(config) - {"outputs_days", "events_days", "archive"}:
            raise Fs9Error(errno.EINVAL, f"{path}: keys are outputs_days, events_days and"
                                         " archive")
        archive = config.get("archive", "")
        if not isinstance(archive, str) or (archive and not os.path.isabs(archive)):
            raise Fs9Error(errno.EINVAL, f"{path}: archive is an absolute directory path")
        return cls(_days(config, "outputs_days", path), archive,
                   _days(config, "events_days", path))


def _days(config: dict, key: str, path: str) -> float | None:
    n = config.get(key)
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, float))
                          or not 0 <= n <= 36500):
        raise Fs9Error(errno.EINVAL, f"{path}: {key} is a number of days, 0 to 36500")
    return None if n is None else float(n)


async def keep(k) -> None:
    """Apply the state's policy now and then, until cancelled. A bad policy file: said
    (`retention_config_error`) and nothing is cut."""
    try:
        policy = Policy.load(k.state_dir)
    except Fs9Error as e:
        k.log.append("retention_config_error", reason=f"{e.text}; nothing is cut")
        return
    if policy.outputs_days is None and policy.events_days is None:
        return
    await trio.sleep(FIRST_ROUND_S)
    while True:
        try:
            if policy.outputs_days is not None:
                await cut_outputs(k, policy)
            if policy.events_days is not None:
                await event_retention.cut_events(k, policy)
        except Exception:  # a defect here costs a round, never the mount
            k.log.bug("retention")
        await trio.sleep(ROUND_S)


async def cut_outputs(k, policy: Policy, now: float | None = None) -> int:
    """One round: cut (and archive) the output of retired tasks ended before the
    policy's cutoff. Returns how many tasks' output was cut."""
    cutoff = (time.time() if now is None else now) - policy.outputs_days * 86400
    ended = await trio.to_thread.run_sync(_candidates, k.log.path, cutoff)
    tasks = [t for t in ended if t not in k.tasks]  # (read now: retired ones only)
    done = 0
    for n in range(0, len(tasks), BATCH):
        batch = tasks[n:n + BATCH]
        try:
            where, digest, size = await trio.to_thread.run_sync(
                _archive, k.log.path, policy.archive, batch) if policy.archive else \
                ("", "", await trio.to_thread.run_sync(_size, k.log.path, batch))
            k.log.cut([("DELETE FROM chunks WHERE task = ?", [(t,) for t in batch])],
                      "outputs_retired", tasks=len(batch), first=batch[0], last=batch[-1],
                      bytes=size, archive=where, sha256=digest,
                      outputs_days=policy.outputs_days)
        except (Fs9Error, OSError, sqlite3.Error) as e:
            text = e.text if isinstance(e, Fs9Error) else str(e)
            log.warning("retention: outputs of tasks %d-%d kept this round: %s", batch[0],
                        batch[-1], text)
            break
        done += len(batch)
    return done


def _reader(path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _candidates(path: str, cutoff: float) -> list[int]:
    """Tasks that ended before cutoff and still have output rows, ascending."""
    db = _reader(path)
    try:
        rows = db.execute(
            "SELECT DISTINCT e.task FROM events e WHERE e.kind IN (?,?,?) AND e.ts < ?"
            " AND e.task IS NOT NULL AND EXISTS (SELECT 1 FROM chunks c WHERE c.task = e.task)"
            " ORDER BY e.task", (*ENDED, cutoff)).fetchall()
        return [r[0] for r in rows]
    finally:
        db.close()


def _size(path: str, tasks: list[int]) -> int:
    db = _reader(path)
    try:
        marks = ",".join("?" * len(tasks))
        return db.execute(f"SELECT coalesce(sum(length(data)), 0) FROM chunks WHERE task IN"
                          f" ({marks})", tasks).fetchone()[0]
    finally:
        db.close()


def _archive(path: str, folder: str, tasks: list[int]) -> tuple[str, str, int]:
    """Copy the tasks' chunks into a new archive file in folder: (its path, SHA-256,
    bytes of output). Blocking."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    dest = os.path.join(folder, f"outputs-{tasks[0]}-{tasks[-1]}.sqlite")
    tmp = dest + ".new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    src, out = _reader(path), sqlite3.connect(tmp)
    size = 0
    try:
        out.execute("CREATE TABLE chunks (task INTEGER NOT NULL, attempt INTEGER NOT NULL,"
                    " fd INTEGER NOT NULL, data BLOB NOT NULL)")
        marks = ",".join("?" * len(tasks))
        for row in src.execute(f"SELECT task, attempt, fd, data FROM chunks WHERE task IN"
                               f" ({marks}) ORDER BY rowid", tasks):
            out.execute("INSERT INTO chunks VALUES (?,?,?,?)", row)
            size += len(row[3])
        out.commit()
    finally:
        out.close()
        src.close()
    return dest, state.install_archive(tmp, dest), size  # synced and renamed: whole
