"""A circuit breaker per agent: an agent whose tasks keep failing is cut off before it
burns more budget, as a dead model is (kernel/models/breaker.py: the same three states,
the same Breaker).

  closed     its tasks run; each task that fails (not one cancelled) is remembered for
             `window_s`; `failures` of them within the window open the breaker;
  open       for `cooldown_s`, its queued tasks wait; new work for it (`run`, a write to
             `in`, a work_request or handoff mailed to it) is refused at write(2) with
             EHOSTDOWN and the reason; so are its model calls: nothing more is spent;
  half_open  after the cool-down its next task runs as the probe: done closes the
             breaker, failed opens it again for another cool-down.
`reset` in the agent's ctl (the operator's alone) closes it at once.

Events: `agent_breaker_opened` (the failures, the latest one's reason),
`agent_breaker_half_open` (the probe task), `agent_breaker_closed` (the probe succeeded,
or reset by the operator). The failures counted are the `task_failed` events, applied
at replay like the rest, with the events' wall-clock times: an agent cut off before a
remount stays cut off for the rest of its cool-down. Daemons and supervisors have no
breaker: their supervisor's intensity (kernel/supervisor.py) is theirs.

Manifest (no [breaker] table, or failures = 0: no breaker):
    [breaker]
    failures = 3        # failed tasks within
    window_s = 300      # this many seconds open it,
    cooldown_s = 60     # for this long; then one task probes
"""
import errno
import time

from ...errors import Fs9Error
from ..models.breaker import Breaker
from .. import cmd
from ..names import OPERATOR, one_line

DEFAULTS = {"failures": 0, "window_s": 300.0, "cooldown_s": 60.0}
CMD = cmd.Cmd("reset", "reset", usage="reset")  # the agent's ctl: close its breaker


def settings(manifest: dict) -> dict:
    """The manifest's [breaker] table, checked (EINVAL names the bad key)."""
    table = manifest.get("breaker", {})
    if not isinstance(table, dict) or set(table) - set(DEFAULTS):
        raise Fs9Error(errno.EINVAL, f"breaker must be a table of {', '.join(DEFAULTS)}")
    out = {}
    for key, default in DEFAULTS.items():
        value = table.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise Fs9Error(errno.EINVAL, f"breaker.{key} must be a number >= 0")
        out[key] = value
    if out["failures"] != int(out["failures"]):
        raise Fs9Error(errno.EINVAL, "breaker.failures must be a whole number")
    return out


def of(name: str, manifest: dict) -> Breaker:
    s = settings(manifest) if manifest["mode"] == "task" else DEFAULTS
    return Breaker(name, s["failures"], s["window_s"], s["cooldown_s"], kind="agent")


def check_new(agent) -> None:
    """New work for agent: refused (EHOSTDOWN, the reason) while its breaker is open or
    a probe task runs; once the cool-down is over, the work it brings may probe."""
    agent.breaker.admit(time.time())


def check_model_call(agent) -> None:
    """A model call of agent: refused while its breaker is open and cooling down (the
    probe task's calls go through: they are how it shows it works again)."""
    if agent is not None and agent.breaker.state == "open":
        agent.breaker.admit(time.time())


def wait_s(agent, now: float) -> float:
    """Seconds before agent's next queued task may start (0: now)."""
    b = agent.breaker
    return max(0.0, b.until() - now) if b.threshold > 0 and b.state == "open" else 0.0


def starting(kernel, agent, task) -> None:
    """agent's loop is about to run task: the probe, if the breaker is not closed."""
    b = agent.breaker
    if b.threshold <= 0 or b.state == "closed":
        return
    b.probing = task
    if b.state != "half_open":
        kernel.record("agent_breaker_half_open", agent=agent.name, task=task.id,
                      corr=task.corr)


def counts(task) -> bool:
    """A failure of task counts toward its agent's breaker: work the operator or the
    agent itself asked for. Work another agent (or OS) asked for does not, or a caller
    could cut off any agent it may give work to, the operator's work with it."""
    return not task.reply_to or task.reply_to == OPERATOR


def ended(kernel, e) -> None:
    """After a task_done or task_failed was recorded (live, not at replay): its probe
    closes the breaker, or a failure opens (or reopens) it."""
    agent, task = kernel.agents.get(e.agent), kernel.tasks.get(e.task)
    if agent is None or task is None or task.daemon or agent.breaker.threshold <= 0:
        return
    b, now = agent.breaker, time.time()
    probe = b.probing is task
    if probe:
        b.probing = None
    ids = dict(agent=agent.name, task=task.id, corr=task.corr)
    if e.kind == "task_done":
        if probe and b.state != "closed":
            kernel.record("agent_breaker_closed", reason=f"its probe task {task.id} "
                          "succeeded", **ids)
    elif not counts(task) and not probe:
        return
    elif b.should_open(now):
        why = task.reason or f"its program exited with status {task.exit}"
        kernel.record("agent_breaker_opened", failures=b.recent(now),
                      reason=one_line(f"task {task.id} failed: {why}"), **ids)


def reset(kernel, agent) -> None:
    """`reset` in the agent's ctl: close its breaker now (EINVAL if it is closed)."""
    if agent.breaker.state == "closed":
        raise Fs9Error(errno.EINVAL, f"agent {agent.name}'s circuit breaker is closed "
                                     "(nothing to reset)")
    kernel.record("agent_breaker_closed", agent=agent.name, reason="reset by the operator")


def status(agent, now: float) -> dict[str, str]:
    """The breaker's KEY=VALUE fields of the agent's status (`breaker=none`: none)."""
    return dict(line.split("=", 1) for line in agent.breaker.info(now))


class AgentBreakers:
    """The appliers of the agents' breaker events (the failures are task_failed's:
    lifecycle.py counts them)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def appliers(self) -> dict:
        return {"agent_breaker_opened": self._on_opened,
                "agent_breaker_half_open": self._on_half_open,
                "agent_breaker_closed": self._on_closed}

    def _on_opened(self, e, agent, task) -> None:
        if agent is not None:
            agent.breaker.open(e.ts, e.data.get("reason", ""))
            agent.changes.bump()

    def _on_half_open(self, e, agent, task) -> None:
        if agent is not None:
            agent.breaker.half_open()

    def _on_closed(self, e, agent, task) -> None:
        if agent is not None:
            agent.breaker.close()
            agent.changes.bump()  # its queued tasks may go
