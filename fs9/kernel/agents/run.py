"""One run of an agent's program: a task (or a daemon's run) from start to its recorded
end, within the agent's limits. A mixin of Agent (agent.py), which decides what runs
when; here is how a run goes: its sandbox, the driver's job, the watch on its limits,
and the events that say how it ended.
"""
import trio

from ... import drivers
from ...drivers import confine
from .. import supervision
from ..task import Task
from . import limits

WATCH_FIRST_S, WATCH_MAX_S = 0.2, 5.0  # a run's limits read after, and at most every


class Runs:
    """Agent's runs (it holds the manifest, the sandbox, the control group)."""

    async def execute(self, task: Task) -> int | None:
        """Run one task to its end and record how it ended; None if cancelled."""
        k = self.kernel
        k.record("task_started", agent=self.name, task=task.id, corr=task.corr,
                 attempt=task.attempt + 1)
        status, no_sandbox = None, ""
        output = [0, self.limits["output_mb"] << 20]  # bytes so far, the most a task may write
        over = trio.Event()  # output past its limit: the watcher looks at once

        def emit(fd: int, data: bytes) -> None:
            if output[0] >= output[1]:
                over.set()
                return  # over the limit: the watcher ends the task
            output[0] += len(data)
            k.emit(task, fd, data[:max(0, output[1] - output[0] + len(data))])
        self._cancel_as, self._exceeded, self._baseline = "", "", {}
        with trio.CancelScope() as self._run_scope:
            if self.manifest["timeout_s"] and not task.daemon:
                self._run_scope.deadline = trio.current_time() + self.manifest["timeout_s"]
            try:  # (the loop started it: a sandbox outlives the run's scope)
                sandbox = self.started_sandbox()
            except OSError as e:
                no_sandbox = str(e)
            else:
                job = drivers.Job(
                    cmd=self.driver.argv(self.manifest),
                    cwd=self.workdir() if sandbox else self.home, env=self.environ(task),
                    stdin=None if task.daemon else k.task_input(task),
                    priority=self.priority, emit=emit, sandbox=sandbox,
                    shutdown_s=supervision.shutdown_s(k, self))
                self._baseline = self.group.counters() if self.group is not None else {}
                async with trio.open_nursery() as nursery:
                    async def runner(task_status):
                        nonlocal status, no_sandbox
                        try:
                            status = await self.driver.run(job, task_status=task_status)
                        except confine.SandboxError as e:  # (raised before the start)
                            no_sandbox = str(e)  # it died before the program started
                            task_status.started(None)
                        nursery.cancel_scope.cancel()  # the watcher's job is done
                    task.pid = await nursery.start(runner)
                    nursery.start_soon(self._watch_limits, task, output, over)
                    if self.on_demand and task.daemon:  # asleep after idle_s without mail
                        nursery.start_soon(self._watch_idle)
        self._run_scope = None
        task.pid = None
        ids = dict(agent=self.name, task=task.id, corr=task.corr)
        if no_sandbox:
            k.emit(task, 2, f"fs9: cannot confine agent {self.name}: {no_sandbox}\n".encode())
            k.record("task_failed", exit=None, reason=f"cannot confine: {no_sandbox}", **ids)
            return 126
        if self.group is not None:
            # nothing of a run outlives it (a double fork, setsid): the group ends it all;
            # and a limit that bit at the very end still names the reason
            if self.group.pids():  # (reading the groups costs microseconds: inline)
                await trio.to_thread.run_sync(self.group.kill)
            self._check_limits(task, output)
        if self._exceeded:
            k.record("task_failed", exit=status, reason=self._exceeded, **ids)
            if task.reply_to and not task.handed_off:
                k.bus.send_result(self, task)
            return status if status else 137
        if status is not None:
            k.record("task_done" if status == 0 else "task_failed", exit=status, **ids)
            if task.reply_to and not task.handed_off:
                k.bus.send_result(self, task)
        elif self._cancel_as == "requeue":
            k.record("task_interrupted", reason="restarted by command", **ids)
            k.record("task_failed" if task.daemon else "task_requeued", **ids)
        elif self._cancel_as == "asleep":
            k.record("task_cancelled", reason=f"asleep: no mail for idle_s = "
                                              f"{self.manifest['idle_s']}", **ids)
        elif self._cancel_as:
            k.record("task_cancelled", reason=f"agent {self.state}", **ids)
        else:
            k.record("task_failed", exit=None,
                     reason=f"timeout after {self.manifest['timeout_s']}s", **ids)
            k.log.append("limit_exceeded", limit="timeout_s", value=self.manifest["timeout_s"],
                         reason=limits.reason("timeout_s", self.manifest["timeout_s"]), **ids)
        return status

    async def _watch_limits(self, task: Task, output: list[int], over: trio.Event) -> None:
        """While a run lasts: a limit that bit (memory, processes, output) ends it. The
        group's counters are read 0.2 s into the run, then half as often each time, down
        to every WATCH_MAX_S: a thousand idle daemons must not keep the server busy
        reading them (a program the OOM killer ended has ended anyway; the run's end
        checks again). Output past its limit is seen at once (`over`)."""
        delay = WATCH_FIRST_S
        while True:
            with trio.move_on_after(delay):
                await over.wait()
            delay = min(delay * 2, WATCH_MAX_S)
            if self._check_limits(task, output):
                self._cancel_run("limit")
                return

    def _check_limits(self, task: Task, output: list[int]) -> bool:
        """Whether a limit bit during this run (then logged once, and the reason kept)."""
        if self._exceeded:
            return True
        now = self.group.counters() if self.group is not None else {}
        base = self._baseline
        which = "output_mb" if output[0] >= output[1] else \
            "memory_mb" if now.get("oom_kill", 0) > base.get("oom_kill", 0) else \
            "processes" if now.get("pids_max", 0) > base.get("pids_max", 0) else ""
        if not which:
            return False
        self._exceeded = limits.reason(which, self.limits[which])
        self.kernel.log.append("limit_exceeded", agent=self.name, task=task.id, corr=task.corr,
                               limit=which, value=self.limits[which], reason=self._exceeded)
        return True
