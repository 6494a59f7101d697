"""Test fixtures: a real fs9 mount in a temporary directory, served by a real process.

Tests drive it the way people and programs do: `sh -c` with echo/cat/ls, and
plain file I/O. Where this machine cannot mount FUSE, mount tests skip and say why.
"""
import contextlib
import errno
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# This checkout's temp dirs live apart from other pytest sessions on the machine: at its
# end a session deletes old numbered dirs under its root, and one it cannot delete
# (another suite's very deep tree makes shutil.rmtree raise RecursionError) fails it.
if "PYTEST_DEBUG_TEMPROOT" not in os.environ:
    _root = Path(tempfile.gettempdir()) / ("fs9-tests" + str(REPO).replace("/", "-"))
    _root.mkdir(mode=0o711, exist_ok=True)
    os.environ["PYTEST_DEBUG_TEMPROOT"] = str(_root)
# How long a test waits for something that should happen: generous, since the suite must
# pass on a loaded machine (tests wait on a condition, never on a guess of how long it takes)
WAIT_S = 30.0
# read(2)'s syscall number, to tell from /proc/PID/syscall that a process is blocked in it
READ_SYSCALL = {"x86_64": 0, "aarch64": 63, "riscv64": 63, "i686": 3, "armv7l": 3}.get(
    os.uname().machine)


STATES: set[str] = set()  # every Mount's state directory this session (no_scratch_left)


@pytest.fixture(scope="session", autouse=True)
def no_scratch_left():
    """At the session's end, the scratch roots of every Mount's state (a server killed
    -9 removes nothing; only its state's next mount would): /tmp is the machine's."""
    yield
    import zlib
    prefixes = tuple(f"fs9-scratch-{zlib.crc32(os.path.abspath(s).encode()):08x}-"
                     for s in STATES)
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if name.startswith(prefixes) and os.lstat(path).st_uid == 0:
            shutil.rmtree(path, ignore_errors=True)


def fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if not shutil.which("fusermount3"):
        return "fusermount3 missing (apt-get install fuse3)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"cannot open /dev/fuse: {e.strerror}"
    return None


def cannot_confine_c(gcc_for: str) -> str | None:
    """Why tests of confined agents running a C program cannot run here, or None."""
    from fs9.drivers import confine
    why = fuse_unavailable()
    if why:
        return f"cannot mount FUSE here: {why}"
    why = confine.unavailable()
    if why:
        return f"cannot confine here: {why}"
    if not shutil.which("gcc"):
        return f"gcc missing: {gcc_for}"
    return None


def compile_c(folder: Path, name: str, source: str, *flags: str) -> Path:
    """source compiled with gcc into folder/name (a test's racing program)."""
    (folder / f"{name}.c").write_text(source)
    r = subprocess.run(["gcc", "-O1", "-Wall", *flags, "-o", str(folder / name),
                        str(folder / f"{name}.c")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{name}.c does not compile:\n{r.stderr}"
    return folder / name


def racer_manifest(**env: str) -> str:
    """The manifest of a racing program (./racer) that owns vault/c and reads the rest
    of the vault, with env (its parameters) in its environment."""
    pairs = ", ".join(f'{k} = "{v}"' for k, v in env.items())
    return ('cmd = ["./racer"]\npledge = ["read", "write"]\ntimeout_s = 120\n'
            f'owns = ["vault/c"]\nenv = {{ {pairs} }}\n[unveil]\n"vault" = "r"\n'
            '"vault/c" = "rw"\n')


def racer_counts(out: str) -> dict[str, tuple[int, int]]:
    """A racing program's `STAT KIND ok=N fail=M` lines: kind -> (ok, fail), summed
    over its processes."""
    got: dict[str, tuple[int, int]] = {}
    for kind, ok, fail in re.findall(r"^STAT (\w+) ok=(\d+) fail=(\d+)$", out, re.M):
        o, f = got.get(kind, (0, 0))
        got[kind] = (o + int(ok), f + int(fail))
    return got


def wait_task(mount, agent: str, timeout: float = WAIT_S) -> tuple[str, str]:
    """Agent's (one) task, once ended: (out, err)."""
    def ended():
        s = mount.status(agent)
        return s if s["done"] != "0" or s["failed"] != "0" else None
    task = mount.wait_for(ended, timeout=timeout, what=f"agent {agent}'s task")["latest"]
    return (mount.read(f"agents/{agent}/tasks/{task}/out"),
            mount.read(f"agents/{agent}/tasks/{task}/err"))


def fs9(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fs9", *args], capture_output=True,
                          text=True, timeout=kw.pop("timeout", 60), **kw)


def errno_of(fn, *args) -> int | None:
    """The errno fn(*args) fails with; None if it succeeds."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def wait_for(predicate, timeout: float = WAIT_S, what: str = "condition"):
    """predicate()'s first true value, polled until timeout (then AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def blocked_reading(pid: int, path) -> bool:
    """Process pid is asleep in read(2) on the file path (its /proc/PID/syscall names
    read and a descriptor open on path): e.g. a subscriber that opened a topic and waits."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
        if READ_SYSCALL is None:  # an unknown architecture: asleep with path open will do
            with open(f"/proc/{pid}/stat") as f:
                asleep = f.read().rsplit(")", 1)[1].split()[0] == "S"
            return asleep and any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path)
                                  for fd in os.listdir(f"/proc/{pid}/fd"))
        if fields[0] != str(READ_SYSCALL):
            return False
        return os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}") == str(path)
    except (OSError, ValueError, IndexError):
        return False


def proc_report(pid: int) -> str:
    """What /proc says about a process and its threads (state, pending and blocked signals,
    the syscall and kernel stack it waits in): for a failure's message."""
    out = []
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError as e:
        return f"pid {pid}: {e.strerror}"
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        fields = {}
        for name in ("status", "wchan", "syscall", "stack"):
            try:
                with open(f"{base}/{name}") as f:
                    fields[name] = f.read().strip()
            except OSError as e:
                fields[name] = e.strerror
        status = {k: v.strip() for k, _, v in (line.partition(":") for line in
                                               fields.pop("status").splitlines())}
        keep = " ".join(f"{k}={status.get(k)}" for k in ("Name", "State", "SigPnd", "ShdPnd",
                                                         "SigBlk", "SigIgn", "SigCgt"))
        out.append(f"{pid}/{tid}: {keep} wchan={fields['wchan']} syscall={fields['syscall']}"
                   f"\n  " + fields["stack"].replace("\n", "\n  "))
    return "\n".join(out)


def pending_bytes(pipe) -> int:
    """How many bytes wait unread in a pipe (FIONREAD): what a child wrote to it so far."""
    import fcntl
    import termios
    buf = bytearray(4)
    fcntl.ioctl(pipe.fileno(), termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def read_until(pipe, predicate, timeout: float = WAIT_S, what: str = "output") -> bytes:
    """Read a child's pipe (raw, with os.read) until predicate(everything read) holds.
    Nothing is left in the file object's buffer, so its read() goes on from there."""
    fd, got = pipe.fileno(), b""
    deadline = time.monotonic() + timeout
    while not predicate(got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                 f"read {got[-300:]!r}")
        if select.select([fd], [], [], min(left, 0.5))[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"EOF while waiting for {what}; read {got[-300:]!r}")
            got += chunk
    return got


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


class Mount:
    """One fs9 server process and its mount point."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "mnt"
        self.state = root / "state"
        self.agents = root / "agents"
        self.vault = root / "vault"
        self.pid: int | None = None
        shutil.copytree(REPO / "agents", self.agents)

    # --- lifetime ----------------------------------------------------------
    def mount(self, *extra: str) -> "Mount":
        """Start the server (extra: more `fs9 mount` options, e.g. --durability power)."""
        STATES.add(str(self.state))
        r = fs9("mount", str(self.path), "--state", str(self.state), "--agents",
                str(self.agents), "--vault", str(self.vault), "--background", *extra)
        assert r.returncode == 0, r.stderr
        self.pid = int(dict(w.split("=") for w in self.read("ctl").split())["pid"])
        return self

    def umount(self) -> None:
        if mounted(self.path):
            r = fs9("umount", str(self.path))
            if r.returncode != 0:  # leave the machine clean whatever happened
                self.kill9()
        self.wait_gone()

    def kill9(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.wait_gone()
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)

    def wait_gone(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.pid and os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
            if open(f"/proc/{self.pid}/stat").read().split()[2] == "Z":
                break
            time.sleep(0.02)

    def bugs(self) -> list[str]:
        """Tracebacks the face logged (kind "bug"): each one is a defect of ours."""
        import sqlite3
        db = sqlite3.connect(f"file:{self.state / 'log.sqlite'}?mode=ro", uri=True)
        try:
            return [row[0] for row in db.execute("SELECT data FROM events WHERE kind='bug'")]
        finally:
            db.close()

    def alive(self) -> bool:
        return bool(self.pid) and os.path.exists(f"/proc/{self.pid}") and mounted(self.path)

    # --- driving it --------------------------------------------------------
    def sh(self, cmd: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        r = subprocess.run(["sh", "-c", cmd], cwd=self.path, capture_output=True,
                           text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"{cmd!r} failed: {r.stderr}"
        return r

    def read(self, rel: str) -> str:
        with open(self.path / rel) as f:
            return f.read()

    def write(self, rel: str, data: str | bytes) -> None:
        """data written with write(2) calls of its own: unbuffered, because a buffered
        file that failed to flush tries again at close, writing a refused line twice."""
        view = memoryview(data.encode() if isinstance(data, str) else data)
        with open(self.path / rel, "wb", buffering=0) as f:
            while view:
                n = f.write(view)
                if n is None:  # (FileIO's answer to EAGAIN)
                    raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
                view = view[n:]

    def status(self, agent: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.read(f"agents/{agent}/status").splitlines())

    def wait_for(self, predicate, timeout: float = WAIT_S, what: str = "condition"):
        return wait_for(predicate, timeout, what)

    def wait_reading(self, procs, rel: str, what: str = "") -> None:
        """Wait until every process of procs (Popen) is blocked in read(2) on rel: it has
        opened the file (a stream or topic subscribes at open) and waits for data."""
        path = self.path / rel
        self.wait_for(lambda: all(blocked_reading(p.pid, path) for p in procs),
                      what=what or f"{len(procs)} reader(s) blocked reading {rel}")

    def define(self, name: str, toml: str, files: dict[str, str] | None = None) -> None:
        """Write an agent definition (agent.toml and its program files)."""
        folder = self.agents / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "agent.toml").write_text(toml)
        for fname, text in (files or {}).items():
            (folder / fname).write_text(text)
            (folder / fname).chmod(0o755)


class Events:
    """An open `events` stream: everything published after it opened."""

    def __init__(self, mount: Mount) -> None:
        self.fd = os.open(mount.path / "events", os.O_RDONLY)
        self.buf = b""

    def lines(self, timeout: float = 2.0) -> list[str]:
        """Read what arrives within timeout (uses poll(2) on the stream)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and poller.poll(left * 1000):
            self.buf += os.read(self.fd, 65536)
        *done, self.buf = self.buf.split(b"\n")
        return [line.decode() for line in done]

    def until(self, predicate, timeout: float = WAIT_S, what: str = "events") -> list[dict]:
        """The events read until predicate(all of them so far) holds (bounded by timeout)."""
        import json
        seen: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            seen += [json.loads(line) for line in self.lines(0.2)]
            if predicate(seen):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                     f"saw {[e['kind'] for e in seen]}")

    def wait_kind(self, kind: str, timeout: float = WAIT_S, count: int = 1) -> list[dict]:
        """The events read until `count` events of `kind` came."""
        return self.until(lambda seen: sum(e["kind"] == kind for e in seen) >= count,
                          timeout, f"{count} {kind} event(s)")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@pytest.fixture(autouse=True)
def traversable_tmp(tmp_path):
    """Confined agents run as their own uids: they must be able to walk to the mount
    point and their program folders (pytest makes its temp dirs 0700)."""
    for p in [tmp_path, *tmp_path.parents]:
        if str(p) in ("/", tempfile.gettempdir()):
            break
        p.chmod(p.stat().st_mode | 0o011)


@pytest.fixture
def mount(tmp_path):
    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"cannot mount FUSE here: {reason}")
    m = Mount(tmp_path)
    m.mount()
    try:
        yield m
    finally:
        m.umount()
    bugs = m.bugs()
    assert not bugs, "a handler hit an unexpected exception:\n" + "\n".join(bugs)


@pytest.fixture
def overflowing_mount(mount):
    """The mount, mounted again while the kernel's inotify queue held 8 events: its
    watcher's queue overflows at the first burst of changes. The limit
    (/proc/sys/fs/inotify/max_queued_events) is machine-wide and an inotify instance takes
    it when made, so it is restored as soon as the mount is up (its watcher made one)."""
    limit = "/proc/sys/fs/inotify/max_queued_events"
    try:
        with open(limit) as f:
            saved = f.read()
        with open(limit, "w") as f:
            f.write("8\n")
    except OSError as e:
        pytest.skip(f"cannot lower {limit}: {e}")
    try:
        mount.umount()
        mount.mount()
    finally:
        with open(limit, "w") as f:
            f.write(saved)
    yield mount


@pytest.fixture
def events(mount):
    ev = Events(mount)
    yield ev
    ev.close()


# --- processes seen from /proc (tests of sandboxes and their ends) -----------------------

def uid_procs(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                found.append(int(entry))
        except OSError:
            pass
    return found


def _ppid(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None


def fork_server(mount) -> int:
    """The pid of the mount's fork server (a child of the fs9 server)."""
    def find():
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and _ppid(int(entry)) == mount.pid and \
                        b"fs9.drivers.forkserver" in open(f"/proc/{entry}/cmdline", "rb").read():
                    return int(entry)
            except OSError:
                pass
        return None
    return mount.wait_for(find, what="the fork server")


@contextlib.contextmanager
def shared_vault(tmp_path, top_mode: int):
    """fs9 mounted with --share-vault (other local users reach the vault through it),
    the vault's top given top_mode; skips where that cannot be; no bug event at the end."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"cannot mount FUSE here: {reason}")
    if os.geteuid() != 0:
        pytest.skip("other users reach a FUSE mount only through allow_other, which fs9 "
                    "sets when mounted as root")
    m = Mount(tmp_path)
    m.mount("--share-vault")
    try:
        os.chmod(m.path / "vault", top_mode)
        yield m
    finally:
        m.umount()
    bugs = m.bugs()
    assert not bugs, "a handler hit an unexpected exception:\n" + "\n".join(bugs)
