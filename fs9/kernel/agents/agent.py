"""An agent: its manifest, its task queue and the loop that runs its work.

State lives in plain fields changed only by Kernel.apply (from logged events);
the loop here decides what to do next and asks the kernel to record it. The
runtime-only parts (cancel scope of the current run, pid) are never logged.
"""
import collections
import contextlib
import errno
import json
import os
import shutil
import time

import trio

from ... import drivers
from ...drivers import cgroups, confine
from ...errors import NO_AGENT, Fs9Error
from .. import cmd
from . import breaker as breakers, escapes, limits, manifest as manifests, sandbox as sandboxes
from ..models.budget import Limits
from ..bus.mailbox import Mailbox
from ..latest import Latest
from ..stream import Changes
from .. import supervision
from ..supervisor import RestartWindow
from ..task import Task
from . import view as views
from .ondemand import OnDemand
from .shown import Shown
from .run import Runs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import pool
    from ..kernel import Kernel

CORRS_KEPT = 10_000  # correlation ids an agent may carry on: its latest tasks' and mail's

CMDS = (
    cmd.Cmd("run", "run", 1, 1, rest=True, usage="run TEXT"),
    cmd.Cmd("stop", "stop", usage="stop"),
    cmd.Cmd("start", "start", usage="start"),
    cmd.Cmd("restart", "restart", usage="restart"),
    cmd.Cmd("kill", "kill", usage="kill"),
    cmd.Cmd("priority", "set_priority", 1, 1,
            usage="priority interactive|normal|background"),
    breakers.CMD,
)


RANKS = ("background", "normal", "interactive")  # priorities, lowest first


def _not_json(word: str):
    raise ValueError(f"{word} is not JSON")


class Agent(Runs, OnDemand, Shown):
    def __init__(self, kernel: "Kernel", name: str, manifest: dict, home: str, uid: int) -> None:
        self.kernel = kernel
        self.name = name
        # (a manifest logged by an older fs9 may lack keys added to the defaults since)
        self.manifest = {**manifests.DEFAULTS, **manifest}
        self.driver = drivers.of(self.manifest)  # how its programs run
        self.home = home  # working directory of its program
        self.uid = uid  # its programs' uid, when confined
        self.view = views.parse(name, manifest)
        self.budget = Limits.of(manifest.get("budget", {}), "budget")  # model use (kernel/models/budget.py)
        self.confined = not manifest.get("unconfined", False)
        self.priority = manifest["priority"]
        self.stopped = False  # by `stop`, or a daemon that exited for good
        self.failed = ""  # reason, once the supervisor gave up
        self.killed = False
        self.restarts = 0
        self.breaker = breakers.of(name, self.manifest)  # cut off if its tasks keep failing
        self.tasks: list[Task] = []  # its tasks in memory, oldest first (finished.py)
        self.finished: collections.deque[Task] = collections.deque()  # in end order
        self.spawn_seq = 0  # its spawn event's: a task numbered above it is its own
        self.tally: collections.Counter = collections.Counter()  # its tasks by state
        self.queue: collections.deque[Task] = collections.deque()
        self.current: Task | None = None
        self.mailbox = Mailbox()
        if self.manifest["start"] == "on-demand":
            self.mailbox.on_put = self._mail_came
        # correlation ids it may carry on: its latest tasks' and mail's
        self.corrs: Latest = Latest(CORRS_KEPT)
        self.spawned_by: str | None = None  # the agent that started it (None: the operator)
        self.supervises = self.manifest["mode"] == "supervisor"  # runs no program
        self.supervisor: str | None = None  # the supervisor it is a child of (None: the kernel)
        self.notes = bytearray()  # refused commands, shown after the task's stderr in `err`
        self.changes = Changes()  # anything that may let the loop go on
        # runtime only
        self.told_unconfined = False
        self.serving = False  # its loop runs (Kernel._serve_agent); not: asleep, or dead
        self._idled = False  # an on-demand daemon's run ended for want of mail: sleep now
        self._no_sandbox = ""  # why its sandbox did not start, for the run that needed it
        self.window = self.new_window()  # daemon restarts, for the supervisor's intensity
        self._sandbox: confine.Sandbox | None = None
        self.pooled: "pool.Entry | None" = None  # its sandbox made ahead, until started
        self._daemon_run: Task | None = None  # a daemon's latest run
        self._resources: contextlib.AsyncExitStack | None = None  # the sandbox's lifetime
        self.group: cgroups.Group | None = None  # its programs' control group, while confined
        self.limits = limits.of(self.manifest)
        self._exceeded = ""  # the limit that ended the current run (limits.reason)
        self._baseline: dict[str, int] = {}  # the group's counters when the run started
        self._run_scope: trio.CancelScope | None = None
        self._cancel_as = ""  # what a cancelled run becomes: "cancelled" | "requeue"

    @property
    def holder(self) -> str:
        """Who owns what it keeps (its memory): its name, definition and clearance,
        never a name alone that anyone with the spawn pledge could take again."""
        return f"{self.name}|{self.home}|{self.manifest['clearance']}"

    def new_window(self) -> RestartWindow:
        return RestartWindow(self.manifest["max_restarts"], self.manifest["within_s"])

    @property
    def daemon(self) -> bool:
        """It takes no tasks (a daemon runs on its own; a supervisor runs nothing)."""
        return self.manifest["mode"] != "task"

    # --- ctl verbs (checked first, then recorded) ----------------------------

    def ctl(self, data: bytes, by: str | None = None) -> None:
        """Its ctl file; `by`: the agent writing it through its view (None: the operator)."""
        parsed = cmd.parse(CMDS, data)
        if by is not None and supervision.children(self.kernel, self):
            raise Fs9Error(errno.EPERM, f"agent {by} may not command the supervisor "
                                        f"{self.name}: supervision trees are the operator's")
        for p in parsed:  # every line is checked before any is applied
            self.check(p, last=p is parsed[-1])
            if by is not None and p.cmd.verb == "run":  # work handed on, as by `in`
                self.kernel.bus.check_input(self, by, len(p.args[0].encode()))
            if by is not None and p.cmd.verb == "reset":
                raise Fs9Error(errno.EPERM, f"only the operator resets {self.name}'s "
                                            f"circuit breaker, not agent {by}")
            if by is not None and p.cmd.verb == "priority" and \
                    RANKS.index(p.args[0]) > RANKS.index(self.priority):
                raise Fs9Error(errno.EPERM, f"agent {by} may lower {self.name}'s priority, "
                                            f"not raise it ({self.priority} -> {p.args[0]})")
        if by is not None:  # each line an event: an agent's, its own ctl too, at a rate
            self.kernel.rates.take(by, "commands", len(data), time.monotonic(),
                                   count=len(parsed))
        for p in parsed:
            getattr(self, p.cmd.method)(*p.args)

    def check(self, p: cmd.Parsed, last: bool) -> None:
        if self.killed:  # a file opened before the kill
            raise Fs9Error(errno.ENOENT, f"{NO_AGENT}: {self.name} (killed)")
        if p.cmd.verb == "kill" and not last:
            raise Fs9Error(errno.EINVAL, f"nothing may follow kill in one write: {p.line!r}")
        if p.cmd.verb == "kill" and self.kernel.cluster is not None:
            self.kernel.cluster.refuse_kill(self.name)
        if p.cmd.verb == "run" and self.daemon:
            raise Fs9Error(errno.EINVAL, f"{self.name} is a {self.manifest['mode']} agent "
                                         "and takes no tasks")
        if p.cmd.verb == "priority" and p.args[0] not in manifests.PRIORITIES:
            raise Fs9Error(errno.EINVAL, f"bad priority {p.args[0]!r}: usage: {p.cmd.usage}")

    def run(self, text: str) -> Task:
        return self.kernel.submit(self, (text + "\n").encode())

    def stop(self, reason: str = "") -> None:
        # a supervisor's stop, start and restart act on its subtree (kernel/supervision.py)
        for child in reversed(supervision.children(self.kernel, self)):
            supervision.stop_tree(self.kernel, child,
                                  reason or f"its supervisor {self.name} stopped")
        self.kernel.record("agent_stop", agent=self.name, **({"reason": reason} if reason else {}))
        self._cancel_run("cancelled")

    def start(self) -> None:
        supervision.start_tree(self.kernel, self)

    def fence(self, reason: str) -> None:
        """Stop, its running task re-queued, not failed: the cluster's fence
        (kernel/cluster/cluster.py), which starts it again if it is still its node's."""
        self.kernel.record("agent_stop", agent=self.name, reason=reason)
        self._cancel_run("requeue")

    def restart(self) -> None:
        if self.supervises:
            supervision.restart_tree(self.kernel, self)
            return
        self.kernel.record("agent_restart", agent=self.name)
        self._cancel_run("requeue")

    def kill(self) -> None:
        self.kernel.kill(self.name)

    def reset(self) -> None:
        breakers.reset(self.kernel, self)

    def set_priority(self, priority: str) -> None:
        self.kernel.record("priority", agent=self.name, priority=priority)

    def steps(self, data: bytes) -> None:
        """agents/NAME/steps: each line (JSON) an `agent_step` event of its current task.
        A step `injection_suspected` stops the agent if its manifest says so."""
        task = self.current
        ids = dict(agent=self.name, task=task.id if task else None,
                   corr=task.corr if task else None)
        log = self.kernel.log
        lines = [line for line in data.decode(errors="replace").split("\n") if line.strip()]
        # each line is an event: a write of many short lines is held to the rate as many
        self.kernel.rates.take(self.name, "steps", len(data), time.monotonic(),
                               count=len(lines))
        for line in lines:
            try:  # (NaN and Infinity are not JSON to the log's readers: a note)
                step = json.loads(line, parse_constant=_not_json)
            except (ValueError, RecursionError):  # (too deeply nested: RecursionError)
                step = None
            if not isinstance(step, dict):
                step = {"kind": "note", "text": line[:4096]}
            log.append("agent_step", step=step, **ids)
            if step.get("kind") == "injection_suspected":
                log.append("injection_suspected", source=step.get("source"),
                           patterns=step.get("patterns"), **ids)
                if self.manifest.get("on_injection") == "stop" and not self.stopped:
                    self.stop("on_injection = stop: a suspected prompt injection")

    def _cancel_run(self, as_: str) -> None:
        if self._run_scope is not None:
            self._cancel_as = as_
            self._run_scope.cancel()

    # --- the loop --------------------------------------------------------------

    def runnable(self) -> bool:
        return not (self.stopped or self.failed or self.killed or self.kernel.halted)

    async def serve(self) -> None:
        """Run this agent's work until it is killed (or the kernel shuts down); an
        on-demand agent's until it sleeps (its sandbox and control group go with it)."""
        if not self.confined and not self.told_unconfined:
            self.told_unconfined = True  # (once a mount, not at every wake)
            self.kernel.log.append("agent_unconfined", agent=self.name,
                                   reason="unconfined = true in its manifest")
        try:
            try:
                async with contextlib.AsyncExitStack() as self._resources:
                    try:
                        await self._loop()
                    finally:
                        self._sandbox = None
            finally:  # its sandbox has ended (its end kills every process of its uid)
                if self.pooled is not None:  # made ahead, never started: closed unused
                    entry, self.pooled = self.pooled, None
                    self.group = self.group or entry.group
                    with trio.CancelScope(shield=True):
                        await self.kernel.sandbox_pool.drop(entry)
                if self.group is not None:  # then its control group goes, emptied
                    group, self.group = self.group, None
                    with trio.CancelScope(shield=True):  # (most often empty by now;
                        if not await self.kernel.empty_groups.remove(group):  # else in
                            await trio.to_thread.run_sync(group.remove)  # parallel)
                if self.killed:
                    shutil.rmtree(self.scratch, ignore_errors=True)
        finally:  # its sandbox is gone: nothing reads the vault from disk for it now
            self.kernel.native_reads.pop(self, None)
            if self.killed:  # nothing of it runs or starts now: its uid may be given again
                self.kernel.uids_ending.discard(self.uid)

    @property
    def scratch(self) -> str:
        """The confined agent's only writable folder on disk (HOME, TMPDIR): in fs9's own
        root-owned folder (agents/sandbox.py), where no other user can plant a link."""
        return sandboxes.scratch_of(self.kernel, self.uid)

    def started_sandbox(self) -> "confine.Sandbox | None":
        """The sandbox the loop started for this run (None: unconfined); SandboxError
        with the reason it did not start. A run never starts one itself: the sandbox
        outlives the run, so its nursery may not open inside the run's cancel scope."""
        if not self.confined:
            return None
        if self._sandbox is None or self._sandbox.closed:
            raise confine.SandboxError(self._no_sandbox or (
                self._sandbox.closed if self._sandbox is not None else "it is not started"))
        return self._sandbox

    async def sandbox(self) -> "confine.Sandbox | None":
        """The agent's sandbox, started on first use; None when it runs unconfined."""
        if not self.confined:
            return None
        if self._sandbox is None or self._sandbox.closed:
            why = confine.unavailable()
            if why:
                raise confine.SandboxError(f"{why}; set unconfined = true in the manifest "
                                           "to run it without confinement")
            for path in (self.kernel.mount_path, self.workdir()):
                blocked = confine.unreachable(path)
                if blocked:
                    raise confine.SandboxError(
                        f"its uid cannot reach {path}: {blocked} is closed to other users "
                        f"(chmod o+x {blocked}, or mount and keep agents elsewhere)")
            await self.kernel.mounted.wait()
            entry, self.pooled = self.pooled, None  # its sandbox made ahead (pool.py)
            pooled = self.kernel.sandbox_pool.started(entry) if entry is not None else None
            if pooled is None:  # (one made ahead has its first program in its group)
                sandboxes.begin_group_moves(self.kernel)
            try:
                if entry is None:  # (one made ahead made its scratch folder and group)
                    sandboxes.make_scratch(self.scratch, self.uid)
                if self.group is None or entry is not None:
                    self.group = sandboxes.make_group(self, entry and entry.group,
                                                      entry and entry.limits)
                # (a few at a time, room kept for the operator's: starts.py; one made
                # ahead was made in such a place)
                async with self.kernel.sandbox_starts.place(self.spawned_by is not None) \
                        if pooled is None else contextlib.nullcontext():
                    if self.killed:  # while it waited its turn: no start for a dead agent
                        raise confine.SandboxError("the agent was killed")
                    self._sandbox = await self._resources.enter_async_context(
                        confine.Sandbox.open(sandboxes.spec(self.kernel, self),
                                             lambda report: escapes.attempt(self.kernel,
                                                                            self, report),
                                             self.kernel.forkserver, pooled))
            except BaseException:
                if pooled is not None:  # (not handed over: closed unused; else a no-op)
                    await pooled.close()
                raise
        return self._sandbox

    async def _loop(self) -> None:
        while not self.killed:
            if self.on_demand and not self.wanted():
                if not await self._idle():
                    return  # asleep
                continue
            if not self.runnable() or self.supervises or (not self.daemon and not self.queue):
                if self.pooled is not None and self.runnable():
                    # its sandbox made ahead is started now, not at its first task,
                    # which then finds it ready (its processes are there already)
                    await self._start_sandbox()
                    continue
                await self.changes.wait_past(self.changes.version)
                continue
            if not self.daemon:
                task = self.queue[0]
                cooling = breakers.wait_s(self, time.time())
                if cooling:  # its breaker is open: the queue waits (agents/breaker.py)
                    with trio.move_on_after(cooling):
                        await self.changes.wait_past(self.changes.version)
                    continue
            elif self._daemon_run is not None and self._daemon_run.state == "queued":
                task = self._daemon_run  # submitted before its sandbox was ready
            else:
                task = self._daemon_run = self.kernel.submit(self, None)
            if self.confined and (self._sandbox is None or self._sandbox.closed):
                # before the task starts, so a running task always has a pid
                if await self._start_sandbox():
                    continue  # look again: much may have happened meanwhile
                # execute fails the task with the reason, if it is still to run: a
                # kill, stop or halt while the sandbox was starting may have ended it
                if task.state != "queued" or not self.runnable():
                    continue
            if not self.daemon:
                breakers.starting(self.kernel, self, task)
            status = await self.execute(task)
            if not self.daemon:
                continue
            if status is None or not self.runnable():
                continue  # stopped, restarted or halted by a command
            supervision.exited(self.kernel, self, status)  # restarted, or not, as decided

    async def _start_sandbox(self) -> bool:
        """Start its sandbox; False if it did not start (the reason kept for the run
        that needs it)."""
        try:
            self._no_sandbox = ""
            await self.sandbox()
            return True
        except OSError as e:
            self._no_sandbox = str(e)
            return False

    def workdir(self) -> str:
        """A confined program starts in its folder, or (ad hoc agents, whose folder is
        in the hidden state directory) in its scratch folder."""
        inside_state = os.path.commonpath([self.home, self.kernel.state_dir]) == \
            self.kernel.state_dir
        return self.scratch if inside_state else self.home

    def environ(self, task: Task) -> dict[str, str]:
        if self.confined:  # not the daemon's environment: it may hold credentials
            env = {"PATH": confine.SAFE_PATH, "HOME": self.scratch, "TMPDIR": self.scratch,
                   "LANG": os.environ.get("LANG", "C.UTF-8"), "USER": self.name,
                   **self.manifest["env"]}
        else:
            # (made at each run, not kept: a copy of fs9's environment an agent, for
            # thousands of agents, was most of what they cost the server)
            env = {**os.environ, **self.manifest["env"]}
        mnt = self.kernel.mount_path
        home = os.path.join(mnt, "agents", self.name) if mnt else ""
        env.update(self.driver.environ(self.manifest))
        env.update(FS9_AGENT=self.name, FS9_TASK=str(task.id), FS9_CORR=task.corr,
                   FS9_MNT=mnt, FS9_AGENT_DIR=home, FS9_REQUESTER=task.reply_to,
                   FS9_OUTBOX=home and os.path.join(home, "outbox"),
                   FS9_PROGRESS=home and os.path.join(home, "tasks", str(task.id), "progress"))
        return env

