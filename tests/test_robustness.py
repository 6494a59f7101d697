"""Robustness: no handler may let an exception escape (pyfuse3 unmounts on one).

A seeded fuzzer throws random bytes and odd operations at every file of a live
mount, and stress-ng's filesystem stressors run against the mount root and
agents/. Afterwards: the daemon is up and still mounted, ls and cat work, a task
that finished before the abuse is byte-for-byte intact (also after a remount,
i.e. the event log still replays), and no `bug` event (the face's record of an
unexpected exception in a handler) was logged. Every refusal along the way must
be a clean OSError with an errno (never EIO, which is what a bug becomes), and
nothing may hang (a watchdog kills the server rather than let the test hang).

The bugs this module found (spawn values that raised in the kernel or killed
the daemon, a killed agent still taking commands, a non-ASCII digit as a task
name, refusal notes written into a finished task's stderr) each keep a minimal
regression test at the end, as does a restart window of zero seconds (which
used to turn the supervisor's restart limit off).

The fuzzer is seeded: FS9_FUZZ_SEED (default 9) picks another run and
FS9_FUZZ_SECONDS (default 10) the length of its random phase. It never sends
input that would make an agent run a real program (a shell, say) or that
targets the agent whose task it checks.
"""
import collections
import ctypes
import errno
import json
import os
import random
import select
import shlex
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
from contextlib import contextmanager

import pytest

WRITABLE = ("/ctl", "/in", "/mail/new", "/progress", "/request", "/steps", "/approve",
            "/sagas/new")  # besides the root ctl, topics/*
WRITE_ONLY = ("/in", "/mail/new", "/progress", "/request", "/steps", "/approve", "/sagas/new")

from conftest import Mount, fuse_unavailable
from fs9.kernel.agents import manifest as manifests

SEED = int(os.environ.get("FS9_FUZZ_SEED", "9"))
FUZZ_S = float(os.environ.get("FS9_FUZZ_SECONDS", "10"))
KEEP = "Keep.ref"  # the fuzzer's names are lowercase: it can never spawn, kill or feed this one
DEFS = ("echo", "upper", "counter", "ticker")  # the definitions in the repo's agents/
SAFE_PROGRAMS = {"cat", "true", "false"}  # what a fuzzed spawn may run (no shells!)
OP_LIMIT_S = 10  # one file operation taking longer than this is a hang
BAD_ERRNOS = {errno.EIO, errno.ENOTCONN, errno.ECONNABORTED}  # a bug, or a dead server


# --- observing the server ------------------------------------------------------------

def bug_events(mount) -> list[dict]:
    """Every `bug` event in the log (read-only, straight from SQLite)."""
    db = sqlite3.connect(f"file:{mount.state / 'log.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT seq, data FROM events WHERE kind = 'bug' ORDER BY seq").fetchall()
    finally:
        db.close()
    return [{"seq": seq, **json.loads(data)} for seq, data in rows]


def describe_bugs(bugs: list[dict]) -> str:
    return "\n".join(f"#{b['seq']} in {b.get('handler')}: ...{b.get('traceback', '')[-700:]}"
                     for b in bugs[:5])


def task_files(mount, agent: str, tid: str) -> dict[str, bytes]:
    folder = mount.path / "agents" / agent / "tasks" / tid
    return {name: (folder / name).read_bytes() for name in ("input", "out", "err", "status")}


def run_reference_task(mount) -> tuple[str, dict[str, bytes]]:
    """Spawn KEEP, run one task with awkward bytes to completion; its files as they are now."""
    mount.write("ctl", f"spawn {KEEP} def=echo\n")
    data = b"reference task \xff\xfe\x00 NUL and invalid UTF-8\n" + bytes(range(256))
    mount.write(f"agents/{KEEP}/in", data)
    (tid,) = os.listdir(mount.path / "agents" / KEEP / "tasks")
    mount.wait_for(lambda: b"state=done" in task_files(mount, KEEP, tid)["status"],
                   what="the reference task to finish")
    files = task_files(mount, KEEP, tid)
    assert files["input"] == data and files["out"] == data, files
    assert b"exit=0" in files["status"]
    return tid, files


def assert_healthy(mount, tid: str, files: dict[str, bytes], note: str = "") -> None:
    """Up, mounted, ls and cat work, the earlier task is intact, no bug was logged."""
    assert mount.alive(), f"the fs9 server died or was unmounted {note}"
    assert sorted(os.listdir(mount.path)) == ["agents", "approvals", "ctl", "err", "events", "federation", "log", "mail", "metrics", "models", "nodes", "registry", "search", "status", "topics", "tree", "vault"], note
    r = mount.sh(f"ls agents && ls agents/{KEEP}/tasks && cat status ctl "
                 f"agents/{KEEP}/status agents/{KEEP}/tasks/{tid}/status", timeout=20)
    assert r.returncode == 0, f"ls/cat failed {note}: {r.stderr}"
    assert KEEP in r.stdout.split() and tid in r.stdout.split(), r.stdout
    assert task_files(mount, KEEP, tid) == files, f"the earlier task changed {note}"
    bugs = bug_events(mount)
    assert not bugs, f"{len(bugs)} bug event(s) {note}:\n{describe_bugs(bugs)}"


def assert_still_runs_tasks(mount) -> None:
    """The kernel still runs new work (resume: the fuzzer may have halted it)."""
    mount.write("ctl", "resume\n")
    mount.write("ctl", "spawn After.ref def=echo\n")
    mount.write("agents/After.ref/in", b"still working\n")
    mount.wait_for(lambda: mount.status("After.ref")["done"] == "1",
                   what="a new task to run after the abuse")
    assert mount.read("agents/After.ref/out") == "still working\n"


def assert_replays(mount, tid: str, files: dict[str, bytes]) -> None:
    """Unmount and mount again from the same log: the earlier task is still there."""
    mount.umount()
    mount.mount()
    assert_healthy(mount, tid, files, "after a remount (log replay)")


class Watchdog:
    """Turns a hang into a failure: if an operation takes longer than `limit`, kill -9 the
    server (aborting the FUSE connection, so the stuck call returns) and say which one."""

    def __init__(self, mount, limit: float = OP_LIMIT_S) -> None:
        self.mount, self.limit = mount, limit
        self.ops: dict[int, tuple[str, float]] = {}  # thread -> (operation, started)
        self.hung: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for what, since in list(self.ops.values()):
                if now - since > self.limit:
                    self.hung = what
                    self.mount.kill9()
                    return

    @contextmanager
    def op(self, what: str):
        me = threading.get_ident()
        self.ops[me] = (what, time.monotonic())
        try:
            yield
        finally:
            self.ops.pop(me, None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- what the fuzzer must not send ----------------------------------------------------

def unsendable(target: str, data: bytes, agents_dir) -> str | None:
    """Why writing data to target is off limits, or None: "unsafe-program" (random input
    must never choose a real program for an agent to run, say a shell fed random bytes)
    or "targets-keep" (the agent whose earlier task is checked). Parses like the kernel
    (fs9.kernel.cmd and manifest), never raises."""
    if not (target == "ctl" or target.endswith("/ctl")):
        return None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None  # refused whole, before any line is looked at
    found = [_hazard(target, line.strip(), agents_dir) for line in text.splitlines()]
    return next((f for f in ("unsafe-program", "targets-keep") if f in found), None)


def _hazard(target: str, line: str, agents_dir) -> str | None:
    verb, _, rest = line.partition(" ")
    if (target == "ctl" and KEEP in line) or (verb == "kill" and KEEP in target):
        return "targets-keep"
    if verb != "spawn" or target != "ctl":
        return None
    try:
        words = shlex.split(rest)
    except ValueError:
        return None
    kv = {}
    for w in words[1:]:
        try:
            key, value = manifests.parse_override(w)
        except Exception:
            continue
        kv[key] = value
    cmd = kv.get("cmd")
    if isinstance(cmd, str):
        try:
            cmd = shlex.split(cmd)
        except ValueError:
            cmd = None
    if isinstance(cmd, list) and cmd and isinstance(cmd[0], str) and (
            os.path.basename(cmd[0]) not in SAFE_PROGRAMS and shutil.which(cmd[0])):
        return "unsafe-program"
    d = kv.get("def")
    if isinstance(d, str) and d not in DEFS and os.path.exists(
            os.path.join(str(agents_dir), d, "agent.toml")):
        return "unsafe-program"
    return None


def fallocate(fd: int, offset: int, length: int) -> None:
    """fallocate(2) itself (os.posix_fallocate falls back to writing zeros)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, 0, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# --- the fuzzer ----------------------------------------------------------------------

NAMES_ODD = ["", ".", "..", "a/b", "-x", "x" * 65, "\u00fc", "a b", "'", '"', "\\", "#x",
             "spawn", "fz\u200b", "FZ", "_", "9", "a.b-c_d"]
KEYS = list(manifests.KNOWN_KEYS) + ["def", "bogus", "", "=", "cmd", "cmd", "def", "mode"]
VALUES = {
    "cmd": ["cat", "true", "false", "'[\"cat\"]'", "'cat -u'", "'[\"cat\", \"-u\"]'",
            "'\"true\"'", "fz-no-such-program", "/nonexistent/fz", "./fz-missing", "''",
            "'[]'", "'[1]'", "'{}'", "'\"'", "1", "true", "'[\"cat\", 2]'", "\\'",
            "'[\"cat\", \"a\\u0000b\"]'"],
    "def": list(DEFS) + ["nosuch", "..", ".", "/", "/etc", "''", "echo/..", "'a b'", "ech",
            "1", "[1]", "true", "ech\x00o"],
    "mode": ["task", "daemon", "daemon", "bogus", "1", "''"],
    "restart": ["permanent", "transient", "temporary", "sometimes", "[1]"],
    "priority": ["interactive", "normal", "background", "urgent", "0"],
    "clearance": ["public", "internal", "confidential", "secret"],
    "env": ["'{}'", "'{A=\"1\"}'", "'{PATH=\"/nonexistent\"}'", "1", "'{A=1}'",
            "'{A={B=\"c\"}}'", "'{FS9_X=\"\u00fc\"}'", "'[\"a\"]'", "'{A=\"a\\u0000b\"}'",
            "'{\"A=B\"=\"c\"}'"],
}
NUMBERS = ["0", "1", "-1", "0.5", "1e400", "-1e400", "inf", "-inf", "999999999999999999999",
           "1_0", "0x1f", "true", "'\"3\"'", "''", "[1]", "3", "nan", "-nan"]
TEXTS = ["hello", "'two words'", "'\"quoted\"'", "'[1, \"a\"]'", "'{a=1}'", "\u00fc\u00f1\u00ee",
         "''", "'\"unterminated'", "x" * 300, "1979-05-27", "07:32:00", "1979-05-27T07:32:00Z",
         "[" * 300 + "]" * 300, "[" * 2000 + "]" * 2000,
         "'" + "{a=" * 1000 + "1" + "}" * 1000 + "'"]


class Fuzzer:
    """Seeded random abuse of one mount. Counts what happened; collects what was wrong."""

    def __init__(self, mount, seed: int, dog: Watchdog | None = None) -> None:
        self.mount = mount
        self.rng = random.Random(seed)
        self.seed = seed
        self.dog = dog or Watchdog(mount)
        self.results: collections.Counter = collections.Counter()
        self.problems: list[str] = []  # bad errnos, wrong errnos, unexpected exceptions
        self.skipped: collections.Counter = collections.Counter()
        self.files: list[str] = []
        self.dirs: list[str] = []
        self.agents: list[str] = []
        self.big_inputs = 0

    # --- bookkeeping -------------------------------------------------------------

    def p(self, rel: str) -> str:
        return os.path.join(self.mount.path, rel) if rel else str(self.mount.path)

    def attempt(self, what: str, fn, *args, expect: set[int] | None = None, ok: bool = True):
        """Run one operation; an OSError must carry a sane errno (in `expect` if given)."""
        with self.dog.op(what):
            try:
                value = fn(*args)
                outcome = "ok"
            except OSError as e:
                value = None
                outcome = errno.errorcode.get(e.errno, str(e.errno))
                if e.errno is None:
                    self.problems.append(f"{what}: OSError without errno: {e!r}")
                elif e.errno in BAD_ERRNOS:
                    self.problems.append(f"{what}: {outcome} ({e.strerror})")
                elif expect is not None and e.errno not in expect:
                    self.problems.append(f"{what}: {outcome}, expected "
                                         f"{sorted(errno.errorcode[x] for x in expect)}")
        if outcome == "ok" and not ok:
            self.problems.append(f"{what}: succeeded, expected an error")
        self.results[(what.split(" ", 1)[0], outcome)] += 1
        return value

    def walk(self) -> None:
        """Every file and directory now (at most a few tasks per agent)."""
        files, dirs, queue = [], [], [""]
        while queue:
            rel = queue.pop()
            dirs.append(rel)
            try:
                with self.dog.op(f"listdir {rel!r}"):
                    names = sorted(os.listdir(self.p(rel)), key=lambda n: (len(n), n))
            except OSError as e:
                if e.errno in BAD_ERRNOS:
                    self.problems.append(f"listdir {rel!r}: {errno.errorcode[e.errno]}")
                continue
            if rel.endswith("/tasks"):
                names = names[:2] + names[-2:]
            for name in names:
                child = os.path.join(rel, name) if rel else name
                if name in ("vault", "search") and (not rel or rel.endswith("/view")):
                    continue  # a real directory, and one where every name exists (a query):
                    # each tested on its own (test_vault.py, test_search.py)
                try:
                    mode = os.lstat(self.p(child)).st_mode
                except OSError:
                    continue  # went away
                (queue if stat.S_ISDIR(mode) else files).append(child)
        self.files, self.dirs = files, dirs
        self.agents = [d.split("/")[1] for d in dirs
                       if d.count("/") == 1 and d.startswith("agents/")]

    def stream(self, rel: str) -> bool:
        return rel == "events" or rel.startswith("topics/") or rel.endswith(
            ("/out", "/err", "/mail/next"))

    def writable(self) -> list[str]:
        return [f for f in self.files
                if f == "ctl" or f.endswith(WRITABLE) or f.startswith("topics/")]

    # --- payloads ------------------------------------------------------------------

    def name(self) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.75:
            return f"fz{rng.randrange(10)}"
        if r < 0.85:
            return rng.choice(DEFS)
        if r < 0.9:
            return "fz" + "".join(rng.choice("abcxyz019_.-") for _ in range(rng.randint(1, 20)))
        return rng.choice(NAMES_ODD)

    def kv(self) -> str:
        rng = self.rng
        key = rng.choice(KEYS)
        if key in VALUES:
            value = rng.choice(VALUES[key])
        elif key in ("max_restarts", "within_s", "timeout_s"):
            value = rng.choice(NUMBERS)
        else:
            value = rng.choice(TEXTS + NUMBERS[:3])
        if rng.random() < 0.05:
            return key  # no '='
        return f"{key}={value}"

    def root_line(self) -> str:
        rng = self.rng
        verb = rng.choices(["spawn", "kill", "halt", "resume", "", "spa", "spawnx", "KILL", "#"],
                           [40, 12, 3, 8, 2, 2, 1, 1, 1])[0]
        if verb == "spawn":
            words = [self.name()] + [self.kv() for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 5]))]
            if rng.random() < 0.6 and not any(w.startswith(("cmd=", "def=")) for w in words):
                words.append(rng.choice(["cmd=cat", "'cmd=\"true\"'", "def=echo",
                                         "'cmd=[\"false\"]'"]))
            return "spawn " + " ".join(words)
        if verb in ("kill", "KILL"):
            target = rng.choice(self.agents + [self.name()]) if self.agents else self.name()
            return f"{verb} {target}" + rng.choice(["", "", " extra"])
        return verb + rng.choice(["", "", " arg"])

    def agent_line(self) -> str:
        rng = self.rng
        verb = rng.choices(["run", "stop", "start", "restart", "kill", "priority", "ru", "",
                            "prio", "run\t", "RUN"], [40, 6, 8, 6, 3, 8, 2, 2, 1, 1, 1])[0]
        if verb == "run":
            return "run " + rng.choice(["hello", "", "   ", "x" * rng.randint(1, 2000),
                                        "'unbalanced", "\u00fc\u00f1 \u2028 split", "a\tb"])
        if verb == "priority":
            return "priority " + rng.choice(["interactive", "normal", "background", "",
                                             "urgent", "normal extra"])
        return verb + rng.choice(["", "", " arg", " 1 2 3"])

    def text_payload(self, line) -> bytes:
        """Lines of commands, in all the shapes a writer might produce."""
        rng = self.rng
        shape = rng.choices(["one", "nonl", "lines", "seps", "mutated", "partial", "comment",
                             "invalid-utf8", "nul", "huge", "many", "crlf"],
                            [30, 8, 8, 4, 8, 4, 3, 4, 3, 2, 2, 2])[0]
        if shape == "one":
            return (line() + "\n").encode()
        if shape == "nonl":
            return line().encode()
        if shape == "lines":
            return "".join(line() + "\n" for _ in range(rng.randint(2, 20))).encode()
        if shape == "seps":
            seps = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
            return rng.choice(seps).join(line() for _ in range(rng.randint(2, 4))).encode()
        if shape == "mutated":
            b = bytearray((line() + "\n").encode())
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(b))
                b[i] = rng.randrange(256)
            return bytes(b)
        if shape == "partial":
            s = (line() + "\n").encode()
            return s[:rng.randint(0, len(s))]
        if shape == "comment":
            return rng.choice([b"# nothing\n", b"\n\n\n", b"   \n", b"#", b" # x\n\t\n"])
        if shape == "invalid-utf8":
            s = (line() + "\n").encode()
            i = rng.randint(0, len(s))
            return s[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                                       b"\xc0\xaf", b"\x80"]) + s[i:]
        if shape == "nul":
            s = (line() + "\n").encode()
            i = rng.randint(0, len(s))
            return s[:i] + b"\x00" * rng.randint(1, 3) + s[i:]
        if shape == "huge":
            return (line() + " " + "y" * rng.choice([4096, 70000, 300000]) + "\n").encode()
        if shape == "many":
            return b"".join((line() + "\n").encode() for _ in range(rng.randint(100, 600)))
        return (line() + "\r\n").encode()

    def payload(self, target: str) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.15:
            return rng.randbytes(rng.randint(0, 300))
        if r < 0.2:
            return bytes(rng.choice([0, 10, 32, 255]) for _ in range(rng.randint(1, 200)))
        if target.endswith("/in"):
            if r < 0.9:
                return rng.randbytes(rng.choice([1, 10, 100, 5000]))
            if self.big_inputs < 3:
                self.big_inputs += 1
                return os.urandom(rng.choice([70000, 1 << 20]))
            return b""
        if target == "ctl":
            return self.text_payload(self.root_line)
        return self.text_payload(self.agent_line)

    # --- operations ----------------------------------------------------------------

    def skip(self, rel: str, data: bytes) -> bool:
        why = unsendable(rel, data, self.mount.agents)
        if why:
            self.skipped[why] += 1
        return why is not None

    def write(self, rel: str, data: bytes, flags: int = 0, chunks: int = 1) -> None:
        if self.skip(rel, data):
            return
        kind = ("root-ctl" if rel == "ctl" else "agent-ctl" if rel.endswith("/ctl")
                else "in" if rel.endswith("/in") else "other")
        what = f"write:{kind} {rel!r} {len(data)}B {data[:60]!r}"
        fd = self.attempt(what, os.open, self.p(rel), os.O_WRONLY | flags)
        if fd is None:
            return
        try:
            step = max(1, len(data) // chunks)
            for i in range(0, max(len(data), 1), step):
                if self.attempt(what, os.write, fd, data[i:i + step]) is None:
                    break
        finally:
            self.attempt(f"close {rel!r} after {what}", os.close, fd)

    def write_too_big(self, rel: str) -> None:
        """More than one open of `in` may collect: EFBIG, cleanly."""
        fd = self.attempt(f"open {rel!r}", os.open, self.p(rel), os.O_WRONLY)
        if fd is None:
            return
        try:
            block = b"z" * (1 << 20)
            for _ in range(17):
                if self.attempt(f"write-17MiB {rel!r}", os.write, fd, block,
                                expect={errno.EFBIG, errno.ENOENT}) is None:
                    break
            else:
                self.problems.append(f"{rel}: 17 MiB accepted into one open of in")
        finally:
            self.attempt(f"close {rel!r}", os.close, fd)

    def read(self, rel: str, offset: int | None = None) -> None:
        fd = self.attempt(f"open-r {rel!r}", os.open, self.p(rel), os.O_RDONLY | os.O_NONBLOCK)
        if fd is None:
            return
        try:
            with self.dog.op(f"poll {rel!r}"):
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                readable = bool(poller.poll(0))
            if not readable:
                self.results[("read", "not-ready")] += 1
            elif offset is None:
                self.attempt(f"read {rel!r}", os.read, fd, 1 << 16)
            else:
                expect = {errno.ESPIPE} if self.stream(rel) else None
                self.attempt(f"pread {rel!r} @{offset}", os.pread, fd, 4096, offset, expect=expect)
        finally:
            self.attempt(f"close {rel!r}", os.close, fd)

    def sweep_file(self, rel: str) -> None:
        """Every odd operation on one file, with the errno each must give."""
        p, rng = self.p(rel), self.rng
        A, P, N = errno.EACCES, errno.EPERM, errno.ENOENT
        note = "/memory/" in rel  # an agent's note: written whole, rm deletes it
        writable = rel == "ctl" or rel.endswith(WRITABLE) or rel.startswith("topics/") or note
        message = ("/mail/" in "/" + rel and not rel.endswith(("/new", "/next"))
                   and "/dead/" not in "/" + rel) or note
        self.attempt(f"chmod {rel!r}", os.chmod, p, 0o777, expect={P, N}, ok=False)
        self.attempt(f"chown {rel!r}", os.chown, p, os.getuid(), os.getgid(), expect={P, N},
                     ok=False)
        self.attempt(f"utime {rel!r}", os.utime, p, (1, 1), expect={P, A, N},
                     ok=writable)  # accepted and ignored, so `touch` works
        self.attempt(f"truncate {rel!r}", os.truncate, p, 0, expect={P, A, N}, ok=writable)
        self.attempt(f"truncate-grow {rel!r}", os.truncate, p, 1 << 40,
                     expect={P, A, N, errno.EFBIG})
        self.attempt(f"unlink {rel!r}", os.unlink, p, expect={A, N}, ok=message)  # rm acks mail
        self.attempt(f"rename {rel!r}", os.rename, p, p + ".moved", expect={A, N}, ok=False)
        if rel != "status":  # (onto itself is a no-op the kernel answers alone)
            self.attempt(f"rename-over {rel!r}", os.rename, p, self.p("status"), expect={A, N},
                         ok=False)
        self.attempt(f"link {rel!r}", os.link, p, p + ".link", expect={A, P, N}, ok=False)
        self.attempt(f"rmdir {rel!r}", os.rmdir, p, expect={errno.ENOTDIR, A, N}, ok=False)
        self.attempt(f"readlink {rel!r}", os.readlink, p, expect={errno.EINVAL, N}, ok=False)
        fd = self.attempt(f"open-excl {rel!r}", os.open, p, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                          expect={errno.EEXIST, A, N}, ok=message)  # acked above: a new name
        if fd is not None:
            self.attempt(f"close-excl {rel!r}", os.close, fd)
        self.attempt(f"open-dir {rel!r}", os.open, p, os.O_RDONLY | os.O_DIRECTORY,
                     expect={errno.ENOTDIR, N}, ok=False)
        for name in ("user.fz", "trusted.fz", "security.fz"):
            self.attempt(f"setxattr {rel!r} {name}", os.setxattr, p, name, rng.randbytes(8),
                         expect={errno.ENOTSUP, P, N}, ok=False)
            self.attempt(f"getxattr {rel!r} {name}", os.getxattr, p, name,
                         expect={errno.ENODATA, errno.ENOTSUP, N}, ok=False)
            self.attempt(f"removexattr {rel!r} {name}", os.removexattr, p, name,
                         expect={errno.ENODATA, errno.ENOTSUP, P, N}, ok=False)
        # only vault files have extended attributes: the namespace lists none (see ops.py)
        self.attempt(f"listxattr {rel!r}", os.listxattr, p, expect={N})
        self.attempt(f"stat {rel!r}", os.stat, p, expect={N})
        self.attempt(f"statvfs {rel!r}", os.statvfs, p, expect={N})
        self.attempt(f"access {rel!r}", os.access, p, os.W_OK)
        if not writable:
            self.attempt(f"open-w {rel!r}", os.open, p, os.O_WRONLY, expect={A, P, N}, ok=False)
            self.attempt(f"open-rw {rel!r}", os.open, p, os.O_RDWR, expect={A, P, N}, ok=False)
        else:
            fd = self.attempt(f"open-rw {rel!r}", os.open, p, os.O_RDWR, expect={N})
            if fd is not None:
                if rel.endswith(WRITE_ONLY):  # reads refused
                    self.attempt(f"read-in {rel!r}", os.read, fd, 100, expect={A}, ok=False)
                self.attempt(f"ftruncate {rel!r}", os.ftruncate, fd, 0, expect={N})
                self.attempt(f"fsync {rel!r}", os.fsync, fd, expect={N})
                self.attempt(f"fallocate {rel!r}", fallocate, fd, 0, 4096,
                             expect={errno.EOPNOTSUPP, N}, ok=False)
                self.attempt(f"lseek-data {rel!r}", os.lseek, fd, 0, os.SEEK_DATA,
                             expect={errno.ENXIO, errno.EINVAL, errno.ENOSYS, errno.ESPIPE})
                self.attempt(f"close {rel!r}", os.close, fd)
        if not rel.endswith(WRITE_ONLY):
            for offset in (None, 0, 1, 4096, 1 << 31, 1 << 40, (1 << 62) + 7):
                self.read(rel, offset)

    def sweep_dir(self, rel: str) -> None:
        p = self.p(rel)
        A, N = errno.EACCES, errno.ENOENT
        new = os.path.join(p, f"fz-new-{self.rng.randrange(10**6)}")
        existing = self.attempt(f"listdir {rel!r}", os.listdir, p, expect={N}) or []
        existing.sort()
        self.attempt(f"mkdir {rel!r}", os.mkdir, new, expect={N, A}, ok=False)
        # a new name here is a message (mail/, outbox/ to a real agent) or a topic
        takes_files = rel.endswith(("/mail", "/memory")) or rel == "topics"  # (and notes)
        fd = self.attempt(f"create {rel!r}", os.open, new + "-c", os.O_WRONLY | os.O_CREAT,
                          0o644, expect={N, A}, ok=takes_files)
        if fd is not None:
            self.attempt(f"close-new {rel!r}", os.close, fd)
        self.attempt(f"mkfifo {rel!r}", os.mkfifo, new, expect={N, A}, ok=False)
        self.attempt(f"mknod {rel!r}", os.mknod, new, 0o600 | stat.S_IFREG, expect={N, A}, ok=False)
        self.attempt(f"symlink {rel!r}", os.symlink, "target", new, expect={N, A}, ok=False)
        self.attempt(f"link-into {rel!r}", os.link, self.p("ctl"), new,
                     expect={N, A, errno.EPERM}, ok=False)
        self.attempt(f"unlink-absent {rel!r}", os.unlink, new, expect={N}, ok=False)
        self.attempt(f"rename-absent {rel!r}", os.rename, new, new + "2", expect={N}, ok=False)
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND):
            self.attempt(f"open-dir-w {rel!r} {flags:#o}", os.open, p, flags,
                         expect={N, errno.EISDIR}, ok=False)
        self.attempt(f"open-dir-trunc {rel!r}", os.open, p, os.O_RDONLY | os.O_TRUNC,
                     expect={N, errno.EISDIR, A, errno.EPERM}, ok=False)
        # EACCES: a directory of a view, which the agent may see but not change
        self.attempt(f"chmod-dir {rel!r}", os.chmod, p, 0o777, expect={N, errno.EPERM, errno.EACCES},
                     ok=False)
        self.attempt(f"truncate-dir {rel!r}", os.truncate, p, 0, expect={N, errno.EISDIR}, ok=False)
        self.attempt(f"setxattr-dir {rel!r}", os.setxattr, p, "user.fz", b"1",
                     expect={N, errno.ENOTSUP}, ok=False)
        if rel:
            self.attempt(f"rmdir {rel!r}", os.rmdir, p, expect={N, A, errno.ENOTEMPTY}, ok=False)
            self.attempt(f"rename-dir {rel!r}", os.rename, p, p + ".moved", expect={N, A}, ok=False)
            self.attempt(f"unlink-dir {rel!r}", os.unlink, p,
                         expect={N, errno.EISDIR, A, errno.EPERM}, ok=False)
        if existing:
            self.attempt(f"mkdir-existing {rel!r}", os.mkdir, os.path.join(p, existing[0]),
                         expect={N, errno.EEXIST}, ok=False)
            self.attempt(f"rename-into-self {rel!r}", os.rename, os.path.join(p, existing[0]),
                         os.path.join(p, existing[-1]), expect={N, A, errno.EISDIR, errno.ENOTDIR},
                         ok=len(existing) == 1)
        odd = ["0", "00", "-1", "+1", " 1", "1 ", "1e3", "99999999999999999999999999",
               "\u0663", "\uff11", "\u00b2", "\u2460", "\u00e9", "x" * 255, ".x", "..."]
        for name in odd:
            self.attempt(f"lookup {rel!r}/{name!r}", os.stat, os.path.join(p, name), expect={N})
        self.attempt(f"lookup {rel!r}/<invalid utf-8>", os.stat, os.fsencode(p) + b"/\xff\xfe",
                     expect={N}, ok=False)
        for size in (256, 1025, 5000):  # over f_namemax, FUSE_NAME_MAX, PATH_MAX
            self.attempt(f"lookup {rel!r}/<{size} bytes>", os.stat, os.path.join(p, "y" * size),
                         expect={N, errno.ENAMETOOLONG}, ok=False)

    def random_op(self) -> None:
        rng = self.rng
        op = rng.choices(["write", "write-chunked", "write-trunc", "write-rw", "read", "pread",
                          "sweep-file", "sweep-dir", "walk"], [60, 8, 5, 5, 6, 3, 3, 1, 2])[0]
        if op == "walk":
            return self.walk()
        if op == "sweep-dir":
            return self.sweep_dir(rng.choice(self.dirs))
        if op in ("read", "pread", "sweep-file"):
            rel = rng.choice(self.files + ["agents/fz-none/out", "nope"])
            if op == "sweep-file":
                return self.sweep_file(rel)
            return self.read(rel, None if op == "read" else rng.choice([0, 17, 1 << 33]))
        # writes go mostly to what takes writes, sometimes to anything
        pool = self.writable() if rng.random() < 0.9 else self.files + ["agents/fz-none/in"]
        rel = rng.choice(pool)
        data = self.payload(rel)
        if op == "write":
            self.write(rel, data)
        elif op == "write-chunked":
            self.write(rel, data, chunks=rng.randint(2, 8))
        elif op == "write-trunc":
            self.write(rel, data, flags=rng.choice([os.O_TRUNC, os.O_APPEND, os.O_SYNC]))
        else:
            if self.skip(rel, data):
                return
            fd = self.attempt(f"open-rw {rel!r}", os.open, self.p(rel), os.O_RDWR)
            if fd is not None:
                self.attempt(f"pwrite {rel!r} {data[:60]!r}", os.pwrite, fd, data,
                             rng.choice([0, 5, 1 << 40]))
                if not self.stream(rel):  # a topic read waits for the next event
                    self.attempt(f"read-after-write {rel!r}", os.read, fd, 100)
                self.attempt(f"close {rel!r}", os.close, fd)

    def held_handles(self, rounds: int) -> None:
        """Several opens kept at once, written in turn and closed out of order."""
        rng = self.rng
        for _ in range(rounds):
            self.walk()
            held = []
            for rel in rng.sample(self.writable(), min(8, len(self.writable()))):
                fd = self.attempt(f"hold {rel!r}", os.open, self.p(rel), os.O_WRONLY)
                if fd is not None:
                    held.append((rel, fd))
            for _ in range(30):
                if not held:
                    break
                rel, fd = rng.choice(held)
                data = self.payload(rel)
                if self.skip(rel, data):
                    continue
                self.attempt(f"held-write {rel!r} {data[:60]!r}", os.write, fd, data)
            rng.shuffle(held)
            for rel, fd in held:
                self.attempt(f"held-close {rel!r}", os.close, fd)

    def concurrently(self, threads: int, seconds: float) -> None:
        """Several fuzzers at once, each in its own thread: requests overlap in the server."""
        others = [Fuzzer(self.mount, self.seed * 100 + i, self.dog) for i in range(threads)]

        def run(fz: "Fuzzer") -> None:
            fz.walk()
            deadline = time.monotonic() + seconds
            n = 0
            while time.monotonic() < deadline and self.mount.alive():
                if n % 50 == 49:
                    fz.walk()
                fz.random_op()
                n += 1

        workers = [threading.Thread(target=run, args=(fz,)) for fz in others]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        for fz in others:
            self.results.update(fz.results)
            self.problems += fz.problems
            self.skipped.update(fz.skipped)

    def alive_or_stop(self) -> bool:
        if self.mount.alive():
            return True
        self.problems.append(f"the server died; last results {self.results.most_common(5)}")
        return False

    def report(self) -> str:
        by_op = collections.defaultdict(dict)
        for (op, outcome), n in sorted(self.results.items()):
            by_op[op][outcome] = n
        lines = [f"seed={self.seed}", f"not sent (unsafe / KEEP's): {dict(self.skipped)}"]
        lines += [f"  {op}: {outcomes}" for op, outcomes in by_op.items()]
        return "\n".join(lines)


# --- the tests -----------------------------------------------------------------------

# writes each kind of file must take from the fuzz (the root has one ctl among many
# writable files: it is picked less often)
LEAST = (("root-ctl", 10), ("agent-ctl", 20), ("in", 20))


@pytest.mark.timeout(100 + 2 * FUZZ_S)
def test_fuzz_every_file_leaves_the_daemon_up_and_earlier_tasks_intact(mount):
    tid, files = run_reference_task(mount)
    fz = Fuzzer(mount, SEED)
    try:
        # 1. every odd operation on every file and directory, with the errno each must give
        fz.walk()
        for rel in fz.dirs:
            fz.sweep_dir(rel)
        for rel in fz.files:
            fz.sweep_file(rel)
        # 2. random bytes and half-right commands at every file, mostly the writable ones
        fz.write_too_big(f"agents/{KEEP}/in")
        # for FUZZ_S, and on (up to 3x as long) until each kind got its writes through:
        # the count, not the time, says the fuzz reached the handlers (a loaded machine)
        def reached() -> bool:
            return all(fz.results[(f"write:{kind}", "ok")] > least for kind, least in LEAST)
        start = time.monotonic()
        n = 0
        while fz.alive_or_stop() and (time.monotonic() < start + FUZZ_S or (
                not reached() and time.monotonic() < start + 3 * FUZZ_S)):
            if n % 50 == 0:
                fz.walk()
            fz.random_op()
            n += 1
        # 3. many opens held at once, written in turn, closed out of order
        if fz.alive_or_stop():
            fz.held_handles(rounds=3)
        # 4. the same from several threads at once
        if fz.alive_or_stop():
            fz.concurrently(threads=4, seconds=3)
    finally:
        fz.dog.stop()
    print(fz.report())
    if mount.alive():
        print("after the fuzz:", mount.read("ctl"), end="")
    assert fz.dog.hung is None, f"hung (the watchdog killed the server) at: {fz.dog.hung}\n" + \
        fz.report()
    assert not fz.problems, ("unclean failures:\n" + "\n".join(fz.problems[:30]) +
                             f"\n... {len(fz.problems)} in all\n{fz.report()}")
    # the fuzz reached the handlers, it was not all refused at the door
    for kind, least in LEAST:
        assert fz.results[(f"write:{kind}", "ok")] > least, fz.report()
    assert_healthy(mount, tid, files, f"after the fuzz (seed {SEED})")
    assert_still_runs_tasks(mount)
    assert_replays(mount, tid, files)


STRESSORS = ["dir", "dentry", "rename", "link", "symlink", "chmod", "chown", "xattr", "hdd",
             "filename", "fstat", "getdent", "access", "chdir", "dirdeep", "dirmany", "mknod",
             "touch", "utime", "fallocate", "fcntl", "flock", "lockf", "seek", "readahead",
             "inotify", "copy-file", "fiemap", "file-ioctl", "fsize", "sync-file", "lease"]


@pytest.mark.timeout(100)
def test_stress_ng_filesystem_stressors_leave_the_daemon_up(mount):
    if not shutil.which("stress-ng"):
        pytest.skip("stress-ng is not installed (apt-get install stress-ng)")
    have = set(subprocess.run(["stress-ng", "--stressors"], capture_output=True, text=True,
                              timeout=30).stdout.split())
    stressors = [s for s in STRESSORS if s in have]
    assert "fstat" in stressors and "dir" in stressors, f"stress-ng has only {sorted(have)}"
    tid, files = run_reference_task(mount)
    mount.write("ctl", "spawn Work.ref def=echo\n")
    targets = {  # temp path -> the directory fstat walks
        "": "", "agents": f"agents/{KEEP}", f"agents/{KEEP}": f"agents/{KEEP}/tasks/{tid}"}
    procs = []
    try:
        for temp, fstat_dir in targets.items():
            argv = ["stress-ng", "--temp-path", str(mount.path / temp), "--timeout", "5s",
                    "--fstat-dir", str(mount.path / fstat_dir), "--metrics-brief"]
            for s in stressors:
                argv += [f"--{s}", "1"]
            procs.append((temp or ".", subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                        stderr=subprocess.STDOUT, text=True)))
        # meanwhile the namespace keeps answering and the kernel keeps running work
        slowest, pings = 0.0, 0
        started = time.monotonic()
        while any(p.poll() is None for _, p in procs) and time.monotonic() - started < 60:
            t0 = time.monotonic()
            r = mount.sh(f"cat status ctl agents/{KEEP}/tasks/{tid}/status >/dev/null && ls agents",
                         timeout=OP_LIMIT_S)
            assert r.returncode == 0, f"namespace stopped answering under stress: {r.stderr}"
            mount.write("agents/Work.ref/ctl", f"run ping {pings}\n")
            slowest, pings = max(slowest, time.monotonic() - t0), pings + 1
            time.sleep(0.1)
        for temp, p in procs:
            out, _ = p.communicate(timeout=30)
            fails = sorted({line.split("]", 1)[1].split(":")[0].strip()
                            for line in out.splitlines() if " fail: " in line and "]" in line})
            print(f"stress-ng --temp-path {temp}: exit {p.returncode}; stressors that failed "
                  f"(EACCES on create, as expected): {fails}")
            print("\n".join(line for line in out.splitlines() if "metrc" in line))
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"{pings} pings during the stress, slowest {slowest:.2f}s")
    assert_healthy(mount, tid, files, "after stress-ng")
    mount.wait_for(lambda: mount.status("Work.ref")["done"] == str(pings), timeout=60,
                   what=f"all {pings} tasks queued during the stress to finish")
    assert_replays(mount, tid, files)


# --- regressions: minimal repros of the bugs the fuzzer found ----------------------------

@pytest.fixture
def bare_mount(tmp_path):
    """`mount` without its teardown check for bug events, so that a regression here
    fails as itself (with its own message) rather than as a teardown error."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"cannot mount FUSE here: {reason}")
    m = Mount(tmp_path).mount()
    try:
        yield m
    finally:
        m.umount()


def refusal(mount, rel: str, data: bytes) -> int | None:
    """The errno writing data to rel gave, None if it was accepted."""
    try:
        mount.write(rel, data)
    except OSError as e:
        return e.errno
    return None


def settled(mount, condition) -> bool:
    """condition() holds, or the server died (which the caller then reports)."""
    try:
        return not mount.alive() or condition()
    except OSError:
        return not mount.alive()


def assert_no_bug_and_alive(mount) -> None:
    # a crash in an agent's loop comes just after the write returned: first the work it
    # made ends (nothing queued or running), then 2 s more in which nothing may go wrong
    # (a check that something does NOT happen: ample for a crash, which comes at once)
    mount.wait_for(lambda: settled(mount, lambda: " queued=0 running=0 " in mount.read("ctl")),
                   what="the work to end")
    time.sleep(2.0)
    bugs = bug_events(mount)
    assert not bugs, describe_bugs(bugs)
    assert mount.alive(), "the fs9 server died"
    assert mount.read("ctl").startswith("state=")


BAD_SPAWNS = {
    # were EIO + a bug event (TypeError, ValueError, RecursionError in the kernel)
    "date-value": "spawn a cmd=cat description=1979-05-27",  # not JSON-serialisable
    "def-not-string": "spawn a def=1",  # os.path.join(dir, 1)
    "nul-in-def": "spawn a def=ech\x00o",  # open() of a path with NUL
    "deep-toml": "spawn a cmd=cat description=" + "[" * 1000 + "]" * 1000,  # tomllib recursion
}


@pytest.mark.parametrize("case", sorted(BAD_SPAWNS))
def test_spawn_values_the_kernel_cannot_take_are_refused_cleanly(bare_mount, case):
    refused = refusal(bare_mount, "ctl", (BAD_SPAWNS[case] + "\n").encode())
    assert refused in (None, errno.EINVAL, errno.ENOENT)  # deep-toml: kept as text
    assert_no_bug_and_alive(bare_mount)


BAD_EXEC = {
    # were accepted, then the first task raised ValueError in the agent loop, outside
    # any handler: the daemon died, and again on every remount (the task was re-queued)
    "nan-timeout": "spawn a cmd=cat timeout_s=nan",
    "nul-in-cmd": "spawn a 'cmd=[\"cat\", \"a\\u0000b\"]'",
    "nul-in-env": "spawn a 'env={A=\"a\\u0000b\"}' cmd=cat",
    "equals-in-env-name": "spawn a 'env={\"A=B\"=\"c\"}' cmd=cat",
}


@pytest.mark.parametrize("case", sorted(BAD_EXEC))
def test_spawn_values_exec_cannot_take_do_not_kill_the_daemon(bare_mount, case):
    refused = refusal(bare_mount, "ctl", (BAD_EXEC[case] + "\n").encode())
    if refused is None:  # accepted: then its task must fail cleanly instead
        bare_mount.write("agents/a/ctl", "run x\n")
        bare_mount.wait_for(lambda: settled(bare_mount, lambda: bare_mount.status("a")[
                                "latest_state"] in ("done", "failed")),
                            what="the task to end (or the server to die)")
        assert bare_mount.alive(), "the fs9 server died running the task"
        bare_mount.wait_for(lambda: bare_mount.status("a")["latest_state"] in ("done", "failed"))
    else:
        assert refused in (errno.EINVAL, errno.ENOENT)
    assert_no_bug_and_alive(bare_mount)


def test_a_non_ascii_digit_task_name_is_enoent(bare_mount):
    """Was EIO + a bug event: str.isdigit() accepts '\u00b2', int() does not."""
    bare_mount.write("ctl", "spawn a cmd=cat\n")
    for name in ("\u00b2", "\u2460"):
        with pytest.raises(FileNotFoundError):
            os.stat(bare_mount.path / "agents/a/tasks" / name)
    assert_no_bug_and_alive(bare_mount)


@pytest.mark.parametrize("how", ["in-opened-before-kill", "ctl-opened-before-kill",
                                 "kill-then-run-in-one-write"])
def test_a_killed_agent_takes_no_more_commands(bare_mount, how):
    """Was a bug event (no agent for task_queued), and the logged event made every
    later mount fail to replay."""
    bare_mount.write("ctl", "spawn a cmd=cat\n")
    killed = True
    if how == "kill-then-run-in-one-write":
        refused = refusal(bare_mount, "agents/a/ctl", b"kill\nrun x\n")
        assert refused in (None, errno.EINVAL, errno.ENOENT)
        killed = refused != errno.EINVAL  # EINVAL: refused whole, nothing applied
    else:
        with open(bare_mount.path / "agents/a" / how.split("-")[0], "wb", buffering=0) as f:
            bare_mount.write("ctl", "kill a\n")
            with pytest.raises(OSError) as e:
                f.write(b"run x\n")
                f.close()  # `in` submits at close
            assert e.value.errno == errno.ENOENT
    assert_no_bug_and_alive(bare_mount)
    bare_mount.umount()
    bare_mount.mount()  # the log still replays
    assert bare_mount.alive()
    assert os.listdir(bare_mount.path / "agents") == ([] if killed else ["a"])
    assert not bug_events(bare_mount)


def test_a_refusal_leaves_a_finished_tasks_err_alone(bare_mount):
    """Refusal notes used to be appended to the latest task's stderr (in memory only)."""
    bare_mount.write("ctl", "spawn a cmd=cat\n")
    bare_mount.write("agents/a/ctl", "run x\n")
    (tid,) = os.listdir(bare_mount.path / "agents/a/tasks")
    bare_mount.wait_for(lambda: bare_mount.status("a")["done"] == "1")
    before = task_files(bare_mount, "a", tid)
    assert refusal(bare_mount, "agents/a/ctl", b"bogus\n") == errno.EINVAL
    assert task_files(bare_mount, "a", tid) == before


def test_a_restart_window_of_zero_cannot_turn_off_the_supervisor(bare_mount):
    """within_s=0 used to count no restarts: a crashing daemon restarted ~1600 times a second."""
    refused = refusal(bare_mount, "ctl", b"spawn d 'cmd=[\"false\"]' mode=daemon "
                                         b"restart=permanent within_s=0\n")
    if refused is None:  # accepted: the supervisor must still give up after max_restarts
        bare_mount.wait_for(lambda: bare_mount.status("d")["state"] == "failed",
                            what="the supervisor to give up on a daemon that always fails")
    else:
        assert refused == errno.EINVAL
