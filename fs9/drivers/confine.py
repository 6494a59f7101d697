"""Confinement of exec agents, fs9's side: start an agent's sandbox (fs9/drivers/zygote.py,
forked by the fork server, forkserver.py), ask it to start programs, hear how they end
and what they tried.

`unavailable()` says why this machine cannot confine (never run unconfined
silently: the kernel refuses such an agent). `ForkServer` is the kernel's one fork
server; `Sandbox` is one agent's zygote; it lives in the agent's nursery and is closed
with it.
"""
import array
import errno
import itertools
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import Callable

import trio

from .confinable import DEVICES, SYSTEM_READ, unavailable, unreachable  # noqa: F401 (theirs)
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
START_S = 10.0
# The most one fork request may be (the fork server reads a packet of at most this), and
# our end of its socket is made to send that much in one packet (a socket's default,
# ~200 KB, is less than a sandbox with a few hundred vault subtrees in its view needs).
MAX_REQUEST = 1 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # (root: past wmem_max)
# The most one request to a sandbox may be (zygote.py's SPAWN_MAX, what it reads in one
# packet): a program's start carries its cmd and env, up to 1 MiB (manifest.MAX_EXEC),
# in JSON (escapes of control characters make it up to 6 times that).
SPAWN_MAX = 8 << 20


class SandboxError(OSError):
    pass


class ForkServer:
    """fs9's end of the fork server (forkserver.py), which forks each agent's sandbox
    from a process that has paid Python's start once. `serve` (a kernel service) starts
    it at mount and stops it at unmount; `fork` starts it if it is not running."""

    def __init__(self) -> None:
        self._sock: trio.socket.SocketType | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = trio.Lock()  # one request at a time: replies come in order
        self._closed = False  # the mount is ending: no fork server is started again

    async def serve(self) -> None:
        """Run the fork server for the mount's life. Blocks until cancelled."""
        try:
            async with self._lock:
                try:
                    await self._start()
                except OSError:
                    pass  # the first spawn tries again, and fails with the reason
            await trio.sleep_forever()
        finally:
            self._closed = True  # (before the socket closes under a request in flight)
            with trio.CancelScope(shield=True):
                await self._stop()

    async def _start(self) -> None:
        if self._closed:
            raise SandboxError("fs9 is unmounting: no sandbox starts now")
        if self._proc is not None and self._proc.poll() is None and self._sock is not None:
            return
        await self._stop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, MAX_REQUEST + 4096)
        except OSError:  # not root: requests are refused past the default (fork's check)
            pass
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "fs9.drivers.forkserver", str(theirs.fileno()),
                 str(os.getpid())], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                cwd="/", env={"PATH": SAFE_PATH, "PYTHONPATH": _package_root()})
        finally:
            theirs.close()
        self._sock = trio.socket.from_stdlib_socket(ours)
        reply = b""
        with trio.move_on_after(START_S):
            reply = await self._sock.recv(1 << 16)
        if not reply or json.loads(reply).get("op") != "ready":
            await self._stop()
            raise SandboxError("the sandboxes' fork server did not start")

    async def _stop(self) -> None:
        """Close our end (the fork server exits at EOF) and reap it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            proc, self._proc = self._proc, None
            await trio.to_thread.run_sync(_reap, proc)

    async def fork(self, spec: dict, sock: socket.socket) -> int:
        """A fresh sandbox for one agent, handed `sock` (its end of the agent's
        socket): a pidfd of the sandbox process, or SandboxError. A fork server found
        dead (killed, say) is replaced once. A request once sent is seen through
        (shielded): its reply never lands in another's hands.
        A request too big to send is refused here, before the fork server sees it: a
        failed send reads as a dead fork server, and replacing it ends every agent's
        sandbox (each dies with its parent), so one agent's wide view would end them all."""
        request = json.dumps({"op": "fork", "spec": spec}).encode()
        if len(request) > MAX_REQUEST:
            raise SandboxError(f"its sandbox's description is {len(request)} bytes, over "
                               f"the {MAX_REQUEST} a fork request may be (a view of fewer "
                               "or shorter vault paths fits)")
        try:
            async with self._lock:
                with trio.CancelScope(shield=True):
                    for attempt in (1, 2):
                        await self._start()
                        try:
                            reply, fds = await self._ask(request, sock)
                            break
                        except OSError as e:  # dead or not answering: the next one is new
                            await self._stop()
                            if attempt == 2 or self._closed:
                                raise SandboxError(
                                    f"the sandboxes' fork server failed: {e}") from None
        except SandboxError:
            if self._closed:  # the unmount's cancellation, which the shield held, ends
                await trio.lowlevel.checkpoint()  # the agent's loop here, as a cancel: its
            raise  # task stays queued for the next mount, the agent is not failed
        msg = json.loads(reply)
        if msg.get("op") != "forked" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise SandboxError(f"cannot start the sandbox: {msg.get('text', msg)}")
        return fds[0]

    async def _ask(self, request: bytes, sock: socket.socket) -> tuple[bytes, list[int]]:
        """One fork request and its reply (bytes, the fds it carried); OSError if the
        fork server is gone or silent for START_S."""
        fds = array.array("i")
        try:
            return await self._exchange(request, sock, fds)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as e:
            # the mount's end closed the socket under this request (serve): not a
            # defect of the agent asking (it was reported as one, the agent failed)
            raise OSError(errno.EPIPE, f"the fork server was stopped ({e})") from None

    async def _exchange(self, request: bytes, sock: socket.socket,
                        fds: array.array) -> tuple[bytes, list[int]]:
        if self._sock is None:
            raise OSError(errno.EPIPE, "the fork server was stopped")
        with trio.move_on_after(START_S):
            await self._sock.sendmsg(
                [request],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))])
            reply, ancdata, _, _ = await self._sock.recvmsg(1 << 16, socket.CMSG_LEN(4))
            for level, kind, raw in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
            if reply:
                return reply, list(fds)
            raise OSError(errno.EPIPE, "it exited")
        raise OSError(errno.ETIMEDOUT, f"no answer in {START_S:g} s")


class Sandbox:
    def __init__(self, sock: trio.socket.SocketType, pidfd: int,
                 on_attempt: Callable[[dict], None]) -> None:
        self._sock = sock
        self._pidfd = pidfd  # the sandbox process (the fork server's child; it reaps it)
        self._on_attempt = on_attempt
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        self._exits: dict[int, int] = {}
        self._changed = trio.Event()
        self._hearing = trio.CancelScope(shield=True)  # _listen's
        self._ready_by = trio.current_time() + START_S  # set up by then, or failed
        self.closed = ""  # why the sandbox ended, once it did

    @classmethod
    @asynccontextmanager
    async def open(cls, spec: dict, on_attempt: Callable[[dict], None], server: ForkServer,
                   pooled: "Pooled | None" = None):
        """Start the agent's sandbox (forked by `server`, or, given `pooled`, made
        ahead for its uid and taken now) and wait until its namespace is set up. One
        taken from the pool is yielded at once: what is asked of it meanwhile waits in
        its socket until it is set up (it reads nothing before), so its first start
        is on its way while it sets up (`spawn` waits for it at most START_S)."""
        if pooled is not None:
            ours, pidfd = pooled.take(spec)
        else:
            ours, pidfd = await cls._fork(spec, server)
        sandbox = cls(trio.socket.from_stdlib_socket(ours), pidfd, on_attempt)
        failed = ""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sandbox._listen)
                try:
                    with trio.move_on_at(sandbox._ready_by):
                        while pooled is None and "ready" not in sandbox._replies \
                                and not sandbox.closed:
                            await sandbox._wait_change()
                    if pooled is not None or "ready" in sandbox._replies:
                        yield sandbox
                    else:
                        failed = sandbox.closed or "the sandbox did not start in time"
                finally:
                    sandbox._hearing.cancel()
            if failed:  # raised out here, not from the nursery: one plain error
                raise SandboxError(failed)
        finally:
            sandbox._sock.close()
            with trio.CancelScope(shield=True):
                await _end(pidfd)

    @staticmethod
    async def _fork(spec: dict, server: ForkServer) -> tuple[socket.socket, int]:
        ours, theirs = _socketpair()
        try:
            return ours, await server.fork(spec, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _listen(self) -> None:
        # Shielded, until the sandbox is closed (open's end): when the whole agent is
        # cancelled (an unmount), its run's end still hears its program exit after the
        # SIGTERM, rather than wait out the grace period, then again after the SIGKILL.
        with self._hearing:
            await self._hear()

    async def _hear(self) -> None:
        try:
            while data := await self._sock.recv(1 << 16):
                msg = json.loads(data)
                op = msg["op"]
                if op == "exit":
                    self._exits[msg["pid"]] = msg["status"]
                elif op == "attempt":
                    self._on_attempt(msg)
                elif op == "failed":
                    self.closed = f"cannot set up the sandbox: {msg['text']}"
                else:
                    self._replies["ready" if op == "ready" else msg["id"]] = msg
                self._bump()
        except ConnectionResetError:  # it exited with a request of ours unread: an end
            pass  # as any other (its fork server killed, say), not a lost connection
        except OSError as e:
            self.closed = f"sandbox connection lost: {e}"
        self.closed = self.closed or "the sandbox exited"
        self._bump()

    async def spawn(self, argv: list[str], env: dict, cwd: str, nice: int,
                    fds: tuple[int, int, int]) -> int:
        """Start a program in the sandbox; its pid (a session leader), or SandboxError."""
        if self.closed:
            raise SandboxError(self.closed)
        rid = next(self._ids)
        # (ASCII JSON: a str of the mount's or fs9's environment may hold surrogates)
        msg = json.dumps(dict(op="spawn", id=rid, argv=argv, env=env, cwd=cwd,
                              nice=nice)).encode()
        if len(msg) > SPAWN_MAX:
            raise SandboxError(f"its start request is {len(msg)} bytes, over the "
                               f"{SPAWN_MAX} a sandbox reads")
        try:
            await self._sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              array.array("i", fds))])
        except OSError as e:  # it died a moment ago (its fork server killed, say)
            raise SandboxError(self.closed or f"sandbox connection lost: {e}") from None
        while rid not in self._replies:
            set_up = "ready" in self._replies  # (not yet: one taken from the pool, open)
            if not set_up and trio.current_time() >= self._ready_by:
                self.closed = self.closed or "the sandbox did not start in time"
            if self.closed:  # (the next run's sandbox is a fresh one)
                raise SandboxError(self.closed)
            with trio.move_on_at(self._ready_by if not set_up else math.inf):
                await self._wait_change()
        reply = self._replies.pop(rid)
        if reply["op"] == "error":
            raise SandboxError(reply["text"])
        return reply["pid"]

    def exited(self, pid: int) -> bool:
        return pid in self._exits

    async def wait(self, pid: int) -> int:
        """Block until the program pid ends; its exit status (128+N: signal N)."""
        while pid not in self._exits:
            if self.closed:
                return 128 + 9
            await self._wait_change()
        return self._exits.pop(pid)


class Pooled:
    """A sandbox made ahead for one uid (pooled.py), not yet any agent's: `make` it,
    hand it to its agent's Sandbox.open, or `close` it."""

    def __init__(self, sock: socket.socket, pidfd: int) -> None:
        self._sock, self._pidfd = sock, pidfd

    @classmethod
    async def make(cls, server: ForkServer, uid: int, cgroups: list[str],
                   audit: bool) -> "Pooled":
        """Fork it and wait until it is ready; SandboxError if it is not."""
        spec = dict(pooled=True, uid=uid, cgroups=cgroups, audit=audit)
        ours, pidfd = await Sandbox._fork(spec, server)
        pooled = cls(ours, pidfd)
        reply = b""
        try:
            with trio.move_on_after(START_S):
                await trio.lowlevel.wait_readable(ours)
                reply = ours.recv(1 << 16)
        except OSError:
            pass
        finally:
            if reply != b'{"op": "pooled"}':
                await pooled.close()
        if reply != b'{"op": "pooled"}':
            raise SandboxError(f"a pooled sandbox did not start: {reply[:200]!r}")
        return pooled

    def alive(self) -> bool:
        """It is still there (its pidfd is readable once it has exited; poll, not
        select: fs9 holds fds past select's 1024 with many agents)."""
        if self._sock is None:
            return False
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return not poller.poll(0)

    def take(self, spec: dict) -> tuple[socket.socket, int]:
        """Hand it its agent's spec: its socket and pidfd, now the caller's to close;
        SandboxError if it cannot be handed over (then it is closed here)."""
        sock, pidfd, self._sock = self._sock, self._pidfd, None
        request = json.dumps({"op": "take", "spec": spec}).encode()
        try:
            if len(request) > MAX_REQUEST:
                raise OSError(errno.EMSGSIZE, f"its sandbox's description is {len(request)} "
                                              f"bytes, over the {MAX_REQUEST} it may be")
            sock.send(request)
        except OSError as e:
            sock.close()
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass  # (it has ended)
            os.close(pidfd)
            raise SandboxError(f"cannot start the sandbox: {e.strerror or e}") from None
        return sock, pidfd

    async def close(self) -> None:
        """End it unused (it exits at EOF, having run nothing of anyone's)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with trio.CancelScope(shield=True):
                await _end(self._pidfd)


def _socketpair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:  # (a socket's default packet, ~200 KB, is less than a start may carry)
        ours.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SPAWN_MAX + 4096)
    except OSError:
        pass  # not root: a start past the default is refused (Message too long)
    return ours, theirs


async def _end(pidfd: int) -> None:
    """Wait for the sandbox to exit (it does once its socket is closed), SIGKILL it if
    it has not within 5 s; then close the pidfd."""
    try:
        with trio.move_on_after(5) as waited:
            await trio.lowlevel.wait_readable(pidfd)
        if waited.cancelled_caught:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            with trio.move_on_after(5):
                await trio.lowlevel.wait_readable(pidfd)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
