"""The kernel: agents and tasks, rebuilt from and changed only through the event log.

Every change is `record(kind, ...)`: check that the state can take it (`refusal`:
the lifecycles of agents and tasks), append the event (committed), then `apply` it
to the in-memory state. Mounting again replays the same events through the same
`apply`, so the state after a crash is the state that was acknowledged. An event
replay cannot apply (logged by a past defect, or damaged) is set aside and reported
(log.py's set-aside store, `replay_set_aside` events, the root `err`), never fatal.
Tasks that were running when the daemon died are marked interrupted, then
re-queued (restart permanent/transient) or failed (temporary, daemon runs).
"""
import collections
import errno
import gc
import logging
import os
import shutil
import zlib
from typing import Callable

import trio

from ..drivers import confine
from ..errors import AGENT_EXISTS, NO_AGENT, Fs9Error
from . import cmd
from .agents import escapes, limits, sandbox as sandboxes, spawn
from .agents.agent import Agent
from .agents.memory import Memory
from .bus.bus import Bus
from .federation import link
from .federation.federation import Federation
from .log import Event, EventLog
from .names import one_line
from .rate import Burst, Rates
from .models.models import Models
from .stream import Stream
from .task import MOVES, Task
from .vault import beneath, search, watch

CMDS = (
    cmd.Cmd("spawn", "spawn", 1, None, usage="spawn NAME [KEY=VALUE ...]"),
    cmd.Cmd("kill", "kill", 1, 1, usage="kill NAME"),
    cmd.Cmd("halt", "halt", usage="halt"),
    cmd.Cmd("resume", "resume", usage="resume"),
    cmd.Cmd("dismiss", "dismiss", 1, 1, usage="dismiss SEQ|all"),
)
MAX_INPUT = 16 << 20  # bytes of one task's input
REFUSALS_PER_S = 50  # an agent's refusals logged one by one per second (then counted)
SET_ASIDE_REPORTED = 100  # set-aside events reported one by one at mount (the rest counted)
NEEDS_AGENT = {"kill", "agent_stop", "agent_exit", "agent_start", "agent_restart",
               "agent_failed", "priority", "task_queued"}  # (mail may be the operator's)
# Events logged for the record only: no state is rebuilt from them (the rest each have
# exactly one handler in a state holder's `appliers`; tests/test_units.py checks both).
AUDIT_ONLY = frozenset({
    "agent_step", "agent_unconfined", "audit_enabled", "audit_unavailable", "bug",
    "conversation_closed", "conversation_compacted", "conversation_opened", "declassified",
    "delivery_refused",
    "escape_attempt", "escape_denied", "injection_suspected", "mail_delivered", "mount",
    "mail_duplicate", "model_config_error", "model_error", "model_throttled",
    "model_unreachable", "refused", "replay_set_aside", "search_fallback",
    "search_index_damaged", "search_semantic", "set_aside_dismissed", "task_progress",
    "topics_config_error", "limit_exceeded", "limits_unavailable", "unmount",
    "unveil_denied", "vault_changed", "watch_restored", "watch_unavailable"})
Applier = Callable[[Event, "Agent | None", "Task | None"], None]
log = logging.getLogger("fs9.kernel")


class Unappliable(Exception):
    """An event the state cannot take (Kernel.refusal says why): at replay, set aside."""


def event_table(*holders) -> dict[str, Applier]:
    """One table from event kind to the handler that applies it, merged from each
    state holder's `appliers()`; a kind claimed twice is a defect."""
    table: dict[str, Applier] = {}
    for holder in holders:
        for kind, handler in holder.appliers().items():
            if kind in table or kind in AUDIT_ONLY:
                raise AssertionError(f"event {kind} has two handlers")
            table[kind] = handler
    return table


class Kernel:
    def __init__(self, state_dir: str, agents_dir: str, mount_path: str = "",
                 vault_dir: str = "", audit: bool = True) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.agents_dir = os.path.abspath(agents_dir)
        self.vault_dir = vault_dir and os.path.realpath(vault_dir)
        self.mount_path = mount_path
        self.audit = audit  # witness agents' refused syscalls through kernel audit
        self.mounted = trio.Event()  # the face serves mount_path: sandboxes can bind views
        self.spawns = 0  # spawn events so far
        self.instance = f"{zlib.crc32(self.state_dir.encode()):08x}"  # names its cgroups
        self.scratch_dir = ""  # agents' scratch folders (agents/sandbox.py), once made
        self.log = EventLog(self.state_dir)
        # this instance's uid range on the host, claimed for the life of the process
        self.uid_slot, self._uid_claim = confine.claim_uid_slot(self.state_dir)
        self.uid_offset = -1  # of the latest spawn's uid in the range
        self.agents: dict[str, Agent] = {}
        self.tasks: dict[int, Task] = {}
        self.tally: collections.Counter = collections.Counter()  # tasks by state
        self.halted = False
        self.bus = Bus(self)
        self.rates = Rates()  # per-agent rate limits (rate.py)
        self._refusals = Burst(REFUSALS_PER_S)  # an agent's refusals, counted per second
        self.killed: list[str] = []  # names of agents killed while mounted, in order
        # agent -> the vault subtrees its sandbox binds read-only from disk, where fs9
        # cannot filter reads by label (labels.check_claim); kept until every process of
        # that sandbox has ended (Agent.serve), a killed agent's too
        self.native_reads: dict[Agent, tuple[tuple[str, ...], ...]] = {}
        self._nursery: trio.Nursery | None = None
        self._replaying = False
        self._fresh_blob: tuple[int, bytes | None] = (0, None)
        # every vault file fs9 touches, for anyone, is reached beneath this fd (beneath.py)
        self.vault_root = beneath.VaultRoot(self.vault_dir) if self.vault_dir else None
        self.search = search.Search(self.vault_root, self.state_dir, self.log) \
            if self.vault_dir else None
        self.vault_changes = watch.OwnChanges(self.log, self.search)
        self.models = Models(self)
        self.memory = Memory(self)
        self.federation = Federation(self)  # off until joined (federation/ctl)
        self.handlers = event_table(self, self.bus, self.models, self.memory, self.federation)

    # --- lifetime --------------------------------------------------------------

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Replay the log, recover interrupted tasks, run every agent; until cancelled."""
        self._replay()
        self._recover()
        # The replayed state lives as long as the mount: keep the cyclic collector from
        # walking it again and again (a million tasks cost seconds-long pauses).
        gc.collect()
        gc.freeze()
        try:
            await self._serve(task_status)
        finally:  # the agents' loops have ended (their groups with them): their folders go
            if self.scratch_dir:
                shutil.rmtree(self.scratch_dir, ignore_errors=True)

    async def _serve(self, task_status) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if not self.audit:
                self.log.append("audit_unavailable", reason="fs9 mount --no-kernel-audit: "
                                "refused syscalls of confined agents are enforced, not logged")
            elif self.mount_path and confine.unavailable() is None and escapes.start_audit(self):
                nursery.start_soon(self._witness_denials)
            for agent in self.agents.values():
                nursery.start_soon(self._serve_agent, agent, name=f"agent {agent.name}")
            nursery.start_soon(self.log.keep_checkpointed)
            nursery.start_soon(self.bus.keep_deadlines)
            nursery.start_soon(link.serve, self.federation)
            await nursery.start(self.models.serve)
            nursery.start_soon(self._prune_memory)
            if self.search is not None:
                await nursery.start(self.search.serve)
                await nursery.start(watch.watch, self)
            task_status.started()
            await trio.sleep_forever()

    async def _serve_agent(self, agent: Agent) -> None:
        """Run one agent's loop; a defect in it fails that agent, not the whole kernel."""
        agent.serving = True
        try:
            await agent.serve()
        except Exception:
            agent.serving = False
            self.log.bug(f"agent {agent.name}", agent=agent.name)
            if self.agents.get(agent.name) is agent:
                self.record("agent_failed", agent=agent.name,
                            reason="internal error (see the bug event); start retries")

    async def _prune_memory(self) -> None:
        """Agents' notes past their max_age_days go (memory.py), checked hourly."""
        while True:
            for agent in list(self.agents.values()):
                self.memory.prune(agent)
            await trio.sleep(3600)

    async def _witness_denials(self) -> None:
        """Log what the kernel's audit says confined agents were denied; a defect here
        costs the witness, never the mount."""
        try:
            await escapes.watch_denials(self)
        except Exception:
            self.log.bug("watch_denials")
            self.log.append("audit_unavailable", reason="the audit witness failed (see bug)")

    def _replay(self) -> None:
        """Rebuild the state from the log. An event it cannot take is set aside (kept in
        the log, listed in its set-aside store, said in the server's log and, until the
        operator dismisses it, in a `replay_set_aside` event at every mount and the root
        `err`): everything else comes back."""
        aside: dict[int, tuple[str, str]] = {}
        self._replaying = True
        for event in self.log.replay(aside):
            try:
                self.apply(event)
            except Exception as e:  # a defect's event (Unappliable) or a damaged one
                reason = str(e) if isinstance(e, Unappliable) else f"{type(e).__name__}: {e}"
                aside[event.seq] = (event.kind, reason)
                log.warning("replay set aside event %d (%s): %s", event.seq, event.kind,
                            reason, exc_info=not isinstance(e, Unappliable))
        self._replaying = False
        self.log.keep_aside(aside)
        pending = self.log.set_aside()
        for r in pending[:SET_ASIDE_REPORTED]:
            self.log.append("replay_set_aside", agent=r.agent, task=r.task, event=r.seq,
                            event_kind=r.kind, reason=r.reason, found=r.found)
        if len(pending) > SET_ASIDE_REPORTED:
            self.log.append("replay_set_aside", not_shown=len(pending) - SET_ASIDE_REPORTED,
                            reason="more events set aside than reported one by one "
                                   "(the root err lists them all)")

    def _recover(self) -> None:
        for task in [t for t in self.tasks.values() if t.state == "running"]:
            ids = dict(agent=task.agent, task=task.id, corr=task.corr)
            self.record("task_interrupted", reason="fs9 stopped while the task ran", **ids)
            agent = self.agents.get(task.agent)
            if task.daemon or agent is None or agent.manifest["restart"] == "temporary":
                self.record("task_failed", reason="interrupted; not re-queued "
                            "(restart = temporary, a daemon run, or the agent is gone)", **ids)
            else:
                self.record("task_requeued", reason="interrupted; re-queued", **ids)

    # --- recording and applying events -----------------------------------------

    def record(self, kind: str, **fields) -> Event:
        """Log one state change, then apply it. Refused (the Fs9Error `refusal` gives;
        nothing logged) when the state cannot take it now, so the log never holds an event
        its replay would refuse: whatever a race between commands and an agent's loop
        asks for is either a legal change or a refused one."""
        refused = self.refusal(kind, fields.get("agent"), fields.get("task"))
        if refused is not None:
            raise refused
        event = self.log.append(kind, **fields)
        self._fresh_blob = (event.seq, fields.get("blob"))  # so apply need not read it back
        self.apply(event)
        return event

    def blob(self, e: Event) -> bytes:
        """The blob of event e: the one just recorded, else from the log (replay)."""
        seq, blob = self._fresh_blob
        return blob if seq == e.seq and blob is not None else self.log.blob(e.seq)

    def apply(self, e: Event) -> None:
        """Apply a logged event to the state; Unappliable when the state cannot take it
        (never an event record() let through: only a damaged or a defect's, at replay)."""
        handler = self.handlers.get(e.kind)
        if handler is None:
            return  # AUDIT_ONLY: for the record
        refused = self.refusal(e.kind, e.agent, e.task)
        if refused is not None:
            raise Unappliable(refused.text)
        handler(e, self.agents.get(e.agent) if e.agent else None,
                self.tasks.get(e.task) if e.task else None)

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

    def appliers(self) -> dict[str, Applier]:
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
        self.uid_offset = e.data.get("uid_offset", self.spawns % confine.SLOT_SIZE)
        agent = Agent(self, e.agent, e.data["manifest"], e.data["home"],
                      confine.uid_base(self.uid_slot) + self.uid_offset)
        agent.spawned_by = e.data.get("by")
        self.agents[agent.name] = agent
        if self._nursery is not None:
            self._nursery.start_soon(self._serve_agent, agent, name=f"agent {agent.name}")

    def _on_kill(self, e, agent, task):
        agent.killed = True
        for queued in list(agent.queue):
            self._end(queued, "cancelled", reason="agent killed")
        del self.agents[agent.name]
        self.rates.drop(agent.name)
        agent.changes.bump()
        if not self._replaying:
            self.killed.append(agent.name)

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
        if not agent.serving and self._nursery is not None:  # its loop died of a defect
            self._nursery.start_soon(self._serve_agent, agent, name=f"agent {agent.name}")

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
                    tallies=(self.tally,) if daemon else (self.tally, agent.tally))
        self.tasks[task.id] = task
        agent.tasks.append(task)
        agent.corrs.add(task.corr)
        if not daemon:
            agent.queue.append(task)
            if agent.runnable():
                agent.changes.bump()

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

    def _on_task_cancelled(self, e, agent, task):
        self._end(task, "cancelled", reason=e.data.get("reason", ""), ts=e.ts)

    def _on_task_interrupted(self, e, agent, task):
        self._end(task, "interrupted", reason=e.data.get("reason", ""), ts=e.ts)

    def _on_task_requeued(self, e, agent, task):
        task.move("queued")
        if agent is not None:
            agent.queue.appendleft(task)
            agent.changes.bump()

    def _end(self, task: Task, state: str, exit=None, reason: str = "", ts=None) -> None:
        task.move(state)
        task.exit, task.reason, task.ended_ts = exit, reason, ts
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

    def _bump_all(self) -> None:
        for agent in self.agents.values():
            agent.changes.bump()

    # --- root ctl ------------------------------------------------------------------

    def ctl(self, data: bytes, by: str | None = None) -> None:
        """The root ctl; `by`: the agent writing it through its view (None: the operator)."""
        parsed = cmd.parse(CMDS, data)
        names = set(self.agents)
        for p in parsed:  # every line is checked before any is applied
            if p.cmd.verb == "spawn":
                if by is not None:
                    spawn.check_words_of_agent(self.agent(by), p.args)
                manifest, _ = spawn.prepare(self, *p.args, by=by)
                if by is not None and manifest["unconfined"]:
                    raise Fs9Error(errno.EPERM, f"agent {by} may not start the unconfined "
                                                f"agent {p.args[0]}")
                if p.args[0] in names:
                    raise Fs9Error(errno.EEXIST, f"{AGENT_EXISTS}: {p.args[0]}")
                names.add(p.args[0])
            elif p.cmd.verb == "kill":
                if p.args[0] not in names or (by is not None and not self._reaches(by, p.args[0])):
                    raise Fs9Error(errno.ENOENT, f"{NO_AGENT}: {p.args[0]}")
                names.discard(p.args[0])
            elif p.cmd.verb == "dismiss":
                if by is not None:
                    raise Fs9Error(errno.EPERM, f"only the operator dismisses set-aside "
                                                f"events, not agent {by}")
                self._set_aside(p.args[0])
        for p in parsed:
            if p.cmd.verb == "spawn":
                self.spawn(*p.args, by=by)
            else:
                getattr(self, p.cmd.method)(*p.args)

    def _reaches(self, by: str, name: str) -> bool:
        """Agent `by` may end agent `name`: it is in by's view, or by spawned it. (Else
        `name` does not exist for it: the same ENOENT as a name nobody has.)"""
        target, asker = self.agents.get(name), self.agents.get(by)
        return target is not None and asker is not None and (
            target.spawned_by == by or asker.view.access(("agents", name)) is not None)

    def knows(self, by: str, name: str) -> bool:
        """Agent `by` may know that agent `name` exists: it is itself; by's view shows
        something of agents/NAME or of a vault subtree NAME owns; by pledges discover
        (the registry lists every agent); by started it; or it asked by for by's
        current task. To by, any other agent answers everywhere as a name nobody has
        (docs/security.md)."""
        asker, target = self.agents.get(by), self.agents.get(name)
        if asker is None or target is None:
            return False
        view = asker.view
        return (name == by or "discover" in view.pledges or target.spawned_by == by
                or view.access(("agents", name)) is not None
                or any(view.access(owned) is not None for owned in target.view.owns)
                or (asker.current is not None and asker.current.reply_to == name))

    def spawn(self, name: str, *overrides: str, by: str | None = None) -> Agent:
        manifest, home = spawn.prepare(self, name, *overrides, by=by)
        os.makedirs(home, exist_ok=True)
        self.record("spawn", agent=name, manifest=manifest, home=home,
                    uid_offset=sandboxes.free_uid_offset(self), **({"by": by} if by else {}))
        return self.agents[name]

    def kill(self, name: str) -> None:
        agent = self.agent(name)
        self.record("kill", agent=name)
        agent._cancel_run("cancelled")

    def halt(self) -> None:
        self.record("halt")
        for agent in self.agents.values():
            agent._cancel_run("requeue")
        self.models.halt()

    def resume(self) -> None:
        self.record("resume")

    def dismiss(self, which: str) -> None:
        """The operator has seen set-aside event SEQ (or all of them): stop reporting it.
        It stays in the log, set aside at every replay."""
        seqs = self._set_aside(which)
        self.log.append("set_aside_dismissed", events=seqs)
        self.log.dismiss(seqs)

    def _set_aside(self, which: str) -> list[int]:
        """The set-aside events `which` (SEQ or all) names, not dismissed yet; else ENOENT."""
        pending = [r.seq for r in self.log.set_aside()]
        if which == "all" and pending:
            return pending
        if which.isascii() and which.isdigit() and int(which) in pending:
            return [int(which)]
        raise Fs9Error(errno.ENOENT, f"no set-aside event {which!r} to dismiss "
                                     f"(the root err lists them)")

    def err(self) -> str:
        """The root `err`: the events replay set aside and the operator has not dismissed,
        one line each."""
        return "".join(f"fs9: {r.describe()}; dismiss with: echo 'dismiss {r.seq}' > ctl\n"
                       for r in self.log.set_aside())

    # --- services for the face ----------------------------------------------------

    def agent(self, name: str, by: str | None = None) -> Agent:
        """Agent NAME, as `by` (an agent; None: the operator) may name it: ENOENT if
        there is none, and the very same answer where by may not know of it."""
        agent = self.agents.get(name)
        if agent is None or (by is not None and not self.knows(by, name)):
            raise Fs9Error(errno.ENOENT, f"{NO_AGENT}: {name}")
        return agent

    def owner_of(self, path: tuple[str, ...]) -> str | None:
        """The agent owning vault path (claims never overlap); None: only the operator
        may change it."""
        for agent in self.agents.values():
            if any(path[:len(prefix)] == prefix for prefix in agent.view.owns):
                return agent.name
        return None

    def guarded(self, fn, *args, agent: str | None = None, file: str = "ctl"):
        """Run a request; a refusal is logged (and shown in the agent's err) and re-raised."""
        try:
            return fn(*args)
        except Fs9Error as e:
            self.refused(e, agent=agent, file=file)
            raise

    def refused(self, e: Fs9Error, *, agent: str | None = None, file: str = "ctl") -> None:
        """Say why a request was refused: an event, and a line in the agent's err. An
        agent's refusals past REFUSALS_PER_S in one second are counted, not logged one by
        one: the next one logged says how many (`coalesced`), so a loop of refused calls
        cannot flood the log. The reason is one line (a name in it may hold anything)."""
        extra = {} if agent is None else self._refusals.admit(
            agent, int(trio.current_time()) if self._nursery is not None else 0)
        if extra is None:
            return
        reason = one_line(e.text)
        self.log.append("refused", agent=agent, file=file,
                        errno=errno.errorcode.get(e.errno, str(e.errno)), reason=reason, **extra)
        if agent in self.agents:
            self.agents[agent].diag(reason)

    def submit(self, agent: Agent, data: bytes | None, *, corr: str | None = None,
               reply_to: str = "", request: str = "") -> Task:
        """Queue a task with input `data` (None: a daemon run). Returns once logged.
        A task made from a work_request carries its correlation id, the requester to
        send the result to (reply_to) and the request's message id."""
        if data is not None and len(data) > MAX_INPUT:
            raise Fs9Error(errno.EFBIG, f"task input over {MAX_INPUT} bytes")
        if agent.killed:  # `in` opened before the kill
            raise Fs9Error(errno.ENOENT, f"{NO_AGENT}: {agent.name} (killed)")
        if agent.daemon and data is not None:
            raise Fs9Error(errno.EINVAL, f"{agent.name} is a daemon agent and takes no tasks")
        tid = self.log.next_seq
        extra = dict(reply_to=reply_to, request=request) if reply_to else {}
        self.record("task_queued", agent=agent.name, task=tid, corr=corr or os.urandom(8).hex(),
                    blob=data or b"", daemon=data is None, **extra)
        return self.tasks[tid]

    def task_input(self, task: Task) -> bytes:
        return self.log.blob(task.id)  # a task's id is the seq of its task_queued event

    def stream(self, task: Task, fd: int) -> Stream:
        """The task's stdout (1) or stderr (2) stream, loaded from the log if need be."""
        attr = "out" if fd == 1 else "err"
        if getattr(task, attr) is None:
            setattr(task, attr, Stream(self.log.chunks(task.id, task.attempt, fd),
                                       ended=task.state != "running"))
        return getattr(task, attr)

    def emit(self, task: Task, fd: int, data: bytes) -> None:
        self.log.add_chunk(task.id, task.attempt, fd, data)
        self.stream(task, fd).append(data)

    def status(self) -> str:
        return "".join(a.status_line() for a in sorted(self.agents.values(), key=lambda a: a.name))

    def state_line(self) -> str:
        t = self.tally
        return (f"state={'halted' if self.halted else 'running'} pid={os.getpid()} "
                f"agents={len(self.agents)} queued={t['queued']} running={t['running']} "
                f"done={t['done']} failed={t['failed']} events={self.log.last_seq}\n")

