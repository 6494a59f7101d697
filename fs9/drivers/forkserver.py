"""The fork server: one root process per fs9 that has paid, once, for what every
agent's sandbox needs before it can start (Python's start, the landlock and pyseccomp
imports, the seccomp filter compiled), and forks a fresh sandbox (zygote.py) for each
agent on request (`python -m fs9.drivers.forkserver FD FS9_PID`; Android's zygote). A
sandbox so starts with a fork, where a Python interpreter of its own took 30-40 ms on a
quiet machine (0.35 s at a load of 16: bench/spawnspeed.py).

What it never does, so that no agent's state can reach another through it: it runs no
agent's program, enters no namespace, changes no uid; it keeps no spec and no fd past
the fork (each request's socket and the child's pidfd are closed once handed on). Each child
is one agent's sandbox for that agent's life and is never reused: nothing is pooled
after a fork, so a sandbox starts from the same clean template every time.

Protocol on the socket (SOCK_SEQPACKET, one JSON object per packet):
  fs9 -> {"op": "fork", "spec": {...}} + fd: the sandbox's end of its own socket
  <- {"op": "ready"} once, then per request {"op": "forked", "pid"} + fd: a pidfd of
     the sandbox (race-free: we have not reaped it yet), or {"op": "error", "text"}
It reaps its children; when fs9 closes the socket or dies (PDEATHSIG), it exits, and
its children, each with a parent-death signal of its own, end every process of their
agent's uid.
"""
import array
import gc
import json
import os
import select
import signal
import socket
import sys

from fs9.drivers import notices, pooled, zygote

FDS = socket.CMSG_LEN(4)  # one fd per request


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _fork(sock: socket.socket, wake: tuple[int, int], spec: dict, theirs: int,
          flt) -> int:
    """Fork the sandbox of one agent; its pid. The child never returns."""
    spec = {**spec, "parent": os.getpid()}
    pid = os.fork()
    if pid == 0:
        try:  # nothing of the fork server stays with the sandbox: its socket, its signals
            sock.close()
            signal.set_wakeup_fd(-1)
            for fd in wake:
                os.close(fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # (a pooled sandbox is made ahead of its agent: pooled.py)
            life = pooled.run if spec.get("pooled") else zygote.run
            life(spec, socket.socket(fileno=theirs), flt)
        finally:
            os._exit(0)
    return pid


def serve(sock: socket.socket) -> None:
    flt = notices.seccomp_filter()  # the same for every agent: compiled once, loaded by each
    # what is imported stays out of the collector's walks: a sandbox copies (on write)
    # fewer of our pages
    gc.freeze()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: None)  # PDEATHSIG: fs9 is gone
    sock.send(json.dumps({"op": "ready"}).encode())
    while True:
        ready, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in ready:
            if signal.SIGTERM in os.read(wake_r, 512):
                return
            _reap()
        if sock not in ready:
            continue
        fds = array.array("i")
        data, ancdata, _, _ = sock.recvmsg(1 << 20, FDS)
        if not data:
            return  # fs9 closed us
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
        try:
            spec = json.loads(data)["spec"]
            if len(fds) != 1:
                raise OSError("a fork request carries exactly one socket")
            pid = _fork(sock, (wake_r, wake_w), spec, fds[0], flt)
            # the pidfd before any reap: it names this child, never a reused pid
            pidfd = os.pidfd_open(pid)
            try:
                sock.sendmsg([json.dumps({"op": "forked", "pid": pid}).encode()],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))])
            finally:
                os.close(pidfd)
        except (OSError, ValueError, KeyError) as e:
            sock.send(json.dumps({"op": "error", "text": str(e)}).encode())
        finally:
            for fd in fds:
                os.close(fd)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    parent = int(sys.argv[2])
    zygote.libc.prctl(zygote.PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    zygote.libc.prctl(zygote.PR_SET_DUMPABLE, 0, 0, 0, 0)
    if os.getppid() != parent:
        return  # fs9 died before PDEATHSIG was armed
    serve(sock)


if __name__ == "__main__":
    main()
