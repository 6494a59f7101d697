"""What an agent's files show (a mixin of Agent, agent.py): its state, its line in the
root `status` and its own `status`, the task `out` and `err` follow, and fs9's notes on
`err`. Read-only views of the agent's data, rendered at each read.
"""
import time

from ..names import one_line
from ..task import Task
from . import breaker as breakers


class Shown:
    """Agent's files' contents (it holds its tasks, tallies, manifest and notes)."""

    @property
    def state(self) -> str:
        if self.killed:
            return "killed"
        if self.failed:
            return "failed"
        if self.current is not None or (self.supervises and not self.stopped
                                        and not self.kernel.halted):
            return "running"
        if self.stopped:
            return "stopped"
        if self.kernel.halted:
            return "halted"
        if self.on_demand and not self.serving:  # no loop, no sandbox, no process:
            # work wakes it, at once or when there is room (ondemand.Wakes)
            return "waking" if self.name in self.kernel.wakes.waiting else "asleep"
        return "idle"

    def status_line(self) -> str:
        c = self.tally
        pid = self.current.pid if self.current and self.current.pid else "-"
        return (f"{self.name} {self.state} {pid} {self.restarts} "
                f"{len(self.queue)} {c['done']} {c['failed']}\n")

    def status(self) -> str:
        """KEY=VALUE lines; `reason` says why the agent failed, else why its latest task
        did (never empty beside a failure: a newcomer looks there first)."""
        c = self.tally
        cur = self.current
        latest = self.tasks[-1] if self.tasks else None
        now, last = cur.timing() if cur else {}, latest.timing() if latest else {}
        fields = {
            "name": self.name, "state": self.state, "mode": self.manifest["mode"],
            "priority": self.priority, "pid": cur.pid if cur and cur.pid else "",
            "restarts": self.restarts, "task": cur.id if cur else "",
            "queued": len(self.queue), "done": c["done"], "failed": c["failed"],
            "cancelled": c["cancelled"], "latest": latest.id if latest else "",
            "latest_state": latest.state if latest else "",
            "latest_exit": "" if not latest or latest.exit is None else latest.exit,
            "latest_reason": latest.reason if latest else "",
            # the running task's timing and latest progress report, then the latest task's
            "task_started_at": now.get("started_at", ""), "task_elapsed": now.get("elapsed", ""),
            "task_progress": cur.progress if cur else "",
            "latest_ended_at": last.get("ended_at", ""), "latest_elapsed": last.get("elapsed", ""),
            **self.kernel.models.agent_usage(self.name),
            "approvals_pending": self.kernel.approvals.pending_of(self.name),
            **breakers.status(self, time.time()),  # its own circuit breaker
            **{f"budget_{k}": v for k, v in vars(self.budget).items() if v},
            "reason": self.failed or failure(latest),  # last: it is free text
        }
        return "".join(f"{k}={v}\n" for k, v in fields.items())

    def shown_task(self) -> Task | None:
        """The task `out`/`err` follow: the running one, else the next queued, else the latest."""
        return self.current or (self.queue[0] if self.queue else None) or \
            (self.tasks[-1] if self.tasks else None)

    NOTES_MAX = 64 << 10

    def diag(self, text: str) -> None:
        """A line of diagnostics for `err` (refused commands); the oldest go first. One
        line whatever the text holds (a name with a newline adds no line of its own)."""
        self.notes += f"fs9: {one_line(text)}\n".encode()
        if len(self.notes) > self.NOTES_MAX:
            del self.notes[:self.notes.index(b"\n", len(self.notes) - self.NOTES_MAX) + 1]


def failure(task) -> str:
    """Why a failed task failed, in words ("" unless it failed)."""
    if task is None or task.state != "failed":
        return ""
    return task.reason or f"its program exited with status {task.exit}"
