"""How a sandbox (zygote.py) starts the agent's programs: each forked from the sandbox,
moved into the agent's control groups, dropped to the agent's uid with no capabilities,
no_new_privs and Landlock, then exec'd with the fds fs9 handed over.

The first program is prepared ahead (`Prepared`): once the sandbox has made its
namespaces, loaded its seccomp filter and made its Landlock layers, and before it says
it is ready, it forks a process that does all of that but the exec, and waits for the
first start request. Most of a start is then paid while fs9 hears that the sandbox is ready and
sends the first task: the fork, and above all the move into the control groups, whose
first write waits for an RCU grace period of the kernel's cgroup migration lock (10-15
ms; docs/benchmarks.md). A prepared process is exactly what start_program's child is
just before its exec (the same groups, uid, Landlock layers and seccomp filter,
inherited from the sandbox after it loaded it); it runs nothing of the agent's until
the exec, holds nothing of the sandbox's past its set-up, and is a session leader, as
every program is. Only the first is prepared: after each run, fs9 ends every process
of the agent's control group (run.py), which a second one waiting would be.
"""
import array
import ctypes
import errno
import json
import os
import signal
import socket

import pyseccomp
from landlock.plumbing import get_restrict_self

from fs9.drivers.confinable import landlock_call

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# Landlock logs denials after exec only when asked (ABI 7); older kernels refuse the flag.
LOG_NEW_EXEC_ON = 2
SPAWN_MAX = 8 << 20  # bytes of one start request (zygote.SPAWN_MAX)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)

libc = ctypes.CDLL(None, use_errno=True)


def _join_groups(spec: dict) -> None:
    for procs in spec.get("cgroups", ()):  # its control groups: limits, and an end
        with open(procs, "w") as f:
            f.write("0")


def _confine(spec: dict, layers) -> None:
    """This process, forked from the sandbox and in the agent's control groups: its
    uid, no capabilities, no_new_privs and the Landlock layers (fds of rulesets)."""
    uid = spec["uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # Landlock's precondition
    for layer in layers:
        if layer is None:
            continue
        try:
            landlock_call(get_restrict_self(), layer, LOG_NEW_EXEC_ON)
        except OSError:  # a kernel before Landlock's audit flags (ABI 7)
            landlock_call(get_restrict_self(), layer, 0)


def _exec(msg: dict, keep: int) -> None:
    """Close every fd but 0-2 and `keep` (close-on-exec), then exec msg's program."""
    os.closerange(3, keep)
    os.closerange(keep + 1, 65536)
    os.chdir(msg["cwd"])
    os.execvpe(msg["argv"][0], msg["argv"], msg["env"])


def _why(msg: dict, e: BaseException) -> bytes:
    text = (e.strerror or str(e)) if isinstance(e, OSError) else repr(e)
    return f"{msg['argv'][0]}: {text}".encode()


def start_program(msg: dict, fds: list[int], spec: dict, ruleset, net_fd=None) -> int:
    """Fork, drop to the agent's uid under Landlock, exec; the pid, or OSError."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            for target, fd in enumerate(fds):
                os.dup2(fd, target, inheritable=True)
            try:
                os.setpriority(os.PRIO_PROCESS, 0, msg["nice"])
            except OSError:
                pass
            _join_groups(spec)
            _confine(spec, (ruleset._fd, net_fd))
            _exec(msg, report_w)
        except BaseException as e:
            os.write(report_w, _why(msg, e))
        os._exit(127)
    os.close(report_w)
    with os.fdopen(report_r, "rb") as report:
        failure = report.read()  # EOF at exec: started
    if failure:
        os.waitpid(pid, 0)
        raise OSError(errno.EACCES, failure.decode(errors="replace"))
    return pid


class Prepared:
    """The agent's first program, confined ahead and waiting for its start request.
    A pooled sandbox's (pooled.py) is forked before the sandbox has its agent: it
    loads the seccomp filter itself and hands its listener over (`listener`), and
    takes its uid and Landlock layers, which are the agent's, once the sandbox has them
    (`confine`: before its start, as a fresh sandbox's first program has them)."""

    def __init__(self, spec: dict, ruleset, net_fd, flt=None) -> None:
        """Fork it (called by the sandbox once its namespace is made, its seccomp filter
        loaded and its Landlock layers made; or, with flt, a pooled sandbox's, once its
        namespaces are made: the process loads flt itself). OSError if it failed."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:  # (a start may carry up to SPAWN_MAX in one packet; we are root)
            ours.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SPAWN_MAX + 4096)
        except OSError:
            pass
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            ours.close()
            layers = None if flt is not None else (ruleset._fd, net_fd)
            _wait_and_exec(theirs, parent, spec, layers, flt)  # never returns
        theirs.close()
        self.pid, self._sock = pid, ours
        self.used = False
        self._late = flt is not None  # its layers come later (confine)
        self.listener = _listener_of(ours, pid) if flt is not None else None

    def confine(self, layers) -> None:
        """A pooled sandbox's, once its agent's Landlock layers (fds, or None) are
        made: hand them over; it takes its uid and the layers then, and waits for its
        start as a fresh sandbox's does. OSError if it has ended."""
        self._late = False
        self._sock.sendmsg([b"layers"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array(
            "i", [layer for layer in layers if layer is not None]))])

    def start(self, msg: dict, fds: list[int]) -> int:
        """Hand it msg's program and fds (stdin, stdout, stderr): its pid once exec'd,
        or OSError (EACCES) with the reason it was not."""
        if self._late:  # (its layers were never handed over: it must not run)
            raise OSError(errno.EPERM, f"{msg['argv'][0]}: not confined")
        self.used = True
        try:
            try:  # (raised as the sandbox may: the program's own start cannot, as root)
                os.setpriority(os.PRIO_PROCESS, self.pid, msg["nice"])
            except OSError:
                pass
            try:
                self._sock.sendmsg([json.dumps(dict(argv=msg["argv"], env=msg["env"],
                                                    cwd=msg["cwd"])).encode()],
                                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", fds))])
            except OSError as e:  # it failed (its reason may be waiting) or died
                self._sock.setblocking(False)
                try:
                    failure = self._sock.recv(1 << 16)
                except OSError:
                    failure = b""
                failure = failure or f"{msg['argv'][0]}: {e.strerror or e}".encode()
            else:
                failure = self._sock.recv(1 << 16)  # EOF at exec: started
        finally:
            self._sock.close()
        if failure:
            raise OSError(errno.EACCES, failure.decode(errors="replace"))
        return self.pid


def _listener_of(sock: socket.socket, pid: int) -> int:
    """The seccomp listener a pooled first program sends once it loaded its filter."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(64, socket.CMSG_LEN(fds.itemsize))
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
    if data != b"listener" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise OSError(errno.EPERM, f"its first program could not load the seccomp filter: "
                                   f"{data.decode(errors='replace')}")
    return fds[0]


def _load_filter(sock: socket.socket, flt) -> None:
    """Load the seccomp filter in this process and send its listener to the sandbox,
    which answers its notifications (a process does not inherit a filter loaded after
    its fork). Our own copy of the listener is closed: what we exec never holds it."""
    flt.load()
    listener = flt_listener(flt)
    try:
        sock.sendmsg([b"listener"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [listener]))])
    finally:
        os.close(listener)


def flt_listener(flt) -> int:
    """The listener fd of a loaded filter (pyseccomp has no public accessor)."""
    return pyseccomp._libseccomp.seccomp_notify_fd(flt._filter)


def _layers(sock: socket.socket) -> list[int]:
    """The Landlock layers (fds) a pooled sandbox hands its first program once taken
    (Prepared.confine); exit if it ended untaken."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(64, socket.CMSG_LEN(4 * fds.itemsize))
    if not data:
        os._exit(0)
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
    if data != b"layers":
        raise OSError(errno.EPROTO, "its Landlock layers were expected")
    return list(fds)


def _wait_and_exec(sock: socket.socket, parent: int, spec: dict, layers, flt) -> None:
    msg = {"argv": ["?"]}
    try:
        # nothing of the sandbox's signal handling stays with it
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        # with the sandbox: (a uid change clears it: set again below)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(0)  # the sandbox ended before that was armed
        os.setsid()
        _join_groups(spec)
        if flt is not None:
            _load_filter(sock, flt)
        if layers is None:  # (a pooled sandbox's: its agent's, once it is taken)
            layers = _layers(sock)
        _confine(spec, layers)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(0)
        os.closerange(3, sock.fileno())  # the sandbox's fds: none is kept while it waits
        os.closerange(sock.fileno() + 1, 65536)
        fds = array.array("i")
        data, ancdata, _, _ = sock.recvmsg(SPAWN_MAX, socket.CMSG_LEN(16 * fds.itemsize))
        if not data:
            os._exit(0)  # the sandbox ended without a start
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
        msg = json.loads(data)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target, inheritable=True)
        _exec(msg, sock.fileno())
    except BaseException as e:
        try:
            sock.send(_why(msg, e))
        except OSError:
            pass
    os._exit(127)
