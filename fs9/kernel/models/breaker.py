"""A circuit breaker per model: a dead provider is cut off before it burns budget or time.

The classic three states (Nygard, *Release It!*):
  closed     calls go through; each failed call is remembered for `window_s`;
             `failures` of them within the window open the breaker;
  open       calls are refused at once (EHOSTDOWN, with the reason and until when)
             for `cooldown_s`, nothing is sent and nothing is reserved;
  half_open  after the cool-down, one call goes through as a probe (the others are
             refused meanwhile): its success closes the breaker, its failure opens it
             again for another cool-down.
Only the provider's faults count (unreachable, timed out, a 5xx or 429, a broken
stream), after models.py's retries: not a refused budget, a cancelled call or a
request the server found malformed.

The state is rebuilt from the log like the rest of model use: each counted failure is
a `model_error` event with `breaker=true`, each transition a `breaker_opened`,
`breaker_half_open` or `breaker_closed` event; times are the events' wall-clock
stamps, so a breaker opened before a remount stays open for the rest of its cool-down.
Whether a probe is in flight is not logged: a half-open breaker whose probe was lost
(the daemon stopped) lets the next call probe.

models.toml, per model (0 failures: no breaker):
    breaker_failures = 5      breaker_window_s = 60      breaker_cooldown_s = 30
"""
import collections
import errno
import time

from ...errors import Fs9Error

DEFAULTS = {"breaker_failures": 5, "breaker_window_s": 60.0, "breaker_cooldown_s": 30.0}
KEYS = frozenset(DEFAULTS)


def settings(conf: dict, origin: str) -> dict:
    """The breaker's keys of a model's table, checked (EINVAL names the bad one)."""
    out = {}
    for key, default in DEFAULTS.items():
        value = conf.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise Fs9Error(errno.EINVAL, f"{origin}: {key} must be a number >= 0")
        out[key] = value
    return out


class Breaker:
    """One model's (or agent's: agents/breaker.py) breaker: pure state, told the time
    by its caller."""

    def __init__(self, name: str, failures: int, window_s: float, cooldown_s: float,
                 kind: str = "model") -> None:
        self.subject = f"{kind} {name}"  # what the refusals name
        self.threshold, self.window_s, self.cooldown_s = int(failures), window_s, cooldown_s
        self.state = "closed"
        self.failures: collections.deque[float] = collections.deque()  # their times
        self.opened_at = 0.0
        self.reason = ""  # the failure that opened it
        self.probing: object | None = None  # the half-open probe's turn (this process only)
        self.opened = 0  # times opened, ever (the log's count)

    def recent(self, now: float) -> int:
        """Failures within the window before now."""
        while self.failures and self.failures[0] <= now - self.window_s:
            self.failures.popleft()
        return len(self.failures)

    def until(self) -> float:
        return self.opened_at + self.cooldown_s

    def admit(self, now: float) -> str | None:
        """Whether a call may go now: None (closed), "probe" (this call is the half-open
        probe: the caller records `breaker_half_open` unless already so), or an Fs9Error
        raised with the reason."""
        if self.threshold <= 0 or self.state == "closed":
            return None
        if self.state == "open" and now < self.until():
            raise Fs9Error(errno.EHOSTDOWN, f"{self.subject}: circuit breaker open "
                           f"({self.reason}); calls refused for "
                           f"{self.until() - now:.0f} s more, then one probe")
        if self.probing is not None:
            raise Fs9Error(errno.EHOSTDOWN, f"{self.subject}: circuit breaker half-open, "
                           "a probe call is in flight; calls refused until it succeeds")
        return "probe"

    # --- what the events change (models.py's appliers) -----------------------------

    def failed(self, ts: float) -> None:
        self.failures.append(ts)

    def should_open(self, now: float) -> bool:
        """After a failure at now: does it open (or, half-open, reopen) the breaker?"""
        if self.threshold <= 0:
            return False
        return self.state == "half_open" or \
            (self.state == "closed" and self.recent(now) >= self.threshold)

    def open(self, ts: float, reason: str) -> None:
        self.state, self.opened_at, self.reason, self.probing = "open", ts, reason, None
        self.opened += 1

    def half_open(self) -> None:
        self.state = "half_open"

    def close(self) -> None:
        self.state, self.reason, self.probing = "closed", "", None
        self.failures.clear()

    def info(self, now: float) -> list[str]:
        """Lines of models/M/info."""
        lines = [f"breaker={self.state if self.threshold > 0 else 'none'}",
                 f"breaker_failures={self.recent(now)}/{self.threshold}",
                 f"breaker_window_s={self.window_s:g}",
                 f"breaker_cooldown_s={self.cooldown_s:g}", f"breaker_opened={self.opened}"]
        if self.state == "open":
            lines.append("breaker_until=" + time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.until())))
        if self.reason:
            lines.append(f"breaker_reason={self.reason}")
        return lines
