"""Tasks and their lifecycle (a transition table, checked on every change).

queued -> running -> done | failed | cancelled
running -> interrupted (the daemon died under it) -> queued | failed
queued -> cancelled (its agent was killed)

Each event that moves a task names its new state in MOVES; Kernel.refusal checks the
move against TRANSITIONS before the event is logged (and again at replay), so the log
never holds a move this table forbids.
"""
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .stream import Changes, Stream

TRANSITIONS = {
    "queued": {"running", "cancelled"},
    "running": {"done", "failed", "cancelled", "interrupted"},
    "interrupted": {"queued", "failed"},
    "done": set(), "failed": set(), "cancelled": set(),
}
FINAL = frozenset({"done", "failed", "cancelled"})
MOVES = {  # event kind -> the state it moves its task to
    "task_started": "running", "task_done": "done", "task_failed": "failed",
    "task_cancelled": "cancelled", "task_interrupted": "interrupted",
    "task_requeued": "queued",
}


class BadTransition(Exception):
    """Our bug: a change the lifecycle table forbids."""


@dataclass(eq=False)  # a task is itself: identity, not its fields (queues test membership)
class Task:
    id: int
    agent: str
    corr: str
    state: str = "queued"
    attempt: int = 0  # bumped on every start; output chunks are per attempt
    exit: int | None = None
    reason: str = ""
    pid: int | None = None
    daemon: bool = False  # a run of a daemon agent rather than a queued task
    reply_to: str = ""  # made from a work_request: who gets the result message
    request: str = ""  # that request's message id
    asker: str = ""  # reply_to's spawn id when it asked, if a cluster agent (replies.py)
    handed_off: bool = False  # it handed its work on (with reply_to): no result from it
    queued_ts: float = 0.0
    started_ts: float | None = None
    ended_ts: float | None = None
    # its latest progress report (tasks/ID/progress), one line; task_progress is an audit
    # event, not state, so a mount starts with none
    progress: str = ""
    # in-memory streams of the current attempt; None until loaded or started
    out: Stream | None = None
    err: Stream | None = None
    changes: Changes = field(default_factory=Changes)  # state changes, for waiters
    # the seqs of its lifecycle events (task_queued and its moves), dropped from a
    # snapshot's replay once it retires (finished.py)
    seqs: list = field(default_factory=list)
    tallies: tuple = ()  # Counters of tasks by state (agent's, kernel's), kept current here

    def __post_init__(self) -> None:
        for tally in self.tallies:
            tally[self.state] += 1

    def refusal(self, state: str) -> str | None:
        """Why this task cannot move to state now (None: it can)."""
        if state not in TRANSITIONS[self.state]:
            return f"task {self.id}: {self.state} -> {state}"
        return None

    def move(self, state: str) -> None:
        if why := self.refusal(state):
            raise BadTransition(why)
        for tally in self.tallies:
            tally[self.state] -= 1
            tally[state] += 1
        self.state = state
        self.changes.bump()

    @property
    def final(self) -> bool:
        return self.state in FINAL

    async def wait_started(self) -> None:
        """Block until the task has left the queue (started or ended)."""
        while self.state == "queued":
            await self.changes.wait_past(self.changes.version)

    def timing(self) -> dict[str, str]:
        """When it was queued, its latest attempt started, it ended (UTC, ISO 8601), and
        the seconds it ran: until it ended, or until now while it runs; "" for none yet."""
        ended = self.ended_ts if self.final else None
        elapsed = ""
        if self.started_ts is not None and (self.state == "running" or ended is not None):
            elapsed = f"{max(0.0, (ended or time.time()) - self.started_ts):.1f}"
        return {"queued_at": _iso(self.queued_ts), "started_at": _iso(self.started_ts),
                "ended_at": _iso(ended), "elapsed": elapsed}

    def status(self) -> str:
        fields = {"id": self.id, "agent": self.agent, "state": self.state,
                  "corr": self.corr, "attempt": self.attempt,
                  "exit": "" if self.exit is None else self.exit,
                  "pid": self.pid or "", "reason": self.reason, "reply_to": self.reply_to,
                  **self.timing(), "progress": self.progress}
        return "".join(f"{k}={v}\n" for k, v in fields.items())


def _iso(ts: float | None) -> str:
    if not ts:
        return ""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
