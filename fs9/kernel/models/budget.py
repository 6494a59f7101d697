"""Token budgets and request rates of model calls: plain bookkeeping, the clock passed in.

Three scopes hold limits: a task (`tokens_per_task`), an agent (its manifest's
`[budget]`) and fs9 as a whole (`[limits]` of models.toml); a model has its own
`requests_per_minute`. A limit of 0 is none. Tokens per day count over the last
24 hours (rolling), requests per minute over the last 60 s.

A call is checked before it is sent (`admit`): its prompt's estimated tokens must
fit in what every scope has left, else it is refused (EDQUOT) naming the scope;
its `max_tokens` is clamped to the least that is left, so a reply cannot overrun a
budget by more than the estimate's error. What is left counts the calls still in
flight: an admitted call reserves its prompt plus its max_tokens in every scope
(`reserve`) until it ends (`release`) and its real usage is added, so concurrent
calls cannot all be admitted against the same room. Rates do not refuse: `wait_s` says how
long a call must wait in the scheduler for its turn.
"""
import collections
import itertools
import errno
from dataclasses import dataclass

from ...errors import Fs9Error

DAY_S, MINUTE_S = 86_400.0, 60.0
KEYS = ("tokens_per_task", "tokens_per_day", "requests_per_minute")


@dataclass(frozen=True)
class Limits:
    tokens_per_task: int = 0
    tokens_per_day: int = 0
    requests_per_minute: int = 0

    @classmethod
    def of(cls, table: dict, origin: str) -> "Limits":
        """From a TOML table (manifest `[budget]`, models.toml `[limits]`), checked."""
        unknown = sorted(set(table) - set(KEYS))
        if unknown:
            raise Fs9Error(errno.EINVAL, f"{origin}: unknown key(s) {', '.join(unknown)} "
                                         f"(known: {', '.join(KEYS)})")
        for key, value in table.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise Fs9Error(errno.EINVAL, f"{origin}: {key} must be a whole number >= 0")
        return cls(**table)


class Usage:
    """What one scope (a task, an agent, a model, everyone) has used."""

    def __init__(self) -> None:
        self.calls = self.tokens_in = self.tokens_out = self.refused = 0
        self._tokens: collections.deque = collections.deque()  # (ts, tokens), last day
        self._day = 0  # the sum of _tokens: a check costs O(1), not O(calls of the day)
        self._starts: collections.deque = collections.deque()  # ts of calls, last minute
        self.reserved = 0  # tokens admitted calls in flight may still use (see reserve)

    def started(self, now: float) -> None:
        self._starts.append(now)

    def add(self, now: float, tokens_in: int, tokens_out: int) -> None:
        self.calls += 1
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        self._tokens.append((now, tokens_in + tokens_out))
        self._day += tokens_in + tokens_out

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    def tokens_today(self, now: float) -> int:
        return self.tokens_within(now, DAY_S)

    def tokens_within(self, now: float, seconds: float) -> int:
        """Tokens used in the last `seconds` (at most a day)."""
        while self._tokens and self._tokens[0][0] <= now - DAY_S:
            self._day -= self._tokens.popleft()[1]
        if seconds >= DAY_S:
            return self._day
        since = now - seconds
        return sum(t for _, t in itertools.takewhile(lambda e: e[0] > since,
                                                      reversed(self._tokens)))

    def requests_last_minute(self, now: float) -> int:
        while self._starts and self._starts[0] <= now - MINUTE_S:
            self._starts.popleft()
        return len(self._starts)

    def next_slot(self, now: float, per_minute: int) -> float:
        """Seconds until one more request fits in per_minute (0: now)."""
        if not per_minute or self.requests_last_minute(now) < per_minute:
            return 0.0
        return self._starts[-per_minute] + MINUTE_S - now


@dataclass
class Scope:
    """A scope a call counts against: its name (for errors), limits and usage."""
    name: str
    limits: Limits
    usage: Usage
    per_task: bool = False  # tokens_per_task applies to this scope's total


def left(scope: Scope, now: float) -> int | None:
    """Tokens scope has left (None: unlimited)."""
    lim, usage = scope.limits, scope.usage
    if scope.per_task:
        return None if not lim.tokens_per_task else \
            lim.tokens_per_task - usage.tokens - usage.reserved
    if not lim.tokens_per_day:
        return None
    return lim.tokens_per_day - usage.tokens_today(now) - usage.reserved


def admit(scopes: list[Scope], prompt_tokens: int, max_tokens: int, now: float) -> int:
    """The call's max_tokens, clamped to what every scope has left; or Fs9Error(EDQUOT)."""
    for scope in scopes:
        room = left(scope, now)
        if room is None:
            continue
        if prompt_tokens >= room:
            what = "tokens_per_task" if scope.per_task else "tokens_per_day"
            limit = getattr(scope.limits, what)
            raise Fs9Error(errno.EDQUOT, f"over budget: {scope.name} has {max(room, 0)} of its "
                                         f"{limit} {what} left; this call needs about "
                                         f"{prompt_tokens} for its prompt alone")
        max_tokens = min(max_tokens, room - prompt_tokens)
    return max_tokens


def reserve(scopes: list[Scope], tokens: int) -> None:
    """An admitted call may use up to `tokens` (prompt + max_tokens) in every scope."""
    for scope in scopes:
        scope.usage.reserved += tokens


def release(scopes: list[Scope], tokens: int) -> None:
    """The call that reserved `tokens` ended (its real usage is added by then)."""
    for scope in scopes:
        scope.usage.reserved -= tokens


def wait_s(scopes: list[Scope], now: float) -> float:
    """How long until every scope's requests_per_minute lets one more call start."""
    return max((s.usage.next_slot(now, s.limits.requests_per_minute) for s in scopes),
               default=0.0)
