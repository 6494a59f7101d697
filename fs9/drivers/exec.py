"""The exec driver: an agent is any executable; one run per task (or per daemon life).
Its manifest names the program (`cmd`); DRIVER is its entry in drivers.DRIVERS, and
its `run` also runs the llm driver's program.

Protocol: `await run(job, task_status=...)` starts the program, reports its pid
through task_status.started (so a start failure is seen before the caller goes
on), streams stdout/stderr to job.emit as they arrive, and returns the exit
status (128+N for death by signal N). Cancelling the call terminates the whole
process group: SIGTERM, then SIGKILL after a grace period.

An unconfined program is started inline on the trio thread: with vfork, Popen
takes about 0.1 ms, while trio's open_process hands it to a worker thread and
costs four times that. A confined one is started by the agent's sandbox
(drivers/confine.py), which owns it and reports its exit status. Output is read
from non-blocking pipes either way.
"""
import errno
import os
import shlex
import signal
import subprocess

import trio

from . import BadManifest, Driver, Job
from .confine import SandboxError

GRACE_S = 2.0  # SIGTERM to SIGKILL
DRAIN_S = 1.0  # after exit, how long descendants may keep the pipes open
CHUNK = 65536
NICE = {"interactive": -5, "normal": 0, "background": 10}


class _Program:
    """A started program: its pid (= process group) and how to learn that it ended.
    Ours (Popen): a pidfd and waitpid. A sandbox's: the sandbox reaps it and reports
    its status (it may be gone before we could even open a pidfd)."""

    def __init__(self, pid: int, popen: subprocess.Popen | None, sandbox) -> None:
        self.pid, self.popen, self.sandbox = pid, popen, sandbox
        self.pidfd = os.pidfd_open(pid) if popen is not None else None
        self.status: int | None = None

    async def wait(self) -> int:
        if self.status is None:
            if self.popen is not None:
                await trio.lowlevel.wait_readable(self.pidfd)
                self.status = exit_status(self.popen.wait())
            else:
                self.status = await self.sandbox.wait(self.pid)
        return self.status

    def exited(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is not None
        return self.status is not None or self.sandbox.exited(self.pid)

    def close(self) -> None:
        if self.pidfd is not None:
            trio.lowlevel.notify_closing(self.pidfd)
            os.close(self.pidfd)


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


async def _start(job: Job, fds: tuple[int, int, int]) -> _Program:
    if job.sandbox is not None:
        pid = await job.sandbox.spawn(job.cmd, job.env, job.cwd, NICE[job.priority], fds)
        return _Program(pid, None, job.sandbox)
    popen = subprocess.Popen(job.cmd, cwd=job.cwd, env=job.env, start_new_session=True,
                             stdin=fds[0], stdout=fds[1], stderr=fds[2])
    try:
        os.setpriority(os.PRIO_PROCESS, popen.pid, NICE[job.priority])
    except OSError:
        pass  # raising priority needs CAP_SYS_NICE; running at 0 is the fallback
    return _Program(popen.pid, popen, None)


async def run(job: Job, *, task_status=trio.TASK_STATUS_IGNORED) -> int:
    in_r, in_w = os.pipe() if job.stdin is not None else (os.open(os.devnull, os.O_RDONLY), None)
    rest = b""
    if in_w is not None:
        # what fits in the pipe goes in now: the program reads its input as it starts,
        # not after a round trip through us (a confined one's start is heard from its
        # sandbox); the rest is fed once it runs
        rest = _prefill(in_w, job.stdin)
        if not rest:
            os.close(in_w)
            in_w = None
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = await _start(job, (in_r, out_w, err_w))
    except OSError as e:
        for fd in (in_w, out_r, err_r):
            if fd is not None:
                os.close(fd)
        if isinstance(e, SandboxError):
            raise  # the sandbox, not the program: the run says "cannot confine" (run.py)
        task_status.started(None)
        job.emit(2, f"fs9: cannot start {job.cmd[0]!r}: {e.strerror or e}\n".encode())
        return 127 if e.errno == errno.ENOENT else 126
    finally:
        for fd in (in_r, out_w, err_w):  # the child's ends
            os.close(fd)
    # from here each parent end is owned by its FdStream, which closes it
    stdin = trio.lowlevel.FdStream(in_w) if in_w is not None else None
    stdout, stderr = trio.lowlevel.FdStream(out_r), trio.lowlevel.FdStream(err_r)
    task_status.started(proc.pid)
    try:
        async with trio.open_nursery() as nursery:
            if stdin is not None:
                nursery.start_soon(_feed, stdin, rest)
            drained = [trio.Event(), trio.Event()]
            nursery.start_soon(_pump, stdout, 1, job.emit, drained[0])
            nursery.start_soon(_pump, stderr, 2, job.emit, drained[1])
            status = await proc.wait()
            with trio.move_on_after(DRAIN_S):
                for event in drained:
                    await event.wait()
            nursery.cancel_scope.cancel()
        # What the program wrote before it exited is in the pipes even if the pumps did
        # not get to it in time (a starved loop): take it now, without waiting.
        for fd, stream in ((1, stdout), (2, stderr)):
            _take_buffered(stream.fileno(), fd, job.emit)
        return status
    finally:
        with trio.CancelScope(shield=True):
            await _terminate(proc, job.shutdown_s)
            for stream in (stdin, stdout, stderr):
                if stream is not None:
                    await stream.aclose()


def _take_buffered(pipe: int, fd: int, emit, chunks: int = 1024) -> None:
    """Emit what a non-blocking pipe holds now (at most `chunks` reads: a descendant
    may keep writing)."""
    for _ in range(chunks):
        try:
            chunk = os.read(pipe, CHUNK)
        except (BlockingIOError, OSError):
            return
        if not chunk:
            return
        emit(fd, chunk)


def _prefill(pipe: int, data: bytes) -> bytes:
    """Write what of data fits in the pipe now, without waiting: what is left."""
    os.set_blocking(pipe, False)
    try:
        return data[os.write(pipe, data):] if data else b""
    except BlockingIOError:
        return data


async def _feed(pipe: trio.lowlevel.FdStream, data: bytes) -> None:
    try:
        if data:
            await pipe.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the program exited without reading all its input: its choice
    finally:
        await pipe.aclose()


async def _pump(pipe: trio.lowlevel.FdStream, fd: int, emit, drained: trio.Event) -> None:
    try:
        while chunk := await pipe.receive_some(CHUNK):
            emit(fd, chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        drained.set()


async def _terminate(proc: _Program, shutdown_s: float = GRACE_S) -> None:
    """End the program's process group: stragglers die with the task. SIGTERM first,
    SIGKILL after shutdown_s (0, OTP's brutal_kill: SIGKILL at once)."""
    def kill_group(sig):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    if not proc.exited() and shutdown_s > 0:
        kill_group(signal.SIGTERM)
        with trio.move_on_after(shutdown_s):
            await proc.wait()
    kill_group(signal.SIGKILL)
    with trio.move_on_after(GRACE_S):
        await proc.wait()  # reaped by us, or reported by the sandbox
    proc.close()


def check(manifest: dict) -> dict:
    """The program and its arguments (`cmd`): a list of strings, or one shell-quoted
    string, split here. BadManifest(text)."""
    cmd = manifest.get("cmd")
    if isinstance(cmd, str):
        try:
            cmd = shlex.split(cmd)
        except ValueError as e:
            raise BadManifest(f"cmd: {e}")
    if not cmd or not isinstance(cmd, list) or not all(isinstance(w, str) for w in cmd):
        raise BadManifest("cmd must be a non-empty list of strings (or one shell-quoted string)")
    return {"cmd": cmd}


# the program as the manifest names it; nothing added to its environment or sandbox
DRIVER = Driver(keys=("cmd",), check=check, argv=lambda m: list(m["cmd"]),
                environ=lambda m: {}, reads=lambda m: [], model=lambda m: None, run=run)
