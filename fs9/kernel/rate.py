"""Per-agent rate limits: how fast one agent may add to what fs9 keeps (mail, topic
events, steps, memory notes, commands), so that no agent can bloat the log or the memory
for everyone.

A token bucket per (agent, kind): RATES[kind] = (per second, burst). Counted in
events and, separately, in bytes. Beyond it a request is refused with EAGAIN (try
again later: the shells' and libc's word for it) and the reason; the operator is
never limited. Pure bookkeeping, the clock passed in.
"""
import errno

from ..errors import Fs9Error

# kind -> (events per second, burst of events, bytes per second, burst of bytes)
RATES = {
    "mail": (500.0, 2000, 4 << 20, 16 << 20),
    "publish": (500.0, 2000, 4 << 20, 16 << 20),
    "steps": (200.0, 1000, 1 << 20, 4 << 20),
    "memory": (50.0, 256, 1 << 20, 4 << 20),  # notes, each write logged whole (memory.py)
    "commands": (100.0, 500, 1 << 20, 4 << 20),  # ctl lines: each applied is an event
}


class Bucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.level, self.when = rate, burst, float(burst), now

    def take(self, amount: float, now: float) -> bool:
        self.level = min(self.burst, self.level + (now - self.when) * self.rate)
        self.when = now
        if amount > self.level:
            return False
        self.level -= amount
        return True


class Rates:
    """Every agent's buckets (forgotten with the agent: `drop`)."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], tuple[Bucket, Bucket]] = {}

    def take(self, agent: str, kind: str, size: int, now: float, count: int = 1) -> None:
        """Count `count` of `kind` (one write's: each line of `steps` is an event of its
        own) of `size` bytes by agent; Fs9Error(EAGAIN) past its rate, EFBIG for more
        in one write than its burst (it could never pass)."""
        per_s, burst, bytes_s, bytes_burst = RATES[kind]
        if count > burst:
            raise Fs9Error(errno.EFBIG, f"{count} {kind} in one write: at most {burst}")
        pair = self._buckets.get((agent, kind))
        if pair is None:
            pair = self._buckets[agent, kind] = (Bucket(per_s, burst, now),
                                                 Bucket(bytes_s, bytes_burst, now))
        events, volume = pair
        if not events.take(count, now) or not volume.take(min(size, volume.burst), now):
            raise Fs9Error(errno.EAGAIN, f"agent {agent} is over its rate for {kind} "
                                         f"({per_s:.0f}/s, {bytes_s >> 20} MiB/s): try later")

    def drop(self, agent: str) -> None:
        for key in [k for k in self._buckets if k[0] == agent]:
            del self._buckets[key]


class Burst:
    """At most `per_s` events per agent and second; the rest are counted, and the next
    event logged for that agent says how many were not (`coalesced`)."""

    def __init__(self, per_s: int) -> None:
        self.per_s = per_s
        self.seen: dict[str, list[int]] = {}  # agent -> [second, events in it, not logged]

    def admit(self, agent: str, second: int) -> dict | None:
        """The fields to add to this event ({} or {"coalesced": N}); None: not logged."""
        seen = self.seen.get(agent)
        if seen is None or seen[0] != second:
            if len(self.seen) > 4096:
                self.seen.clear()
            held = seen[2] if seen else 0
            seen = self.seen[agent] = [second, 0, held]
        seen[1] += 1
        if seen[1] > self.per_s:
            seen[2] += 1
            return None
        fields = {"coalesced": seen[2]} if seen[2] else {}
        seen[2] = 0
        return fields
