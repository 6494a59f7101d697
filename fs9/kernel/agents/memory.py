"""L2 memory: an agent's own notes under agents/NAME/memory/, kept across restarts.

A note is a small file the agent (or the operator) writes whole; it is stored in
the event log (`memory_set` with the bytes, `memory_deleted`), so it survives
restarts and crashes like everything acknowledged, and belongs to the agent's name,
definition and clearance together (`Agent.holder`): a respawned agent of that name
and definition finds its notes; another agent given the name (another definition, a
lower clearance) does not. The manifest's `[memory]`
states the pruning policy; the oldest notes go first, each with a
`memory_pruned` event:

    [memory]
    max_bytes = 1048576   # all notes together (default 1 MiB)
    max_notes = 256       # (default 256)
    max_age_days = 0      # notes not rewritten for this long go (0: never)
"""
import errno
import time

from ...errors import Fs9Error
from ..names import NAME_RE
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel import Kernel

DEFAULTS = {"max_bytes": 1 << 20, "max_notes": 256, "max_age_days": 0}
MAX_NOTE = 1 << 20
# Notes of a killed agent are kept for a respawn of its definition; but an agent that
# spawns and kills children under ever new names would grow them without end (memory,
# the log, snapshots). So past these, notes of killed agents that an agent had spawned go,
# the stalest holder's first (the operator's own agents' notes are never cut so).
KEPT_HOLDERS = 256
KEPT_BYTES = 64 << 20


def policy(manifest: dict) -> dict:
    """The manifest's [memory] table with defaults; EINVAL if malformed."""
    table = manifest.get("memory", {})
    if not isinstance(table, dict) or set(table) - set(DEFAULTS):
        raise Fs9Error(errno.EINVAL, f"memory: a table of {', '.join(DEFAULTS)}")
    for key, value in table.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise Fs9Error(errno.EINVAL, f"memory: {key} must be a number >= 0")
    return {**DEFAULTS, **table}


class Memory:
    """Every agent's notes: holder -> {key: (bytes, when set)}."""

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.notes: dict[str, dict[str, tuple[bytes, float]]] = {}
        self.agents_spawned: set[str] = set()  # holders whose latest agent an agent spawned

    def keys(self, agent) -> list[str]:
        return sorted(self.notes.get(agent.holder, {}))

    def get(self, agent, key: str) -> bytes | None:
        note = self.notes.get(agent.holder, {}).get(key)
        return None if note is None else note[0]

    def set(self, agent, key: str, data: bytes, by: str | None = None) -> None:
        """by: the agent that writes (None: the operator). Each write is logged whole,
        so an agent's writes have a rate (rate.py), as its mail has."""
        if not NAME_RE.fullmatch(key):
            raise Fs9Error(errno.EINVAL, f"bad note name {key!r}: letters, digits, _ . -")
        if len(data) > MAX_NOTE:
            raise Fs9Error(errno.EFBIG, f"a note is at most {MAX_NOTE} bytes")
        if by is not None:
            self.kernel.rates.take(by, "memory", len(data), time.monotonic())
        self.kernel.record("memory_set", agent=agent.name, key=key, blob=data, size=len(data),
                           holder=agent.holder)
        self.prune(agent)

    def delete(self, agent, key: str, reason: str = "") -> None:
        if self.get(agent, key) is None:
            raise Fs9Error(errno.ENOENT, f"no note {key}")
        self.kernel.record("memory_pruned" if reason else "memory_deleted", agent=agent.name,
                           key=key, holder=agent.holder, **({"reason": reason} if reason else {}))

    def prune(self, agent, now: float | None = None) -> None:
        """Apply agent's policy: too old, then the oldest until within size and count."""
        rules = policy(agent.manifest)
        now = time.time() if now is None else now
        notes = self.notes.get(agent.holder, {})
        by_age = sorted(notes, key=lambda k: notes[k][1])
        if rules["max_age_days"]:
            for key in [k for k in by_age if now - notes[k][1] > rules["max_age_days"] * 86400]:
                self.delete(agent, key, f"older than max_age_days = {rules['max_age_days']}")
        by_age = sorted(notes, key=lambda k: notes[k][1])
        while by_age and (len(notes) > rules["max_notes"] or
                          sum(len(d) for d, _ in notes.values()) > rules["max_bytes"]):
            key = by_age.pop(0)
            self.delete(agent, key, f"over max_notes = {rules['max_notes']} or max_bytes = "
                                    f"{rules['max_bytes']}: the oldest note goes")

    def owner_killed(self) -> None:
        """An agent was killed (rootctl.kill, after its `kill` event): past KEPT_HOLDERS
        or KEPT_BYTES of notes of killed agents that agents spawned, the stalest such
        holders' notes go, each with a `memory_pruned` event (a replay drops them too)."""
        live = {a.holder for a in self.kernel.agents.values() if not a.killed}
        self.agents_spawned -= {h for h in self.agents_spawned - live if not self.notes.get(h)}
        idle = {h: self.notes[h] for h in self.agents_spawned - live}
        size = sum(len(d) for notes in idle.values() for d, _ in notes.values())
        stalest = sorted(idle, key=lambda h: (max(t for _, t in idle[h].values()), h))
        while stalest and (len(idle) > KEPT_HOLDERS or size > KEPT_BYTES):
            holder = stalest.pop(0)
            for key, (data, _) in sorted(idle.pop(holder).items()):
                size -= len(data)
                self.kernel.record("memory_pruned", agent=holder.split("|", 1)[0], key=key,
                                   holder=holder, reason=f"its agent, spawned by an agent, was "
                                   f"killed: of such notes the latest {KEPT_HOLDERS} agents' "
                                   f"(at most {KEPT_BYTES} bytes) are kept")

    # --- applying events (replay too) ---------------------------------------------

    def appliers(self) -> dict:
        return {"memory_set": self.on_memory_set, "memory_deleted": self.on_memory_deleted,
                "memory_pruned": self.on_memory_deleted}

    def spawned(self, agent) -> None:
        """agent's spawn applied: whether its notes count among agents' agents' (above)."""
        if agent.spawned_by is None:
            self.agents_spawned.discard(agent.holder)
        else:
            self.agents_spawned.add(agent.holder)

    def on_memory_set(self, e, agent, task) -> None:
        self.notes.setdefault(_holder(e, agent), {})[e.data["key"]] = (self.kernel.blob(e), e.ts)

    def on_memory_deleted(self, e, agent, task) -> None:
        holder = _holder(e, agent)
        notes = self.notes.get(holder, {})
        notes.pop(e.data["key"], None)
        if not notes:
            self.notes.pop(holder, None)


def _holder(e, agent) -> str:
    """Whose notes an event names (a log written before holders: the agent's now)."""
    return e.data.get("holder") or (agent.holder if agent is not None else e.agent)
