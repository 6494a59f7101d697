"""Snapshots: a mount replays what still matters, not every event ever logged.

A snapshot at event S is a *replay plan* plus a *residue*, one row of log.sqlite's
`snapshot` table (the same file: a backup and `fs9 check` carry it):

  kept     the seqs <= S whose events a replay must apply: every event with an applier
           (Kernel.apply), less those whose whole effect is gone from the state or
           summed in the residue: the lifecycle events of retired tasks (finished.py)
           and the `mail_sent` and `mail_acked` of acknowledged mail (not federated).
           Events for the record only (AUDIT_ONLY, appliers.py) have no effect and are never kept.
  residue  the state those left-out events did change, as it was at S: the kernel's
           and each agent's task tallies, each agent's correlation ids and breaker
           failures, the idempotency keys, the metrics' counts and task durations.

A mount from a snapshot applies the kept events through the very appliers a full replay
runs, sets the residue, then replays every event after S. So a new kind of event needs
nothing here: it is kept (replayed) unless declared droppable above, and whatever state
the appliers build needs no serializer of its own. tests/test_replay.py checks that a
mount from a snapshot and a full replay give the same state.

Written by the server from its live state: every SNAPSHOT_EVERY events (`keep`) and at
a clean unmount (`write_now`), in one transaction that replaces the previous one
(a kill -9 during it leaves the previous one, or none, in force; the log is untouched).
The state is copied on the trio thread, encoded in a worker thread, written on the trio
thread by the log's own connection (the log's only writer).

Used only if it checks out: its format, fs9's version and the log's schema version are
this fs9's; S is in the log; a digest of the CHECKED rows up to S is the one it names;
its plan and residue decode and have the shapes written. Anything else, or
`fs9 mount --full-replay`, replays from event 1 (said in the server's log). The SQLite
log stays the source of truth: a snapshot is a cache that can always be thrown away
(`DELETE FROM snapshot`). Nothing in it is an agent's: it is written by the server into
the state directory, which agents never see; its size follows the state's (kept events'
numbers, bounded tallies and ids), not the log's.
"""
import array
import collections
import hashlib
import json
import logging
import sys
import zlib
from dataclasses import dataclass

import trio

from .. import __version__
from ..errors import Fs9Error
from . import state
from . import finished

log = logging.getLogger("fs9.snapshot")

FORMAT = 1
SNAPSHOT_EVERY = 100_000  # events between snapshots written while serving (the default)
CHECKED = 64  # the rows up to S whose digest a snapshot names
COMPACT_AT = 50_000  # dropped seqs held before the plan is compacted


class Plan:
    """Which events a replay must apply: those applied (`keep`, in order), less those
    dropped since (`drop`); compacted as drops pile up. 8 bytes a kept event."""

    def __init__(self) -> None:
        self.kept = array.array("q")
        self.dropped: set[int] = set()

    def keep(self, seq: int) -> None:
        self.kept.append(seq)

    def drop(self, seqs) -> None:
        self.dropped.update(seqs)
        if len(self.dropped) >= COMPACT_AT:
            self.compact()

    def compact(self) -> None:
        if self.dropped:
            gone = self.dropped
            self.kept = array.array("q", [s for s in self.kept if s not in gone])
            self.dropped = set()


@dataclass
class Snapshot:
    seq: int
    kept: array.array
    residue: dict


# --- writing ---------------------------------------------------------------------------

def capture(k) -> tuple[int, array.array, dict, dict]:
    """The state to snapshot, copied now (on the trio thread: nothing moves meanwhile):
    (S, the plan's kept seqs, the residue, what the snapshot says about itself)."""
    k.plan.compact()
    s = k.log.last_seq
    return s, array.array("q", k.plan.kept), residue(k), about(k.log.db, s)


def residue(k) -> dict:
    """The state the events a plan leaves out changed, as it is now (JSON-able): a
    snapshot's, and an `events_retired` event's (event_retention.py)."""
    return {
        "tally": dict(k.tally),
        "agents": {a.name: {"tally": dict(a.tally), "corrs": list(a.corrs),
                            "failures": list(a.breaker.failures)}
                   for a in k.agents.values()},
        "keys": [[sender, pairs] for sender, pairs in k.bus.sent_keys.items()],
        "applied": dict(k.metrics.applied),
        "durations": [list(k.metrics.durations.counts), k.metrics.durations.sum],
    }


def about(db, s: int) -> dict:
    """What a snapshot at S must match to be used."""
    return {"format": FORMAT, "fs9": __version__, "schema": state.VERSION,
            "tasks_kept": finished.TASKS_KEPT, "checked": digest(db, s)}


def digest(db, s: int) -> str:
    """A digest of the CHECKED rows up to s (a log that changed below a snapshot, or
    another log under its name, does not match)."""
    h = hashlib.sha256()
    for row in db.execute("SELECT seq, ts, kind, agent, task, corr, data, length(blob)"
                          " FROM events WHERE seq > ? AND seq <= ? ORDER BY seq",
                          (s - CHECKED, s)):
        h.update(repr(row).encode())
    return h.hexdigest()


def encode(kept: array.array, residue: dict) -> tuple[bytes, bytes]:
    """(plan, residue) as stored; blocking, for a worker thread."""
    kept = array.array("q", sorted(kept))  # (a damaged row's seq joins the plan late)
    if sys.byteorder != "little":
        kept.byteswap()
    return zlib.compress(kept.tobytes(), 1), zlib.compress(json.dumps(residue).encode(), 1)


def store(k, s: int, plan: bytes, residue: bytes, said: dict) -> None:
    """Replace the snapshot, in one transaction; Fs9Error (a full disk) leaves the old."""
    k.log.write_snapshot(s, json.dumps(said), plan, residue)
    log.info("snapshot at event %d: %d events to replay, %d bytes", s,
             len(plan) and len(zlib.decompress(plan)) // 8, len(plan) + len(residue))


def write_now(k) -> None:
    """Snapshot the state now (a clean unmount); never raises."""
    if k.log.sync.fault is not None:  # a log whose fsync failed vouches for nothing
        return
    try:
        s, kept, residue, said = capture(k)
        store(k, s, *encode(kept, residue), said)
    except Exception:  # a cache: the mount goes on, the next mount replays more
        log.exception("no snapshot written")


async def keep(k, last: int) -> None:
    """Snapshot every k.snapshot_every events (last: the seq of the one in force, 0 for
    none: a big log replayed whole gets one at once)."""
    every = k.snapshot_every
    while True:
        while k.log.last_seq - last < every:  # (each event bumps the log's changes once)
            await k.log.changes.wait_until(k.log.changes.version + last + every -
                                           k.log.last_seq)
        s = k.log.last_seq
        try:
            s, kept, residue, said = capture(k)
            plan, packed = await trio.to_thread.run_sync(encode, kept, residue)
            store(k, s, plan, packed, said)
        except Fs9Error as e:  # (a full disk) the old one stays in force
            log.warning("no snapshot at event %d: %s (the next try in %d events)", s,
                        e.text, every)
        except Exception:  # a defect here costs a cache, never the mount
            log.exception("no snapshot at event %d (the next try in %d events)", s, every)
        last = s


# --- reading ---------------------------------------------------------------------------

def load(k) -> Snapshot | None:
    """The snapshot in force, checked, or None (then a replay starts at event 1)."""
    try:
        row = k.log.db.execute("SELECT seq, about, kept, state FROM snapshot").fetchone()
    except Exception as e:  # (no table: a log before snapshots; damaged: replay it all)
        log.warning("snapshot unreadable (%s): replaying the whole log", e)
        return None
    if row is None:
        return None
    try:
        s, said, plan, packed = row
        why = mismatch(k.log.db, s, json.loads(said), k.log.last_seq)
        if why is None:
            snap = Snapshot(s, plan_of(plan, s),
                            checked_residue(json.loads(zlib.decompress(packed))))
            return snap
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
    log.warning("snapshot at event %s not used (%s): replaying the whole log", row[0], why)
    return None


def mismatch(db, s, said, last: int) -> str | None:
    if not isinstance(s, int) or not 0 < s <= last:
        return f"it names event {s}, the log ends at {last}"
    if not isinstance(said, dict):
        return "its description is not an object"
    mine = about(db, s)
    for key in ("format", "fs9", "schema", "tasks_kept", "checked"):
        if said.get(key) != mine[key]:
            return f"{key} {said.get(key)!r}, here {mine[key]!r}"
    return None


def plan_of(plan: bytes, s: int) -> array.array:
    raw = zlib.decompress(plan)
    kept = array.array("q")
    kept.frombytes(raw)  # (ValueError unless whole int64s)
    if sys.byteorder != "little":
        kept.byteswap()
    if any(b <= a for a, b in zip(kept, kept[1:])) or (kept and not 0 < kept[0] <= kept[-1] <= s):
        raise ValueError("its plan is not ascending seqs up to S")
    return kept


def checked_residue(r) -> dict:
    """The residue, its shapes checked before any of it is used (a replay from a
    snapshot cannot turn back once it has begun)."""
    def counts(d):
        if not isinstance(d, dict) or not all(isinstance(v, int) for v in d.values()):
            raise ValueError("a tally is not counts")
        return collections.Counter(d)

    def strs(x):
        if not isinstance(x, list) or not all(isinstance(v, str) for v in x):
            raise ValueError("a list of names is not strings")
        return x

    agents = {}
    for name, a in r["agents"].items():
        failures = a["failures"]
        if not all(isinstance(f, (int, float)) for f in failures):
            raise ValueError("breaker failures are not times")
        agents[name] = (counts(a["tally"]), strs(a["corrs"]), list(failures))
    keys = [(str(sender), [(str(key), str(mid)) for key, mid in pairs])
            for sender, pairs in r["keys"]]
    counts_, total = r["durations"]
    if not all(isinstance(c, int) for c in counts_) or not isinstance(total, (int, float)):
        raise ValueError("durations are not counts")
    return {"tally": counts(r["tally"]), "agents": agents, "keys": keys,
            "applied": counts(r["applied"]), "durations": (list(counts_), float(total))}


def restore(k, snap: Snapshot) -> None:
    """Set the residue, once the kept events up to S are applied."""
    set_residue(k, snap.residue)
    log.info("state from the snapshot at event %d (%d events of it replayed)", snap.seq,
             len(snap.kept))


def set_residue(k, r: dict) -> None:
    """Set a residue (as checked_residue returns it). In place: tasks hold their
    tallies, agents their ids."""
    k.tally.clear()
    k.tally.update(r["tally"])
    for name, (tally, corrs, failures) in r["agents"].items():
        agent = k.agents.get(name)
        if agent is None:  # (the plan kept its spawn: only a defect gets here)
            log.warning("snapshot names agent %s, which its plan did not bring back", name)
            continue
        agent.tally.clear()
        agent.tally.update(tally)
        agent.corrs.clear()
        for corr in corrs:
            agent.corrs.add(corr)
        agent.breaker.failures.clear()
        agent.breaker.failures.extend(failures)
    k.bus.sent_keys.clear()
    for sender, pairs in r["keys"]:
        for key, mid in pairs:
            k.bus.sent_keys.put(sender, key, mid)
    k.metrics.applied.clear()
    k.metrics.applied.update(r["applied"])
    counts, total = r["durations"]
    if len(counts) == len(k.metrics.durations.counts):
        k.metrics.durations.counts, k.metrics.durations.sum = counts, total
