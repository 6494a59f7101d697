"""The lifecycles of agents and tasks, as the event log records them.

Every change is `record(kind, ...)`: `refusal` checks that the state can take it now (an
agent is spawned once and exists until killed; a task is queued once, then moves as
task.py's table allows), the log appends it (committed), then `apply` runs its handler
(`appliers`, one per kind, merged into the kernel's event table). Replay applies the
same events through the same handlers; one the state cannot take there is Unappliable
(kernel.py sets it aside). A part of Kernel (kernel.py), which holds the state these
handlers change: agents, tasks, the log, the event table, its counters.
"""
import errno
import shutil
from typing import Callable

from ..drivers import uidslots
from ..errors import AGENT_EXISTS, NO_AGENT, Fs9Error
from . import finished
from .agents import breaker as breakers, limits
from .agents.agent import Agent
from .log import Event
from .stream import Stream
from .task import MOVES, Task

NEEDS_AGENT = {"kill", "agent_stop", "agent_exit", "agent_start", "agent_restart",
               "agent_failed", "priority", "task_queued"}  # (mail may be the operator's)


class Unappliable(Exception):
    """An event the state cannot take (Lifecycles.refusal says why): at replay, set aside."""


class Lifecycles:
    """Kernel's recording and applying of agent and task events (a mixin of Kernel)."""

    def record(self, kind: str, trim_below: int | None = None, **fields) -> Event:
        """Log one state change, then apply it. Refused (the Fs9Error `refusal` gives;
        nothing logged) when the state cannot take it now, so the log never holds an event
        its replay would refuse: whatever a race between commands and an agent's loop
        asks for is either a legal change or a refused one. trim_below: the blobs kept in
        the event's `keep` stream below it go in the same commit (a topic's publish)."""
        refused = self.refusal(kind, fields.get("agent"), fields.get("task"))
        if refused is not None:
            raise refused
        event = self.log.append(kind, **fields) if trim_below is None else \
            self.log.append_trimming(kind, below=trim_below, **fields)
        self._fresh_blob = (event.seq, fields.get("blob"))  # so apply need not read it back
        self.apply(event, checked=True)
        if kind in ("task_done", "task_failed"):  # an agent's breaker decides (live only)
            breakers.ended(self, event)
        return event

    def record_many(self, items: list[tuple[str, dict]]) -> list[Event]:
        """Log several state changes in one commit, then apply them in order: all, or none
        (refused as record() refuses, checked against the state before the first: the
        callers' changes do not depend on each other)."""
        for kind, fields in items:
            refused = self.refusal(kind, fields.get("agent"), fields.get("task"))
            if refused is not None:
                raise refused
        events = self.log.append_many(items)
        for event, (_, fields) in zip(events, items):
            self._fresh_blob = (event.seq, fields.get("blob"))
            self.apply(event, checked=True)
        return events

    def blob(self, e: Event) -> bytes:
        """The blob of event e: the one just recorded, else from the log (replay)."""
        seq, blob = self._fresh_blob
        return blob if seq == e.seq and blob is not None else self.log.blob(e.seq)

    def apply(self, e: Event, checked: bool = False) -> None:
        """Apply a logged event to the state; Unappliable when the state cannot take it
        (never an event record() let through: only a damaged or a defect's, at replay).
        checked: record() has just asked `refusal` of this state."""
        handler = self.handlers.get(e.kind)
        if handler is None:
            return  # AUDIT_ONLY: for the record (and not replayed from a snapshot)
        self.plan.keep(e.seq)  # (one set aside stays in the plan: re-examined, reported)
        refused = None if checked else self.refusal(e.kind, e.agent, e.task)
        if refused is not None:
            raise Unappliable(refused.text)
        if e.kind in MOVES:
            self.tasks[e.task].seqs.append(e.seq)
        handler(e, self.agents.get(e.agent) if e.agent else None,
                self.tasks.get(e.task) if e.task else None)
        self.metrics.applied[e.kind] += 1

    def refusal(self, kind: str, agent: str | None, task: int | None) -> Fs9Error | None:
        """Why the state cannot take an event `kind` naming agent and task now (None: it
        can). The lifecycles it checks: an agent is spawned once and then exists until
        killed; a task is queued once, then moves as task.py's table allows. (The bus's,
        models' and memory's appliers take any event: nothing to check.)"""
        if kind == "spawn" and (agent is None or agent in self.agents):
            return Fs9Error(errno.EEXIST, f"{kind} refused: {AGENT_EXISTS}: {agent}")
        if kind in NEEDS_AGENT and agent not in self.agents:
            return Fs9Error(errno.ENOENT, f"{kind} refused: {NO_AGENT}: {agent}")
        if kind == "task_queued" and (task is None or task in self.tasks):
            return Fs9Error(errno.EEXIST, f"{kind} refused: task {task} exists")
        if kind in MOVES:
            known = self.tasks.get(task)
            if known is None:
                return Fs9Error(errno.ENOENT, f"{kind} refused: no task {task}")
            why = known.refusal(MOVES[kind])
            if why:
                return Fs9Error(errno.EINVAL, f"{kind} refused: {why}")
        return None

    def appliers(self) -> dict[str, Callable]:
        """The events that change agents and tasks (the bus, models and memory declare
        their own)."""
        return {
            "spawn": self._on_spawn, "kill": self._on_kill, "halt": self._on_halt,
            "resume": self._on_resume, "agent_stop": self._on_agent_stop,
            "agent_exit": self._on_agent_exit, "agent_start": self._on_agent_start,
            "agent_restart": self._on_agent_restart, "agent_failed": self._on_agent_failed,
            "priority": self._on_priority, "task_queued": self._on_task_queued,
            "task_started": self._on_task_started, "task_done": self._on_task_done,
            "task_failed": self._on_task_failed, "task_cancelled": self._on_task_cancelled,
            "task_interrupted": self._on_task_interrupted,
            "task_requeued": self._on_task_requeued,
        }

    def _on_spawn(self, e, agent, task):
        self.spawns += 1
        # (an older log has no uid_offset: the spawn count gave it)
        self.uid_offset = e.data.get("uid_offset", self.spawns % uidslots.SLOT_SIZE)
        self.uid_reserve.given(self.uid_offset)
        agent = Agent(self, e.agent, e.data["manifest"], e.data["home"],
                      uidslots.uid_base(self.uid_slot) + self.uid_offset)
        agent.spawn_seq = e.seq
        if not self._replaying:  # a sandbox made ahead for its uid, if the spawn took one
            agent.pooled = self.sandbox_pool.hand(agent.uid)
        agent.spawned_by = e.data.get("by")
        agent.supervisor = e.data.get("supervisor")  # (kernel/supervision.py)
        self.agents[agent.name] = agent
        self.of_home[agent.home] += 1
        self.uids[agent.uid] = agent
        if agent.spawned_by is not None:
            self.spawned_by[agent.spawned_by] += 1
        self.memory.spawned(agent)
        self.bus.subscribed(agent)
        self.owners.update(dict.fromkeys(agent.view.owns, agent.name))
        self.owned_depth = max([self.owned_depth, *map(len, agent.view.owns)])
        if not agent.on_demand:  # (an on-demand one sleeps until work comes)
            self.start_loop(agent)

    def _on_kill(self, e, agent, task):
        agent.killed = True
        for queued in list(agent.queue):
            self._end(queued, "cancelled", reason="agent killed")
        del self.agents[agent.name]
        finished.killed(self, agent)
        self.bus.unsubscribed(agent)
        _drop(self.of_home, agent.home)
        if self.uids.get(agent.uid) is agent:
            del self.uids[agent.uid]
        if agent.spawned_by is not None:
            _drop(self.spawned_by, agent.spawned_by)
        if agent.serving:  # its loop ends in its own time: its uid is held until then
            self.uids_ending.add(agent.uid)
        for prefix in agent.view.owns:
            self.owners.pop(prefix, None)
        self.rates.drop(agent.name)
        agent.changes.bump()
        if not self._replaying:
            self.killed.append(agent.name)
            if not agent.serving and self.scratch_dir:  # asleep: no loop to clear it
                shutil.rmtree(agent.scratch, ignore_errors=True)

    def _on_halt(self, e, agent, task):
        self.halted = True
        self._bump_all()

    def _on_resume(self, e, agent, task):
        self.halted = False
        self._bump_all()

    def _on_agent_stop(self, e, agent, task):
        agent.stopped = True

    def _on_agent_exit(self, e, agent, task):
        agent.stopped = True

    def _on_agent_start(self, e, agent, task):
        agent.stopped, agent.failed = False, ""
        agent.window = agent.new_window()  # a start by hand gives the supervisor a clean slate
        agent.changes.bump()
        if agent.on_demand:
            agent.wake()
        elif not agent.serving:  # its loop died of a defect
            self.start_loop(agent)

    def _on_agent_restart(self, e, agent, task):
        agent.restarts += 1

    def _on_agent_failed(self, e, agent, task):
        agent.failed = e.data["reason"]

    def _on_priority(self, e, agent, task):
        agent.priority = e.data["priority"]
        if agent.group is not None:  # its CPU share follows (agents/limits.py)
            agent.group.set_cpu_weight(limits.CPU_WEIGHT[agent.priority])

    def _on_task_queued(self, e, agent, task):
        daemon = e.data.get("daemon", False)
        task = Task(e.task, e.agent, e.corr, daemon=daemon, queued_ts=e.ts,
                    reply_to=e.data.get("reply_to", ""), request=e.data.get("request", ""),
                    asker=e.data.get("asker", ""),
                    tallies=(self.tally,) if daemon else (self.tally, agent.tally))
        task.seqs.append(e.seq)
        self.tasks[task.id] = task
        agent.tasks.append(task)
        agent.corrs.add(task.corr)
        if not daemon:
            agent.queue.append(task)
            if agent.runnable():
                agent.changes.bump()
                agent.wake()

    def _on_task_started(self, e, agent, task):
        task.move("running")
        task.attempt, task.started_ts, task.exit, task.reason = e.data["attempt"], e.ts, None, ""
        task.out, task.err = (None, None) if self._replaying else (Stream(), Stream())
        if agent is not None:
            if task in agent.queue:
                agent.queue.remove(task)
            agent.current = task

    def _on_task_done(self, e, agent, task):
        self._end(task, "done", e.data.get("exit"), ts=e.ts)

    def _on_task_failed(self, e, agent, task):
        self._end(task, "failed", e.data.get("exit"), e.data.get("reason", ""), e.ts)
        if agent is not None and not task.daemon and agent.breaker.threshold > 0 \
                and breakers.counts(task):
            agent.breaker.failed(e.ts)  # (agents/breaker.py)

    def _on_task_cancelled(self, e, agent, task):
        self._end(task, "cancelled", reason=e.data.get("reason", ""), ts=e.ts)

    def _on_task_interrupted(self, e, agent, task):
        self._end(task, "interrupted", reason=e.data.get("reason", ""), ts=e.ts)

    def _on_task_requeued(self, e, agent, task):
        task.move("queued")
        if agent is not None:
            agent.queue.appendleft(task)
            agent.changes.bump()
            agent.wake()

    def _end(self, task: Task, state: str, exit=None, reason: str = "", ts=None) -> None:
        task.move(state)
        task.exit, task.reason, task.ended_ts = exit, reason, ts
        self.metrics.task_ended(task)
        for stream in (task.out, task.err):
            if stream is not None:
                stream.end()
        agent = self.agents.get(task.agent)
        if agent is not None:
            if agent.current is task:
                agent.current = None
            if task in agent.queue:
                agent.queue.remove(task)
            agent.changes.bump()
        finished.ended(self, task)  # (the oldest finished past the latest few retire)

    def _bump_all(self) -> None:
        for agent in self.agents.values():
            agent.changes.bump()
            agent.wake()


def _drop(counter, key) -> None:
    """One fewer of key (gone at zero: a counter of every name ever seen would grow)."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
