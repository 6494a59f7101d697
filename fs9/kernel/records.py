"""What the event log holds, looked up: events after a seq, a whole replay, a trace by
correlation id, blobs and output chunks, the events replay set aside (and that store's
upkeep: what the latest replay set aside, what the operator dismissed). A mixin of
EventLog (log.py), which writes them; `set_aside` also reads a log offline (state.py).
"""
import itertools
import json
import sqlite3
import time
from dataclasses import dataclass, field

_json = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: dumps() builds one a call
if json.encoder.c_make_encoder is not None:  # (and encode() builds a C encoder a call: an
    # event's data is a third cheaper through one built once; the same text)
    _chunks = json.encoder.c_make_encoder(None, json.JSONEncoder().default,
                                          json.encoder.encode_basestring_ascii, None, ":",
                                          ",", False, False, True)

    def _json(value) -> str:  # noqa: F811
        return "".join(_chunks(value, 0))
_decode = json.JSONDecoder().decode  # (loads() checks its argument's type first, a call)
# A row's blob up to this size comes with it at replay (a batch of rows holds at most
# 5000 of them: 20 MiB); a larger one is read when applied.
REPLAY_BLOB = 4096


@dataclass(frozen=True)
class Event:
    seq: int
    ts: float
    kind: str
    agent: str | None = None
    task: int | None = None
    corr: str | None = None
    data: dict = field(default_factory=dict)

    def __init__(self, seq: int, ts: float, kind: str, agent: str | None = None,
                 task: int | None = None, corr: str | None = None,
                 data: dict | None = None) -> None:
        # the fields in one step: the frozen dataclass's own __init__ pays a setattr a
        # field, a few microseconds an event (three a message; a million at a replay)
        self.__dict__.update(seq=seq, ts=ts, kind=kind, agent=agent, task=task, corr=corr,
                             data={} if data is None else data)

    def json(self) -> str:
        head = {"seq": self.seq, "ts": round(self.ts, 6), "kind": self.kind}
        for key in ("agent", "task", "corr"):
            if getattr(self, key) is not None:
                head[key] = getattr(self, key)
        return _json({**head, **self.data})


@dataclass(frozen=True)
class SetAside:
    """An event replay set aside: what (seq, kind, agent, task), why, since when."""
    seq: int
    kind: str
    agent: str | None
    task: int | None
    reason: str
    found: float
    dismissed: float | None

    def describe(self) -> str:
        where = "".join(f" {k}={v}" for k, v in (("agent", self.agent), ("task", self.task))
                        if v is not None)
        return f"replay set aside event {self.seq} ({self.kind}{where}): {self.reason}"


def set_aside(db: sqlite3.Connection, dismissed: bool = False) -> list[SetAside]:
    """The events replay set aside in the log open as db, oldest first: those the operator
    has not dismissed (with dismissed=True, all). A log no fs9 with this table has
    replayed has none listed."""
    try:
        rows = db.execute(
            "SELECT s.seq, s.kind, e.agent, e.task, s.reason, s.found, s.dismissed"
            " FROM set_aside s LEFT JOIN events e ON e.seq = s.seq"
            + ("" if dismissed else " WHERE s.dismissed IS NULL") + " ORDER BY s.seq")
    except sqlite3.OperationalError:  # no such table: written by an older fs9
        return []
    return [SetAside(*row) for row in rows]


class Records:
    """EventLog's lookups (it holds `db`, `recent` and the deferred records)."""

    def events_after(self, seq: int, limit: int = 1000) -> list[Event]:
        """Events with sequence numbers above seq, oldest first (at most limit)."""
        if self.recent and self.recent[0].seq <= seq + 1:
            start = seq + 1 - self.recent[0].seq  # `recent` holds consecutive numbers
            return list(itertools.islice(self.recent, start, start + limit))
        rows = self.db.execute(
            "SELECT seq, ts, kind, agent, task, corr, data FROM events"
            " WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
        return [_readable(*row) for row in rows]

    def replay(self, aside: dict[int, tuple[str, str]], after: int = 0):
        """Every event after seq `after`, oldest first, as (event, its blob if stored
        in its row and at most REPLAY_BLOB bytes, else None: blob() reads it); a row that
        does not read as an event (its data is not a JSON object) goes into `aside`
        (seq -> (kind, reason)) instead, for keep_aside(). (Read with its row, a
        message's blob costs no query of its own: a third of a message's replay.)"""
        seq = after
        while rows := self.db.execute(
                f"SELECT {_REPLAYED} FROM events WHERE seq > ? ORDER BY seq LIMIT 5000",
                (REPLAY_BLOB, seq)).fetchall():
            yield from _decoded(rows, aside)
            seq = rows[-1][0]

    def replay_seqs(self, seqs, aside: dict[int, tuple[str, str]]):
        """The events numbered seqs (ascending), as replay() yields them: a snapshot's
        plan (snapshot.py)."""
        for n in range(0, len(seqs), 5000):
            chunk = seqs[n:n + 5000]
            rows = self.db.execute(
                f"SELECT {_REPLAYED} FROM events WHERE seq IN ({','.join('?' * len(chunk))})"
                " ORDER BY seq", (REPLAY_BLOB, *chunk)).fetchall()
            yield from _decoded(rows, aside)

    def set_aside(self, dismissed: bool = False) -> list[SetAside]:
        return set_aside(self.db, dismissed)

    def keep_aside(self, aside: dict[int, tuple[str, str]]) -> None:
        """Store what a whole replay set aside (seq -> (kind, reason)). The set-aside
        store follows the latest replay: an event it applied is no longer listed, and
        one listed before keeps when it was found and whether it was dismissed."""
        stale = [(seq,) for (seq,) in self.db.execute("SELECT seq FROM set_aside")
                 if seq not in aside]
        now = time.time()
        with self.db:  # one transaction: the store is never half updated
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM set_aside WHERE seq = ?", stale)
            self.db.executemany(
                "INSERT INTO set_aside (seq, kind, reason, found) VALUES (?,?,?,?)"
                " ON CONFLICT (seq) DO UPDATE SET kind = excluded.kind, reason = excluded.reason",
                [(seq, kind, reason, now) for seq, (kind, reason) in aside.items()])

    def dismiss(self, seqs: list[int]) -> None:
        """The operator has seen these set-aside events: no longer reported."""
        self.db.executemany("UPDATE set_aside SET dismissed = ? WHERE seq = ?",
                            [(time.time(), seq) for seq in seqs])

    def trace(self, corr: str) -> list[Event]:
        """Every event carrying correlation id `corr`, in order."""
        self.flush_deferred()
        rows = self.db.execute("SELECT seq, ts, kind, agent, task, corr, data FROM events"
                               " WHERE corr = ? ORDER BY seq", (corr,))
        return [_readable(*row) for row in rows]

    def task_events(self, task: int, kinds) -> list[Event]:
        """The events of these kinds naming task, in order (rows that do not read as
        events left out, as replay sets them aside)."""
        marks = ",".join("?" * len(kinds))
        rows = self.db.execute("SELECT seq, ts, kind, agent, task, corr, data FROM events"
                               f" WHERE task = ? AND kind IN ({marks}) ORDER BY seq",
                               (task, *kinds))
        return [e for e in map(lambda r: _readable(*r), rows) if "damaged" not in e.data]

    def has_corr(self, corr: str) -> bool:
        self.flush_deferred()
        return self.db.execute("SELECT 1 FROM events WHERE corr = ? LIMIT 1",
                               (corr,)).fetchone() is not None

    def correlations(self, limit: int = 1000) -> list[str]:
        """The most recent correlation ids, newest first."""
        self.flush_deferred()
        rows = self.db.execute("SELECT corr FROM events WHERE corr IS NOT NULL"
                               " GROUP BY corr ORDER BY max(seq) DESC LIMIT ?", (limit,))
        return [r[0] for r in rows]

    def blob(self, seq: int) -> bytes:
        """Event seq's blob: in its row, or kept apart (b"" once trimmed, or none)."""
        row = self.db.execute("SELECT blob FROM events WHERE seq=?", (seq,)).fetchone()
        if row and row[0] is not None:
            return row[0]
        row = self.db.execute("SELECT data FROM kept WHERE seq=?", (seq,)).fetchone()
        return (row and row[0]) or b""

    def chunks(self, task: int, attempt: int, fd: int) -> bytes:
        rows = self.db.execute(
            "SELECT data FROM chunks WHERE task=? AND attempt=? AND fd=? ORDER BY rowid",
            (task, attempt, fd))
        return b"".join(r[0] for r in rows)


_REPLAYED = ("seq, ts, kind, agent, task, corr, data,"
             " CASE WHEN length(blob) <= ? THEN blob END")


def _decoded(rows, aside):
    for s, ts, k, a, t, c, d, b in rows:
        try:
            data = _decode(d) if type(d) is str else json.loads(d)
        except (TypeError, ValueError):
            data = None
        if isinstance(data, dict):
            yield Event(s, ts, k, a, t, c, data), b
        else:
            aside[s] = (k, f"its data is not a JSON object: {str(d)[:80]!r}")


def _readable(seq, ts, kind, agent, task, corr, data) -> Event:
    """A row as an Event to show (log/audit, traces): a row whose data is damaged (not a
    JSON object; replay sets it aside) shows as {"damaged": its first bytes}, not EIO."""
    try:
        value = json.loads(data)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        value = {"damaged": str(data)[:200]}
    return Event(seq, ts, kind, agent, task, corr, value)
