"""Test fixtures: a real fs9 mount in a temporary directory, served by a real process.

Tests drive it the way people and programs do: `sh -c` with echo/cat/ls, and
plain file I/O. Where this machine cannot mount FUSE, mount tests skip and say why.
"""
import os
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
    def mount(self) -> "Mount":
        r = fs9("mount", str(self.path), "--state", str(self.state), "--agents",
                str(self.agents), "--vault", str(self.vault), "--background")
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
    def sh(self, cmd: str, timeout: float = 20, check: bool = False) -> subprocess.CompletedProcess:
        r = subprocess.run(["sh", "-c", cmd], cwd=self.path, capture_output=True,
                           text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"{cmd!r} failed: {r.stderr}"
        return r

    def read(self, rel: str) -> str:
        with open(self.path / rel) as f:
            return f.read()

    def write(self, rel: str, data: str | bytes) -> None:
        with open(self.path / rel, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)

    def status(self, agent: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.read(f"agents/{agent}/status").splitlines())

    def wait_for(self, predicate, timeout: float = 10, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

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

    def wait_kind(self, kind: str, timeout: float = 10) -> list[dict]:
        import json
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen += [json.loads(line) for line in self.lines(0.2)]
            if any(e["kind"] == kind for e in seen):
                return seen
        raise AssertionError(f"no {kind} event; saw {[e['kind'] for e in seen]}")

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
def events(mount):
    ev = Events(mount)
    yield ev
    ev.close()
