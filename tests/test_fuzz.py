"""A fuzzer of the namespace: random system calls on every kind of file, with spawns,
kills, halts and remounts between them (hypothesis's RuleBasedStateMachine on a real
mount).

After every step it checks fs9's invariants: no call answered EIO (fs9's own bug) or
ENOTCONN (the server died), none took longer than HANG_S (every open is O_NONBLOCK, so
nothing may wait: a stream with nothing to read answers EAGAIN), no `bug` event in the
log, the server's memory under MAX_RSS_MB, and a remount shows the same agents, tasks
and mail. Any other errno is a fitting answer to a hostile call and passes.

`make test` runs a short, derandomized run. `make fuzz` runs a long one with a fresh seed
(FS9_FUZZ_EXAMPLES, FS9_FUZZ_STEPS, FS9_FUZZ_SEED): on a failure hypothesis prints the
shortest sequence of steps that fails, and the seed replays it:
    FS9_FUZZ_SEED=N make fuzz
"""
import collections
import errno
import mmap
import os
import select
import threading

import pytest
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

EXAMPLES = int(os.environ.get("FS9_FUZZ_EXAMPLES", "8"))
STEPS = int(os.environ.get("FS9_FUZZ_STEPS", "50"))
LONG = "FS9_FUZZ_SEED" in os.environ or "FS9_FUZZ_EXAMPLES" in os.environ
HANG_S = 20.0  # no call may take longer (generous: a loaded 2-core machine)
MAX_RSS_MB = 600
VACUOUS_BELOW = 200  # calls: a run this long that never opened, read and wrote is broken
AGENTS = ("z", "y")

# Files of every kind (names relative to the mount; C: a model conversation's id), and
# the way a program would open each: r, w (a write-only protocol file), rw, d (a folder).
NATURAL = {
    "ctl": "w", "status": "r", "events": "r", "mail/next": "r", "mail/dead": "d",
    "log/audit": "r", "log/trace": "d", "registry/owners": "r", "registry/by-capability": "r",
    "registry/z": "r", "search/status": "r", "search/fuzzword": "r", "models/usage": "r",
    "models/scripted/info": "r", "models/scripted/clone": "r", "models/scripted/C/ctl": "w",
    "models/scripted/C/request": "w", "models/scripted/C/reply": "r",
    "models/scripted/C/history": "r", "models/scripted/C/last": "r",
    "models/scripted/C/status": "r", "topics/fz": "rw", "topics/other": "rw", "vault/fz": "d",
    "vault/fz/f": "rw", "vault/fz/g": "rw", "vault/fz/d": "d", "vault/fz/d/h": "rw",
    "agents/z": "d", "agents/z/ctl": "w", "agents/z/in": "w", "agents/z/out": "r",
    "agents/z/err": "r", "agents/z/status": "r", "agents/z/manifest": "r",
    "agents/z/steps": "r", "agents/z/approve": "w", "agents/z/memory": "d",
    "agents/z/memory/note": "rw",
    "agents/z/mail": "d", "agents/z/mail/new": "w", "agents/z/mail/next": "r",
    "agents/z/outbox/y": "w", "agents/z/tasks": "d", "agents/z/tasks/1": "d",
    "agents/z/tasks/1/out": "r", "agents/z/tasks/1/status": "r",
    "agents/z/tasks/1/progress": "w", "agents/y/ctl": "w", "agents/y/in": "w",
    "agents/y/mail/new": "w", "agents/nobody/in": "w",
}
FILES = tuple(NATURAL)
OPEN_AS = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT, "rw": os.O_RDWR | os.O_CREAT,
           "d": os.O_RDONLY | os.O_DIRECTORY}
FLAGS = (os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND,
         os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_CREAT, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
         os.O_RDONLY | os.O_DIRECTORY, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
PLAUSIBLE = (
    b"run fuzz\n", b"spawn z cmd=cat\n", b"spawn y cmd=cat\n", b"kill z\n", b"kill y\n",
    b"stop\n", b"start\n", b"restart\n", b"kill\n", b"halt\n", b"resume\n", b"priority batch\n",
    b"close\n", b"reset\n", b"hello\n", b"to: z\n\nbody\n", b"subject: s\n\nbody\n",
    b"x-task: 1\n\nforged\n", b"deadline: +inf\n\nb\n", b"reply-to: y\n\nb\n",
    b'{"messages": [{"role": "user", "content": "hi"}]}\n', b'{"tools": [1]}\n',
    b'{"max_tokens": 1e300}\n', b'{"messages": "x"}\n', b"50\n", b"done\n",
    b"\xff\xfe\x00\n", b"",
)
# (the 70 kB write as a mapped strategy: its repr, in a failing example, stays short)
DATA = st.one_of(st.sampled_from(PLAUSIBLE), st.binary(max_size=300),
                 st.just(70000).map(lambda n: b"x" * n))
DATA_FOR = {  # what a writer of each file says first, plausible and hostile
    "ctl": (b"run fuzz\n", b"stop\n", b"kill\n", b"restart\n", b"reset\n", b"close\n",
            b"spawn z cmd=cat\n", b"kill z\n", b"halt\n", b"resume\n"),
    "request": (b'{"messages": [{"role": "user", "content": "hi"}]}\n', b'{"tools": [1]}\n',
                b'{"messages": "x"}\n', b'{"max_tokens": 1e300}\n', b"[]\n", b"{\n"),
    "in": (b"hello\n", b"\xff\n", b""),
    "new": (b"subject: s\n\nbody\n", b"x-task: 1\n\nforged\n", b"deadline: +inf\n\nb\n",
            b"reply-to: y\n\nb\n", b"no blank line"),
    "progress": (b"50\n", b"done\n", b"nan\n"),
}
XATTRS = ("user.fz", "user.fs9.owner", "user.fs9.classification", "trusted.fz",
          "security.capability")
# mostly as a program would open the file (None), sometimes anything of FLAGS
FLAG = st.one_of(st.none(), st.none(), st.none(), st.sampled_from(FLAGS))
FILE_OP = st.one_of(
    st.tuples(st.just("read"), st.sampled_from((0, 1, 100, 4096, 65536, 1 << 20))),
    st.tuples(st.just("drain"), st.none()),
    st.tuples(st.just("write"), DATA),
    st.tuples(st.just("pwrite"), st.tuples(DATA, st.sampled_from((0, 7, 1 << 20)))),
    st.tuples(st.just("seek"), st.tuples(st.sampled_from((0, 1, 4096, -1, 1 << 40)),
                                         st.sampled_from((os.SEEK_SET, os.SEEK_CUR, os.SEEK_END)))),
    st.tuples(st.just("ftruncate"), st.sampled_from((0, 1, 5000, 1 << 30))),
    st.tuples(st.sampled_from(("fsync", "mmap", "poll", "fstat")), st.none()),
)


class Broken(AssertionError):
    """fs9 answered with its own bug (EIO), died (ENOTCONN) or hung."""


class Refused(str):
    """A call's fitting refusal: the errno's name (or Python's own refusal)."""


OUTCOMES: collections.Counter = collections.Counter()  # (call, "ok" or errno name): how often


def call(what: str, fn, *args):
    """fn(*args) in a thread, bounded by HANG_S: its result, or Refused for a fitting
    refusal; Broken for EIO, ENOTCONN and a hang."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except OSError as e:
            box["errno"] = e.errno
        except (ValueError, OverflowError) as e:  # Python refused the call itself
            box["refused"] = Refused(repr(e))
        except BaseException as e:  # noqa: BLE001 (reported below, on the test's thread)
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_S)
    if t.is_alive():
        raise Broken(f"{what}: no answer in {HANG_S:.0f} s")
    if "error" in box:
        raise box["error"]
    err = box.get("errno")
    OUTCOMES[what.split()[0], "ok" if "value" in box else errno.errorcode.get(err, "python")] += 1
    if err in (errno.EIO, errno.ENOTCONN):
        raise Broken(f"{what}: {os.strerror(err)}")
    if err is not None:
        return Refused(errno.errorcode.get(err, str(err)))
    return box.get("refused", box.get("value"))


def _mapped(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    if not size:
        return b""
    with mmap.mmap(fd, min(size, 4096), prot=mmap.PROT_READ) as m:
        return m[:64]


def _drain(fd: int) -> int:
    n = 0
    while n < 1 << 20 and (chunk := os.read(fd, 65536)):
        n += len(chunk)
    return n


def _poll(fd: int):
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLOUT)
    return p.poll(0)


FILE_CALLS = {
    "read": os.read, "drain": lambda fd, _: _drain(fd), "write": os.write,
    "pwrite": lambda fd, a: os.pwrite(fd, *a), "seek": lambda fd, a: os.lseek(fd, *a),
    "ftruncate": os.ftruncate, "fsync": lambda fd, _: os.fsync(fd),
    "mmap": lambda fd, _: _mapped(fd), "poll": lambda fd, _: _poll(fd),
    "fstat": lambda fd, _: os.fstat(fd),
}


def file_op(fd: int, op: str, arg) -> None:
    call(f"{op} {arg if not isinstance(arg, bytes) else arg[:40]!r}", FILE_CALLS[op], fd, arg)


def _num(arg, default):
    return arg if isinstance(arg, int) else default


# op: (a, b, arg) -> (the call, its arguments); (None, ()) where arg does not fit
NAME_OPS = {
    "stat": lambda a, b, arg: (os.lstat, (a,)),
    "listdir": lambda a, b, arg: (os.listdir, (a,)),
    "truncate": lambda a, b, arg: (os.truncate, (a, _num(arg, 0))),
    "rename": lambda a, b, arg: (os.rename, (a, b)),
    "link": lambda a, b, arg: (os.link, (a, b)),
    "symlink": lambda a, b, arg: (os.symlink, (a, b)),
    "unlink": lambda a, b, arg: (os.unlink, (a,)),
    "mkdir": lambda a, b, arg: (os.mkdir, (a,)),
    "rmdir": lambda a, b, arg: (os.rmdir, (a,)),
    "chmod": lambda a, b, arg: (os.chmod, (a, _num(arg, 0o644) & 0o7777)),
    "setxattr": lambda a, b, arg: (os.setxattr, (a, arg, b"v")) if isinstance(arg, str)
    else (os.setxattr, (a, "user.fz", arg[:1000] if isinstance(arg, bytes) else b"")),
    "getxattr": lambda a, b, arg: (os.getxattr, (a, arg if isinstance(arg, str) else "user.fz")),
    "listxattr": lambda a, b, arg: (os.listxattr, (a,)),
}


class Namespace(RuleBasedStateMachine):
    """One run of random steps on the shared mount (MOUNT, set by the test)."""
    mount = None

    def __init__(self) -> None:
        super().__init__()
        self.open_fds: set[int] = set()
        self.conv = None
        if not self.mount.alive():  # an earlier run broke it: each run starts served
            self.mount.kill9()
            self.mount.mount()
        self.known_bugs = len(self.mount.bugs())  # an earlier run's: reported by it

    def path(self, rel: str) -> str:
        if "/C/" in rel:
            if self.conv is None:
                got = call("clone", _read_file, str(self.mount.path / "models/scripted/clone"))
                self.conv = got.strip().decode() if isinstance(got, bytes) and got else "1"
            rel = rel.replace("/C/", f"/{self.conv}/")
        return str(self.mount.path / rel)

    # --- files --------------------------------------------------------------------
    @rule(rel=st.sampled_from(FILES), flags=FLAG, ops=st.lists(FILE_OP, min_size=1, max_size=5),
          keep=st.integers(0, 4), pick=st.integers(0, 99))
    def session(self, rel, flags, ops, keep, pick):
        """Open a file, make a few calls on it, close it (or keep it open, one time in
        five, for later steps)."""
        natural = NATURAL[rel]
        if flags is None:
            flags = OPEN_AS[natural]
            if "w" in natural:  # say something first, as a writer does
                said = DATA_FOR.get(rel.rsplit("/", 1)[-1], (b"hello\n",))
                ops = [("write", said[pick % len(said)])] + ops
        fd = call(f"open {rel} {flags:#o}", os.open, self.path(rel), flags | os.O_NONBLOCK, 0o644)
        if not isinstance(fd, int):
            return
        for op, arg in ops:
            file_op(fd, op, arg)
        if keep:
            call("close", os.close, fd)
        else:
            self.open_fds.add(fd)

    @rule(op=FILE_OP)
    def again(self, op):
        """A call on a file kept open by an earlier step (it may have changed since)."""
        if self.open_fds:
            file_op(sorted(self.open_fds)[0], *op)

    @rule()
    def close_one(self):
        if self.open_fds:
            fd = sorted(self.open_fds)[-1]
            self.open_fds.discard(fd)
            call("close", os.close, fd)

    # --- names --------------------------------------------------------------------
    @rule(op=st.sampled_from(sorted(NAME_OPS)), a=st.sampled_from(FILES),
          b=st.sampled_from(FILES), arg=st.one_of(st.sampled_from(
              (0, 3, 1 << 20, 0o644, 0o4755, 0o000) + XATTRS), DATA))
    def name(self, op, a, b, arg):
        fn, args = NAME_OPS[op](self.path(a), self.path(b), arg)
        if fn is not None:
            call(f"{op} {a} {b if op in ('rename', 'link', 'symlink') else ''}", fn, *args)

    # --- the system ---------------------------------------------------------------
    @rule(line=st.sampled_from((b"spawn z cmd=cat\n", b"spawn y cmd=cat\n", b"kill z\n",
                                b"kill y\n", b"halt\n", b"resume\n")))
    def kernel_ctl(self, line):
        call(f"ctl {line!r}", _write_file, self.path("ctl"), line)

    @rule(agent=st.sampled_from(AGENTS), line=st.sampled_from(
        (b"run fuzz\n", b"stop\n", b"start\n", b"restart\n", b"kill\n")))
    def agent_ctl(self, agent, line):
        call(f"agents/{agent}/ctl {line!r}", _write_file, self.path(f"agents/{agent}/ctl"), line)

    @rule(dice=st.integers(0, 5))
    def remount(self, dice):
        """Unmount and mount the same state (one time in six: it costs seconds): the
        same agents, tasks and mail."""
        if dice:
            return
        for fd in list(self.open_fds):
            self.open_fds.discard(fd)
            call("close", os.close, fd)
        m = self.mount
        before, pid = snapshot(m), m.pid
        m.umount()
        m.wait_gone(30)
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", \
            f"the server did not exit after umount\n{log_tail(m)}"
        try:
            m.mount()
        except BaseException as e:
            raise Broken(f"remount failed: {e!r}\n{log_tail(m)}") from None
        self.conv = None
        assert snapshot(m) == before

    # --- invariants ---------------------------------------------------------------
    @invariant()
    def healthy(self):
        m = self.mount
        if m is None:
            return
        assert m.alive(), f"the fs9 server died\n{log_tail(m)}"
        bugs = m.bugs()[self.known_bugs:]
        assert not bugs, "fs9 logged a bug:\n" + "\n".join(bugs)
        assert rss_mb(m.pid) < MAX_RSS_MB, f"the server grew to {rss_mb(m.pid):.0f} MB"

    def teardown(self):
        for fd in list(self.open_fds):
            try:
                os.close(fd)
            except OSError:
                pass


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def log_tail(mount, lines: int = 40) -> str:
    try:
        return "".join((mount.state / "fs9.log").read_text().splitlines(True)[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024


def snapshot(mount) -> dict:
    """The agents, and each one's tasks and mail, as names."""
    agents = mount.path / "agents"
    out = {}
    for name in sorted(os.listdir(agents)):
        out[name] = {part: sorted(os.listdir(agents / name / part))
                     for part in ("tasks", "mail")}
    return out


@pytest.mark.timeout(0 if LONG else 900)
def test_fuzz_the_namespace(mount):
    """Short and derandomized in `make test`; `make fuzz` runs long with a fresh seed."""
    (mount.vault / "fz" / "d").mkdir(parents=True)
    for name in ("fz/f", "fz/g", "fz/d/h"):
        (mount.vault / name).write_text("fuzz\n")
    mount.write("ctl", "spawn z cmd=cat\n")
    mount.write("ctl", "spawn y cmd=cat\n")
    Namespace.mount = mount
    try:
        run_state_machine_as_test(Namespace, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
            derandomize=not LONG, database=None, print_blob=True,
            phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck)))
    finally:
        Namespace.mount = None
        print("calls made:", dict(OUTCOMES.most_common()))
    ok = {c for (c, outcome), n in OUTCOMES.items() if outcome == "ok"}
    if sum(OUTCOMES.values()) >= VACUOUS_BELOW:  # (a tiny `make fuzz` may draw no file session)
        assert {"open", "read", "write", "close"} <= ok, f"a vacuous run: only {ok} succeeded"
