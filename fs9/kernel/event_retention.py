"""Retention of events: `events_days` in STATE/retention.toml (read at mount: retention.py).

    events_days = 90                # events no replay needs, older than this, are cut
    archive = "/srv/fs9-archive"    # ... after a copy there (optional, absolute)

The log is the source of truth a snapshot can be thrown away for, so only what the
latest snapshot's plan (snapshot.py) does not keep may go: a retired task's lifecycle,
settled mail, records for the audit only. Of those, only events numbered up to
S - CHECKED (the rows a snapshot's digest names stay) and older than events_days (every
event up to the cut's bound is), and never one whose correlation id belongs to live
work (`live_corrs`): `log/trace/ID` of live work stays whole. A task's lifecycle goes
whole or not at all (its moves without its `task_queued` would be set aside at replay),
and a `mail_acked` never without its `mail_sent` (the message would be pending again; a
`mail_sent` cut first leaves an acknowledgement that changes nothing).

With `archive`, the events first go into `ARCHIVE/log-FIRST-LAST.sqlite` (the log's own
schema, with the cut tasks' output and kept bodies, plus an `archived` row saying what
it holds: `fs9 check FILE` checks it), written under another name, synced and renamed.
Each cut (BATCH events at most) is one transaction: the trigger that refuses deletes is
dropped, the rows deleted, the trigger made again, and an `events_retired` event logged
with the range, the count, the archive and its SHA-256, the spans and total of every
cut so far (what `fs9 check` reads; a record supersedes those before it), and the residue
(snapshot.residue: the tallies, correlation ids, breaker failures, idempotency keys
and metrics the cut events had a part in, as they stand at the cut). Its applier sets
that residue back at a replay, where the cut was, so a full replay and a mount from the
snapshot give the state there was. A crash before the commit leaves every event (and
maybe an archive file no `events_retired` names: a copy of events still in the log);
after it, the cut is whole.
`fs9 check`'s rule that events are numbered 1..N reads the latest `events_retired`.
"""
import json
import logging
import os
import sqlite3
import time
import urllib.parse

import trio

from ..errors import Fs9Error
from . import snapshot, state
from .finished import TASK_KINDS
from .schema import NO_DELETE, SCHEMA

log = logging.getLogger("fs9.retention")

KIND = "events_retired"
BATCH = 20_000  # events cut in one transaction (the trio thread waits for its deletes)
SEARCH_MAX = 200_000  # candidate events one search holds (then it cuts them, and looks on)
MAIL = ("mail_sent", "mail_acked")
ARCHIVED = ("CREATE TABLE archived (first INTEGER NOT NULL, last INTEGER NOT NULL,"
            " events INTEGER NOT NULL, made REAL NOT NULL)")


class Retired:
    """The applier of `events_retired`: the residue it carries, set back. The latest
    record supersedes the ones before (its residue is the whole state there, its
    `spans` and `total` count every cut so far), so they leave the plan, and a later
    cut may take them too: the records do not pile up."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.latest = 0  # the latest record's seq (0: none)
        self.spans: list[list[int]] = []  # the ranges events were cut in, merged
        self.total = 0  # events cut, all told

    def appliers(self) -> dict:
        return {KIND: self._on_retired}

    def _on_retired(self, e, agent, task) -> None:
        if self.kernel._replaying:  # (live, it was taken from the state as it is)
            snapshot.set_residue(self.kernel, snapshot.checked_residue(e.data["residue"]))
        if self.latest:
            self.kernel.plan.drop((self.latest,))
        self.latest, self.spans, self.total = e.seq, merged(e.data["spans"]), int(e.data["total"])


def merged(spans) -> list[list[int]]:
    """Ranges [first, last] as the fewest ranges covering the same numbers."""
    out: list[list[int]] = []
    for first, last in sorted((int(a), int(b)) for a, b in spans):
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return out


def live_corrs(k) -> set[str]:
    """Correlation ids of live work: tasks in memory (queued, running, the latest
    finished: `tasks/` lists them), pending and dead mail, approvals not used up."""
    corrs = {t.corr for t in k.tasks.values()}
    for box in [a.mailbox for a in k.agents.values()] + [k.bus.operator.mailbox]:
        for msg in (*box.pending.values(), *box.dead.values()):
            corrs.add(msg.headers.get("correlation-id"))
    corrs.update(a.corr for a in k.approvals.live.values())
    corrs.discard(None)
    corrs.discard("")
    return corrs


async def cut_events(k, policy, now: float | None = None) -> int:
    """One round: cut (and archive) what may go of the events older than the policy's
    events_days. Returns how many events were cut."""
    cutoff = (time.time() if now is None else now) - policy.events_days * 86400
    done, start = 0, 0
    while start is not None:  # (a search holds SEARCH_MAX candidates: then the next)
        try:
            batches, start = await trio.to_thread.run_sync(candidates, k.log.path, cutoff,
                                                           live_corrs(k), start)
        except (sqlite3.Error, ValueError) as e:  # (a log or snapshot unreadable now)
            log.warning("retention: events kept this round: %s", e)
            break
        for batch in batches:
            try:
                done += await _cut(k, policy, batch)
            except (Fs9Error, OSError, sqlite3.Error) as e:
                log.warning("retention: events kept this round: %s",
                            e.text if isinstance(e, Fs9Error) else e)
                return done
    return done


class Batch:
    """Units cut in one transaction: their events and tasks (ascending), their ids."""

    def __init__(self, units: list) -> None:
        self.units = units
        self.seqs = sorted(seq for _, unit, _ in units for seq in unit)
        self.tasks = sorted(key[1] for key, _, _ in units if key[0] == "t")
        self.corrs = set().union(*(corrs for _, _, corrs in units))


async def _cut(k, policy, batch: Batch) -> int:
    while batch.seqs:
        seqs, tasks = batch.seqs, batch.tasks
        where, digest = await trio.to_thread.run_sync(
            archive, k.log.path, policy.archive, seqs, tasks) if policy.archive else ("", "")
        live = live_corrs(k)  # (checked again: nothing moves from here to the commit)
        if batch.corrs & live:  # work since made some live
            if where:
                os.unlink(where)
            batch = Batch([u for u in batch.units if not u[2] & live])
            continue
        rows = list(zip(seqs))
        event = k.log.cut([("DROP TRIGGER events_no_delete", None),
                           ("DELETE FROM events WHERE seq = ?", rows),
                           ("DELETE FROM kept WHERE seq = ?", rows),
                           ("DELETE FROM chunks WHERE task = ?", list(zip(tasks))),
                           (NO_DELETE, None)],
                          KIND, first=seqs[0], last=seqs[-1], count=len(seqs),
                          spans=merged(k.retired.spans + [[seqs[0], seqs[-1]]]),
                          total=k.retired.total + len(seqs),
                          tasks=len(tasks), archive=where, sha256=digest,
                          events_days=policy.events_days, residue=snapshot.residue(k))
        k.apply(event)  # (counted, and kept in the plan)
        recent = k.log.recent  # (stream readers' copy: it holds consecutive numbers)
        while recent and recent[0].seq <= seqs[-1]:
            recent.popleft()
        return len(seqs)
    return 0


def _reader(path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def candidates(path: str, cutoff: float, live: set[str],
               start: int = 0) -> tuple[list[Batch], int | None]:
    """What may be cut of the events after `start`, in batches of units that go together
    ((key, seqs ascending, correlation ids), in the order of their last event), and
    where the next search starts (None: nothing is left past SEARCH_MAX). Blocking;
    read-only."""
    db = _reader(path)
    try:
        row = db.execute("SELECT seq, about, kept FROM snapshot").fetchone()
        if row is None:
            return [], None  # no plan says what a replay needs: nothing is cut
        s, said, plan = row
        last = db.execute("SELECT max(seq) FROM events").fetchone()[0]
        if snapshot.mismatch(db, s, json.loads(said), last) is not None:
            return [], None
        kept = snapshot.plan_of(plan, s)
        newer = db.execute("SELECT min(seq) FROM events WHERE ts >= ? AND seq <= ?",
                           (cutoff, s)).fetchone()[0]
        bound = s - snapshot.CHECKED if newer is None else min(s - snapshot.CHECKED, newer - 1)
        units: dict = {}
        spoilt: set = set()
        headed: set = set()  # units whose first event (task_queued, mail_sent) is here
        at, looked, more = 0, 0, None
        for seq, kind, agent, task, corr, mid in db.execute(
                "SELECT seq, kind, agent, task, corr, CASE WHEN kind IN (?,?) AND"
                " json_valid(data) THEN json_extract(data, '$.id') END FROM events"
                " WHERE seq > ? AND seq <= ? ORDER BY seq", (*MAIL, start, bound)):
            while at < len(kept) and kept[at] < seq:
                at += 1
            if at < len(kept) and kept[at] == seq:
                continue  # a replay needs it (the latest events_retired too)
            if looked >= SEARCH_MAX:
                bound = more = seq - 1
                break
            looked += 1
            key = ("t", task) if task is not None and kind in TASK_KINDS else \
                ("m", agent, mid) if kind in MAIL else ("e", seq)
            unit = units.get(key)
            if unit is None:
                unit = units[key] = ([], set())
            unit[0].append(seq)
            if key[0] == "e" or seq == task or kind == "mail_sent":
                headed.add(key)
            if corr is not None:
                unit[1].add(corr)
                if corr in live:
                    spoilt.add(key)
        marks = ",".join("?" * len(TASK_KINDS))
        for (task,) in db.execute(  # a lifecycle that goes on past the bound stays whole
                f"SELECT DISTINCT task FROM events WHERE seq > ? AND task <= ?"
                f" AND kind IN ({marks})", (bound, bound, *TASK_KINDS)):
            spoilt.add(("t", task))
        batches, batch, size = [], [], 0
        for unit in sorted(((key, seqs, corrs) for key, (seqs, corrs) in units.items()
                            if key not in spoilt and key in headed), key=lambda u: u[1][-1]):
            if batch and size + len(unit[1]) > BATCH:
                batches.append(Batch(batch))
                batch, size = [], 0
            batch.append(unit)
            size += len(unit[1])
        return batches + ([Batch(batch)] if batch else []), more
    finally:
        db.close()


def archive(path: str, folder: str, seqs: list[int], tasks: list[int]) -> tuple[str, str]:
    """Copy the events numbered seqs (with their kept bodies and the output of tasks)
    into a new archive file in folder: (its path, SHA-256). Blocking."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    dest = os.path.join(folder, f"log-{seqs[0]}-{seqs[-1]}.sqlite")
    tmp = dest + ".new"  # (one left by a crash: written again)
    if os.path.lexists(tmp):
        os.unlink(tmp)
    out = sqlite3.connect(f"file:{urllib.parse.quote(tmp)}", uri=True, isolation_level=None)
    try:
        out.executescript(SCHEMA)
        out.execute(f"PRAGMA user_version={state.VERSION}")
        out.execute(f"PRAGMA application_id={state.APP_ID}")
        out.execute(ARCHIVED)
        out.execute("ATTACH ? AS src", (f"file:{urllib.parse.quote(path)}?mode=ro",))
        out.execute("BEGIN")
        out.execute("CREATE TEMP TABLE cut (seq INTEGER PRIMARY KEY)")
        out.execute("CREATE TEMP TABLE cut_tasks (task INTEGER PRIMARY KEY)")
        out.executemany("INSERT INTO cut VALUES (?)", zip(seqs))
        out.executemany("INSERT INTO cut_tasks VALUES (?)", zip(tasks))
        for table, key, ids in (("events", "seq", "cut"), ("kept", "seq", "cut"),
                                ("chunks", "task", "cut_tasks")):
            out.execute(f"INSERT INTO main.{table} SELECT * FROM src.{table} WHERE {key} IN"
                        f" (SELECT {key} FROM temp.{ids}) ORDER BY rowid")
        out.execute("INSERT INTO archived VALUES (?,?,?,?)",
                    (seqs[0], seqs[-1], len(seqs), time.time()))
        out.execute("COMMIT")
        out.execute("DETACH src")
    finally:
        out.close()
    return dest, state.install_archive(tmp, dest)  # synced and renamed: whole, or not there


# --- fs9 check -------------------------------------------------------------------------

def gaps(db, low: int, high: int, count: int) -> list[str]:
    """Events are numbered 1..high; the numbers missing are exactly those the latest
    `events_retired` record says were cut (each within its spans, as many as its
    total)."""
    row = db.execute("SELECT data FROM events WHERE kind = ? ORDER BY seq DESC LIMIT 1",
                     (KIND,)).fetchone()
    d = json.loads(row[0]) if row else {}
    spans, cut = merged(d.get("spans", [])), int(d.get("total", 0))
    inside = sum(db.execute("SELECT count(*) FROM events WHERE seq BETWEEN ? AND ?",
                            span).fetchone()[0] for span in spans)
    width = sum(b - a + 1 for a, b in spans)
    if low < 1 or count - inside != high - width or inside + cut != width:
        return [f"the event sequence has gaps: {count} events numbered {low} to {high},"
                f" {cut} said cut (events_retired)"]
    return []


def check_archive(path: str) -> tuple[list[str], str]:
    """(problems, summary) of an archive file this module wrote. Read-only."""
    db = _reader(path)
    try:
        if db.execute("PRAGMA application_id").fetchone()[0] != state.APP_ID:
            return ["this is not an fs9 archive (another program's SQLite database)"], ""
        rows = db.execute("PRAGMA integrity_check").fetchall()
        if [r[0] for r in rows] != ["ok"]:
            return [f"SQLite finds the file damaged: {r[0]}" for r in rows[:10]], ""
        first, last, events, _ = db.execute("SELECT * FROM archived").fetchone()
        low, high, count = db.execute(
            "SELECT min(seq), max(seq), count(*) FROM events").fetchone()
        if (low, high, count) != (first, last, events):
            return [f"it says it holds {events} events numbered {first} to {last}; it holds"
                    f" {count} numbered {low} to {high}"], ""
        return [], f"an archive of {count} events numbered {first} to {last}"
    except (sqlite3.DatabaseError, TypeError) as e:
        return [f"the file is damaged or not an fs9 archive ({e})"], ""
    finally:
        db.close()
