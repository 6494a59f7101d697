"""The append-only event log: SQLite in the state directory, the source of truth.

Every state change of the kernel is an event appended here *before* it is
applied, so a write to a ctl file returns only once it is logged, and replaying
the log after a crash rebuilds the same state. A task's input rides in its
`task_queued` event (column `blob`); its output is stored as chunks beside the
events, also append-only. A blob that is kept only for a while (a topic event's body:
topics keep a bounded tail) is stored apart, in `kept`, in a named stream that `trim`
cuts from the oldest end. Only retention (`cut`, event_retention.py) deletes events,
dropping the trigger that refuses it inside its own transaction. A record of
what promised nothing durable (a read of mail) may wait for the next commit (`defer`);
several events may share one commit (`append_many`: mail in batches).

Replay yields what it can read; an event the kernel cannot apply (logged by a past
defect, or damaged) is set aside, not applied: the `set_aside` table says which, why
and whether the operator dismissed it (`set_aside()` lists them, offline too).

The database runs in WAL mode with synchronous=NORMAL: a commit is a write into
the WAL, durable against a crash of this process (kill -9), without an fsync per
event. Commits are a few microseconds, cheaper than handing them to a worker
thread, so they run inline; when they reach the disk (the `durability` setting,
group commit) is sync.py's. The state directory's lock, the log file's version and
its checks at open are state.py's. A commit SQLite cannot make (a full disk, an I/O
error) is refused with ENOSPC or EIO and nothing logged; the log stays as it was.
"""
import collections
import errno
import os
import sqlite3
import logging
import time
import traceback

import trio

from ..errors import Fs9Error
from . import state, sync
from .schema import SCHEMA
# (Event, SetAside, set_aside: what other modules import from here)
from .records import Event, Records, SetAside, _json, set_aside  # noqa: F401
from .stream import Changes

log = logging.getLogger("fs9")

INSERT_EVENT = ("INSERT INTO events (seq, ts, kind, agent, task, corr, data, blob)"
                " VALUES (?,?,?,?,?,?,?,?)")
INSERT_KEPT = "INSERT INTO kept (seq, stream, data) VALUES (?,?,?)"
ONE_STATEMENT = 8  # events a commit inserts with one statement (more: a transaction)
INSERT_ROWS = {n: INSERT_EVENT + ",(?,?,?,?,?,?,?,?)" * (n - 1)
               for n in range(1, ONE_STATEMENT + 1)}


class EventLog(Records):
    RECENT = 4096  # events kept in memory for stream readers; older ones come from disk
    DEFER_S = 0.1  # the longest a deferred record waits for a commit to ride with (a
    # receiver on a busy machine acknowledges tens of ms after its read)
    WAL_KEEP = 4 << 20  # bytes the WAL is cut back to when it starts over

    def __init__(self, state_dir: str, mount: str = "", durability: str = "process") -> None:
        """Open the log of state_dir, served at `mount`; StateError if another server
        holds it or it is damaged, foreign or newer (state.py). `durability`: when a
        write counts as done (sync.py)."""
        os.makedirs(state_dir, exist_ok=True)
        self.lock = state.StateLock(state_dir, mount, durability=durability)
        self.path = os.path.join(state_dir, state.LOG)
        try:  # refused (StateError) if damaged, foreign or newer; migrated if older
            self.db = state.open_log(state_dir, SCHEMA, self.lock.previous.get("log"))
            # a commit reaches the WAL (the page cache); sync.py brings it to the disk
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA wal_autocheckpoint=0")  # see checkpoint()
            # Once checkpointed, the WAL starts over and shrinks to this: a burst (a flood
            # of topic events) does not leave its size on disk for good.
            self.db.execute(f"PRAGMA journal_size_limit={self.WAL_KEEP}")
            self.db.executescript(SCHEMA)
            self.last_seq = self.db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
            # how the last server ended, said at mount (unclean_stop): read before the
            # sync below rewrites the mark
            self.previous = {**self.lock.previous, "synced": sync.read_mark(state_dir)}
            self.sync = sync.Syncer(state_dir, self.path, durability, self.last_seq)
        except BaseException:
            self.lock.release()
            raise
        self.recent: collections.deque[Event] = collections.deque(maxlen=self.RECENT)
        self.changes = Changes()
        # When an agent's or a task's latest event was logged (epoch ns): the mtime of
        # what the mount renders of it (face/times.py). From this mount on: before the
        # first, the latest event's time then (opened_ns) stands for all.
        self.opened_ns = self.last_ns = int(self.db.execute(
            "SELECT ts FROM events ORDER BY seq DESC LIMIT 1").fetchone()[0] * 1e9) \
            if self.last_seq else self.changes.at_ns
        self.agent_ns: dict[str, int] = {}
        self.task_ns: dict[int, int] = {}
        self.trouble: sync.Trouble | None = None  # why writes are refused now (a full disk...)
        self.deferred: list[tuple[str, dict]] = []  # records riding with the next commit
        self._deferring = trio.Event()  # set while some wait (keep_deferred)

    def close(self) -> None:
        self.flush_deferred()
        self.db.close()
        self.sync.close()
        fault = self.sync.fault
        try:  # (the file as this clean stop leaves it: the next open trusts no other)
            left = None if fault else state.fingerprint(self.path)
        except OSError:
            left = None
        self.lock.release(stopped=self.last_seq, **({"fault": fault.text} if fault else {}),
                          **({"log": left} if left else {}))

    # --- writing -----------------------------------------------------------

    @property
    def next_seq(self) -> int:
        """The number the next event gets (this process is the log's only writer)."""
        return self.last_seq + 1

    def append(self, kind: str, *, agent: str | None = None, task: int | None = None,
               corr: str | None = None, blob: bytes | None = None, keep: str | None = None,
               **data) -> Event:
        """Append one event and commit it; returns it with its sequence number.

        `blob` (a task's input) is stored in the same row, so the event never
        exists without its input; with `keep` (a stream's name) it is stored in `kept`
        instead, in the same transaction, until trim() cuts it.
        """
        if self.sync.fault is not None:  # a failed fsync: nothing can be vouched for
            raise self.sync.fault
        if self.deferred:  # they ride with this commit
            return self.append_many([(kind, dict(agent=agent, task=task, corr=corr,
                                                 blob=blob, keep=keep, **data))])[-1]
        event = self._insert(kind, agent, task, corr, blob, data, keep)
        self._recovered()
        return event

    def defer(self, kind: str, **fields) -> None:
        """A record of something that promised nothing durable (a delivery of mail: a
        read, many a second) logged with the next commit, DEFER_S later at most: a
        receive and its acknowledgement are one commit. A crash in between loses the
        record, never what it records (the message is still pending)."""
        self.deferred.append((kind, fields))
        self._deferring.set()

    def flush_deferred(self) -> None:
        """Commit the deferred records now (the log's readers are about to look). One the
        log refuses (a full disk) is left out, said in the server's log."""
        if self.deferred:
            try:
                self.append_many([])
            except Fs9Error as e:
                log.warning("%d records of deliveries not logged: %s", len(self.deferred),
                            e.text)
                self.deferred = []

    async def keep_deferred(self) -> None:
        """Commit deferred records DEFER_S after the first waits, if nothing did before."""
        while True:
            await self._deferring.wait()
            await trio.sleep(self.DEFER_S)
            self._deferring = trio.Event()
            self.flush_deferred()

    def append_many(self, items: list[tuple[str, dict]]) -> list[Event]:
        """Append several events in one transaction, one commit: all are logged, or none
        (Fs9Error: ENOSPC, EIO). Each item is (kind, the keywords append takes). The
        batch paths of mail (bus/batch.py) use it: a commit per batch, not per message."""
        if self.sync.fault is not None:
            raise self.sync.fault
        deferred, self.deferred = self.deferred, []
        try:
            events = self._append_many(deferred + items)
        except Fs9Error:
            self.deferred = deferred + self.deferred  # for the next commit to carry
            raise
        self._recovered()
        return events[len(deferred):]

    def _append_many(self, items: list[tuple[str, dict]]) -> list[Event]:
        now, seq = time.time(), self.last_seq
        events, values, kept = [], [], []
        for kind, fields in items:
            seq += 1
            data = dict(fields)
            agent, task, corr = data.pop("agent", None), data.pop("task", None), \
                data.pop("corr", None)
            blob, keep = data.pop("blob", None), data.pop("keep", None)
            values.append((seq, now, kind, agent, task, corr, _json(data),
                           None if keep else blob))
            if keep is not None:
                kept.append((seq, keep, blob or b""))
            events.append(Event(seq, now, kind, agent, task, corr, data))
        if not kept and len(values) <= ONE_STATEMENT:
            # one statement, its own transaction: all its rows or none (a send and its
            # records, an acknowledgement and the deliveries riding with it), at the
            # cost of one commit and no BEGIN, COMMIT or executemany around it
            self._write(INSERT_ROWS[len(values)], [v for row in values for v in row])
        else:
            self._write("BEGIN", ())  # (one statement refused: _write rolls it all back)
            self._write(INSERT_EVENT, values, many=True)
            if kept:
                self._write(INSERT_KEPT, kept, many=True)
            self._write("COMMIT", ())
        for event in events:
            self._logged(event)
        return events

    def _recovered(self) -> None:
        if self.trouble is not None:  # the writes refused before this one, on the record
            # (after it: callers count on this event taking next_seq)
            t, self.trouble = self.trouble, None
            log.warning("the event log takes writes again (%d were refused)", t.refused)
            try:
                self._insert("log_recovered", None, None, None, None, dict(
                    errno=errno.errorcode[t.error.errno], reason=t.error.text,
                    since=round(t.since, 6), refused=t.refused))
            except Fs9Error:
                pass  # full again: the new trouble is kept instead

    def _insert(self, kind, agent, task, corr, blob, data, keep=None) -> Event:
        """Commit one event; Fs9Error (ENOSPC, EIO) with nothing logged if SQLite cannot."""
        ts = time.time()
        seq = self.next_seq
        if keep is None:
            self._store(seq, ts, kind, agent, task, corr, blob, data)
        else:  # one transaction: the event never exists without its body
            self._write("BEGIN", ())
            self._store(seq, ts, kind, agent, task, corr, blob, data, keep)
            self._write("COMMIT", ())
        return self._logged(Event(seq, ts, kind, agent, task, corr, data))

    def _store(self, seq, ts, kind, agent, task, corr, blob, data, keep=None) -> None:
        """The rows of one event (committed by the caller's transaction, if any)."""
        self._write(INSERT_EVENT,
                    (seq, ts, kind, agent, task, corr, _json(data), None if keep else blob))
        if keep is not None:
            self._write(INSERT_KEPT, (seq, keep, blob or b""))

    def _logged(self, event: Event) -> Event:
        """A committed event: the last, and in `recent` for stream readers."""
        self.last_seq = event.seq
        self.last_ns = int(event.ts * 1e9)  # (what changed when: face/times.py)
        if event.agent is not None:
            self.agent_ns[event.agent] = self.last_ns
        if event.task is not None:
            self.task_ns[event.task] = self.last_ns
        self.recent.append(event)
        self.changes.bump()
        return event

    def bug(self, where: str, **fields) -> None:
        """The exception being handled is fs9's own defect: a `bug` event with its
        traceback (and the server's log). Call it from an `except` block; it never
        raises, so a defect in a handler stays in that handler."""
        text = traceback.format_exc()
        log.error("bug in %s: %s", where, text)
        try:
            self.append("bug", handler=where, traceback=text, **fields)
        except Exception:
            log.exception("logging a bug")

    def add_chunk(self, task: int, attempt: int, fd: int, data: bytes) -> None:
        if self.sync.fault is not None:
            raise self.sync.fault
        self._write("INSERT INTO chunks (task, attempt, fd, data) VALUES (?,?,?,?)",
                    (task, attempt, fd, data))

    def _write(self, sql: str, row, many: bool = False) -> None:
        """One autocommitted statement (many: once per row of `row`). A full disk or an I/O error rolls it back: the
        writer hears ENOSPC or EIO, and the trouble is kept (until a write works again)
        for the root `err` and a `log_recovered` event."""
        try:
            if many:
                self.db.executemany(sql, row)
            else:
                self.db.execute(sql, row)
        except sqlite3.Error as e:
            if self.db.in_transaction:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite rolled it back itself
            error = sync.write_error(e, os.path.dirname(self.path))
            if self.trouble is None:
                self.trouble = sync.Trouble(error, time.time())
                log.error("%s", error.text)
            self.trouble.refused += 1
            raise error from e

    def troubles(self) -> list[str]:
        """Why writes are refused now, in sentences (for the root `err`)."""
        lines = [] if self.sync.fault is None else [self.sync.fault.text]
        if self.trouble is not None:
            lines.append(f"{self.trouble.error.text}; since {time.ctime(self.trouble.since)}, "
                         f"{self.trouble.refused} writes refused")
        return lines

    def write_snapshot(self, seq: int, about: str, kept: bytes, state: bytes) -> None:
        """Replace the snapshot (snapshot.py) in one transaction: the old one stays in
        force until this one is committed. Fs9Error (ENOSPC, EIO) if SQLite cannot."""
        self._write("BEGIN", ())
        self._write("INSERT OR REPLACE INTO snapshot (id, seq, made, about, kept, state)"
                    " VALUES (1,?,?,?,?,?)", (seq, time.time(), about, kept, state))
        self._write("COMMIT", ())

    def cut(self, deletes: list[tuple[str, list | None]], kind: str, **data) -> Event:
        """Run the statements `deletes` ((sql, rows): once per row; None: once) and log
        `kind` (saying what went where) in one transaction: all, or none (Fs9Error).
        Retention's one path (retention.py: output chunks; event_retention.py: events)."""
        if self.sync.fault is not None:
            raise self.sync.fault
        self.flush_deferred()
        ts, seq = time.time(), self.next_seq
        self._write("BEGIN", ())
        for sql, rows in deletes:
            self._write(sql, () if rows is None else rows, many=rows is not None)
        self._store(seq, ts, kind, None, None, None, None, data)
        self._write("COMMIT", ())
        return self._logged(Event(seq, ts, kind, None, None, None, data))

    def trim(self, stream: str, below: int) -> None:
        """Delete the blobs kept in stream for events numbered below `below`. SQLite
        reuses the pages freed, so the file stops growing at what the streams keep. A
        delete SQLite cannot make (a failing disk) waits for the next trim."""
        try:
            self.db.execute("DELETE FROM kept WHERE stream=? AND seq<?", (stream, below))
        except sqlite3.Error as e:
            log.warning("trimming %s: %s", stream, e)

    def append_trimming(self, kind: str, *, keep: str, below: int, blob: bytes,
                        **data) -> Event:
        """append(kind, keep=keep, blob=blob, **data) and trim(keep, below) in one
        transaction: a topic's publish is one commit, not two. All or nothing (Fs9Error:
        ENOSPC, EIO); with records waiting (deferred, a trouble to report) or a fault,
        append's own path, then trim."""
        if self.deferred or self.trouble is not None or self.sync.fault is not None:
            event = self.append(kind, keep=keep, blob=blob, **data)
            self.trim(keep, below)
            return event
        ts, seq = time.time(), self.next_seq
        self._write("BEGIN", ())
        self._store(seq, ts, kind, None, None, None, blob, data, keep)
        self._write("DELETE FROM kept WHERE stream=? AND seq<?", (keep, below))
        self._write("COMMIT", ())
        return self._logged(Event(seq, ts, kind, None, None, None, data))

    def forget(self, stream: str, seqs: list[int]) -> None:
        """Delete the blobs kept in stream for these events (any order: acknowledged
        mail), as trim() does (a failing disk: they stay)."""
        try:
            self.db.executemany("DELETE FROM kept WHERE stream=? AND seq=?",
                                [(stream, seq) for seq in seqs])
        except sqlite3.Error as e:
            log.warning("forgetting in %s: %s", stream, e)

    WAL_LIMIT = 64 << 20  # bytes; past this a checkpoint also truncates the WAL

    def checkpoint(self) -> None:
        """Copy the WAL into the database. Blocking: call from a worker thread."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as e:  # busy, or no room to grow the database file: the
            log.info("checkpoint: %s (the next round tries again)", e)  # WAL keeps it all
        finally:
            db.close()

    async def keep_checkpointed(self, every_s: float = 2.0) -> None:
        """Checkpoint now and then, off the trio thread, while events arrive."""
        done = self.last_seq
        while True:
            await trio.sleep(every_s)
            if self.sync.fault is not None:
                return  # a WAL whose sync failed is not copied into the database
            if self.last_seq != done:
                done = self.last_seq
                await trio.to_thread.run_sync(self.checkpoint)
                # Under steady writes a passive checkpoint never copies the whole WAL,
                # so the WAL never restarts and grows without end. Past WAL_LIMIT the
                # writer itself finishes the job (the few frames left) and truncates.
                if os.path.getsize(self.path + "-wal") > self.WAL_LIMIT:
                    try:
                        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    except sqlite3.Error as e:
                        log.warning("checkpoint: %s (the WAL keeps everything)", e)

    async def wait_after(self, seq: int) -> None:
        """Block until an event with a sequence number above seq exists."""
        while self.last_seq <= seq:
            await self.changes.wait_past(self.changes.version)

