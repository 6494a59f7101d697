"""Confinement of exec agents, fs9's side: start an agent's sandbox (fs9/drivers/zygote.py),
ask it to start programs, hear how they end and what they tried.

`unavailable()` says why this machine cannot confine (never run unconfined
silently: the kernel refuses such an agent). `Sandbox` is one agent's zygote;
it lives in the agent's nursery and is closed with it.
"""
import array
import fcntl
import itertools
import json
import os
import socket
import subprocess
import sys
import zlib
from contextlib import asynccontextmanager
from typing import Callable

import trio

UID_BASE = 10_000_000  # agents' uids: UID_BASE + SLOT_SIZE * (the instance's slot) + offset
SYSTEM_READ = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/proc")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
START_S = 10.0


def unavailable() -> str | None:
    """Why exec agents cannot be confined here, or None."""
    if os.geteuid() != 0:
        return "confinement needs root (a private mount namespace and a uid per agent)"
    try:
        import landlock
        if landlock.landlock_abi_version() < 1:
            return "Landlock is not enabled in this kernel"
    except Exception as e:
        return f"Landlock is not available: {e}"
    if not os.path.exists("/proc/self/ns/mnt"):
        return "mount namespaces are not available"
    return None


def unreachable(path: str) -> str | None:
    """The first directory on the way to path (path itself excluded) that other users
    cannot pass (an agent's uid is another user), or None."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts)):
        d = os.sep.join(parts[:i]) or os.sep
        try:
            if not os.stat(d).st_mode & 0o001:
                return d
        except OSError:
            return d
    return None


SLOTS = 10_000  # uid ranges of SLOT_SIZE uids: one per fs9 instance on a host
SLOT_SIZE = 10_000
CLAIMS = "/run/fs9/uid-slots"  # host-wide: which state directory holds which range


def claim_uid_slot(state_dir: str) -> tuple[int, int | None]:
    """The uid range (slot) this fs9 instance owns on this host, and the fd of its claim
    (flocked for the life of the process; None if claims cannot be made here). It asks
    for the slot it had (STATE/uid-slot), else one derived from the state directory's
    name; a slot another state directory claimed since boot is not taken while that
    directory exists or a process runs in its range: the next free one is, and
    remembered. So two fs9 instances never share a uid."""
    remembered = os.path.join(state_dir, "uid-slot")
    try:
        with open(remembered) as f:
            first = int(f.read()) % SLOTS
    except (OSError, ValueError):
        first = zlib.crc32(state_dir.encode()) % SLOTS
    try:
        os.makedirs(CLAIMS, mode=0o700, exist_ok=True)
    except OSError:
        return first, None
    me = state_dir.encode()
    for i in range(SLOTS):
        slot = (first + i) % SLOTS
        try:
            fd = os.open(os.path.join(CLAIMS, str(slot)),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a running fs9
            os.close(fd)
            continue
        holder = os.pread(fd, 4096, 0)
        if holder not in (b"", me) and (os.path.isdir(holder) or _range_in_use(slot)):
            os.close(fd)  # another instance's since boot: its agents may come back, or live
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        if slot != first or not os.path.exists(remembered):
            with open(remembered, "w") as f:
                f.write(str(slot))
        return slot, fd
    return first, None


def _range_in_use(slot: int) -> bool:
    lo = uid_base(slot)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if lo <= os.stat(f"/proc/{entry}").st_uid < lo + SLOT_SIZE:
                    return True
            except OSError:
                pass
    return False


def uid_base(slot: int) -> int:
    """The first uid of a slot's range."""
    return UID_BASE + SLOT_SIZE * slot


def uid_in_use(uid: int) -> bool:
    """Whether any process on this host runs as uid (a previous holder's may)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    return True
            except OSError:
                pass
    return False


class SandboxError(OSError):
    pass


class Sandbox:
    def __init__(self, sock: trio.socket.SocketType, proc: subprocess.Popen,
                 on_attempt: Callable[[dict], None]) -> None:
        self._sock = sock
        self._proc = proc
        self._on_attempt = on_attempt
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        self._exits: dict[int, int] = {}
        self._changed = trio.Event()
        self.closed = ""  # why the sandbox ended, once it did

    @classmethod
    @asynccontextmanager
    async def open(cls, spec: dict, on_attempt: Callable[[dict], None]):
        """Start the agent's zygote and wait until its namespace is set up."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = {**spec, "parent": os.getpid(), "sock": theirs.fileno()}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fs9.drivers.zygote", json.dumps(spec)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd="/",
                env={"PATH": SAFE_PATH, "PYTHONPATH": _package_root()})
        finally:
            theirs.close()
        sandbox = cls(trio.socket.from_stdlib_socket(ours), proc, on_attempt)
        failed = ""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sandbox._listen)
                with trio.move_on_after(START_S):
                    while "ready" not in sandbox._replies and not sandbox.closed:
                        await sandbox._wait_change()
                if "ready" in sandbox._replies:
                    try:
                        yield sandbox
                    finally:
                        nursery.cancel_scope.cancel()
                else:
                    failed = sandbox.closed or "the sandbox did not start in time"
                    nursery.cancel_scope.cancel()
            if failed:  # raised out here, not from the nursery: one plain error
                raise SandboxError(failed)
        finally:
            sandbox._sock.close()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_reap, proc)

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _listen(self) -> None:
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
        msg = json.dumps(dict(op="spawn", id=rid, argv=argv, env=env, cwd=cwd, nice=nice))
        await self._sock.sendmsg([msg.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", fds))])
        while rid not in self._replies:
            if self.closed:
                raise SandboxError(self.closed)
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


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
