"""What survives a power cut, a full disk and a disk that fails: counted, not hoped.

A power cut is simulated the way Jepsen uses LazyFS: the state lives on tests/lazyfs.py,
a FUSE passthrough that holds every write not yet fsynced in its memory; killing it
(with the fs9 server) loses exactly that. Writers record each write fs9 acknowledged;
after the cut and a new mount the tests count what came back: lost (acknowledged, gone),
duplicated, unexpected (never written), recovered (in flight at the cut, kept)."""
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, Mount, fuse_unavailable, mounted, read_until, wait_for

pytestmark = pytest.mark.skipif(bool(fuse_unavailable()), reason=f"cannot mount FUSE: {fuse_unavailable()}")

WRITERS = 4
ACKED_BEFORE_CUT = 3000  # acknowledged writes (tasks and mail, half each) before the power goes


class LazyFS:
    """tests/lazyfs.py serving `backing` at `path`, as its own process."""

    def __init__(self, root: Path) -> None:
        self.backing, self.path, self.control = root / "disk", root / "lazy", root / "lazy.sock"
        self.backing.mkdir()
        self.path.mkdir()
        self.proc = None

    def start(self) -> "LazyFS":
        self.control.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests/lazyfs.py"),
                                      str(self.backing), str(self.path), str(self.control)])
        wait_for(lambda: mounted(self.path) and self.control.exists(), what="lazyfs mounted")
        return self

    def tell(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.control))
            s.sendall(command.encode() + b"\n")
            return s.recv(256).decode().strip()

    def power_cut(self) -> None:
        """Every write not yet fsynced is lost: the process holding them dies."""
        self.proc.kill()
        self.proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def lazy(tmp_path):
    fs = LazyFS(tmp_path).start()
    m = Mount(tmp_path)
    m.state = fs.path / "state"
    try:
        yield fs, m
    finally:
        m.umount()
        if m.pid and os.path.exists(f"/proc/{m.pid}"):
            m.kill9()
        fs.stop()


WRITER = r"""
import os, sys
mnt, me, record = sys.argv[1], sys.argv[2], sys.argv[3]
with open(record, "w", buffering=1) as rec:
    for i in range(100000):
        tag = f"{me}-{i}"
        try:
            if i % 2:  # a message: applied when the file is closed
                fd = os.open(f"{mnt}/agents/echo/mail/new", os.O_WRONLY)
                try:
                    os.write(fd, f"type: event\n\n{tag}\n".encode())
                finally:
                    os.close(fd)
            else:  # a task: applied by the write itself
                fd = os.open(f"{mnt}/agents/echo/ctl", os.O_WRONLY)
                try:
                    os.write(fd, f"run {tag}\n".encode())
                finally:
                    os.close(fd)
        except OSError as e:
            rec.write(f"failed {tag} {e.errno}\n")
            break
        rec.write(f"acked {tag}\n")
"""


def writers(m: Mount, records: Path) -> list:
    records.mkdir()
    return [subprocess.Popen([sys.executable, "-c", WRITER, str(m.path), f"w{n}",
                              str(records / f"w{n}")], stderr=subprocess.DEVNULL)
            for n in range(WRITERS)]


def acked(records: Path) -> dict[str, list[str]]:
    """Per writer, the tags acknowledged (in order) and the one in flight (if any)."""
    out = {}
    for f in sorted(records.iterdir()):
        lines = f.read_text().splitlines()
        out[f.name] = [line.split()[1] for line in lines if line.startswith("acked ")]
    return out


def synced(m: Mount) -> int:
    """The last seq the server says reached the disk (STATE/synced, kernel/sync.py)."""
    try:
        return int((m.state / "synced").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def found(m: Mount) -> list[str]:
    """Every task input and message body that came back, as tags (repeats kept)."""
    tags = []
    for t in os.listdir(m.path / "agents/echo/tasks"):
        tags.append(m.read(f"agents/echo/tasks/{t}/input").split()[-1])
    for name in os.listdir(m.path / "agents/echo/mail"):
        if name not in ("new", "next", "dead"):
            tags.append(m.read(f"agents/echo/mail/{name}").split()[-1])
    return tags


def tally(written: dict[str, list[str]], back: list[str]) -> dict:
    """lost, duplicated, unexpected, recovered; and whether each writer's survivors are
    a prefix of what it wrote (a log loses a tail, never a middle)."""
    order = {tag: (w, i) for w, tags in written.items() for i, tag in enumerate(tags)}
    seen: dict[str, int] = {}
    for tag in back:
        seen[tag] = seen.get(tag, 0) + 1
    inflight = {f"{w}-{len(tags)}" for w, tags in written.items()}  # (attempted, no answer)
    ack = set(order)
    result = {"acked": len(ack), "lost": len(ack - set(seen)),
              "duplicated": sum(n - 1 for n in seen.values()),
              "unexpected": len(set(seen) - ack - inflight),
              "recovered": len(set(seen) & inflight)}
    result["prefix"] = all(
        [t for t in tags if t in seen] == tags[:len([t for t in tags if t in seen])]
        for tags in written.values())
    return result


def run_cut(fs: LazyFS, m: Mount, tmp_path: Path, durability: str) -> tuple[dict, dict]:
    m.mount("--durability", durability)
    m.sh("echo 'spawn echo' > ctl && echo stop > agents/echo/ctl", check=True)
    # the agent itself on disk first: at `process` a cut may take everything since the
    # last sync (SYNC_EVERY_S), its spawn too on a slow machine, leaving nothing to count
    spawned = json.loads(m.read("log/audit").splitlines()[-1])["seq"]
    wait_for(lambda: synced(m) >= spawned, timeout=60, what="the spawn synced")
    procs = writers(m, tmp_path / "records")
    try:
        wait_for(lambda: sum(map(len, acked(tmp_path / "records").values())) >= ACKED_BEFORE_CUT,
                 timeout=480, what=f"{ACKED_BEFORE_CUT} acknowledged writes")
        fs.power_cut()
        m.kill9()
    finally:
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    written = acked(tmp_path / "records")
    fs.start()
    m.mount("--durability", durability)
    counts = tally(written, found(m))
    events = [json.loads(line) for line in m.read("log/audit").splitlines()]
    unclean = [e for e in events if e["kind"] == "unclean_stop"]
    print(f"power cut at durability={durability}: {counts}")
    return counts, unclean[-1] if unclean else {}


@pytest.mark.timeout(900)  # a few thousand writes through lazyfs, on a busy 2-core machine
def test_power_cut_at_durability_power_loses_nothing_acknowledged(lazy, tmp_path):
    fs, m = lazy
    counts, unclean = run_cut(fs, m, tmp_path, "power")
    assert counts["acked"] >= ACKED_BEFORE_CUT
    assert counts["lost"] == counts["duplicated"] == counts["unexpected"] == 0, counts
    assert counts["prefix"], counts
    assert unclean["durability"] == "power" and "every write it acknowledged" in unclean["reason"]
    r = subprocess.run([sys.executable, "-m", "fs9", "check", str(m.state)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.timeout(900)
def test_power_cut_at_durability_process_reports_its_loss_never_corrupts(lazy, tmp_path):
    fs, m = lazy
    counts, unclean = run_cut(fs, m, tmp_path, "process")
    assert counts["acked"] >= ACKED_BEFORE_CUT
    # what a power cut takes at `process` is a tail: no holes, nothing doubled or made up
    assert counts["duplicated"] == counts["unexpected"] == 0 and counts["prefix"], counts
    # and the next mount says what may be gone, from the last seq known on disk
    assert unclean["durability"] == "process" and "were lost" in unclean["reason"], unclean
    assert unclean["synced"] > 0
    r = subprocess.run([sys.executable, "-m", "fs9", "check", str(m.state)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# --- a full disk -------------------------------------------------------------------------

@pytest.fixture
def small_disks(tmp_path):
    """Two small tmpfs file systems (state, vault) that the test can fill."""
    disks = [tmp_path / "statefs", tmp_path / "vaultfs"]
    for d in disks:
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0711", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield disks
    finally:
        for d in disks:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _free(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def fill(folder: Path) -> Path:
    """Take every free byte of folder's file system; the file to remove to give it back.
    (Unbuffered: a buffer left to flush at close would meet the full disk there.)"""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == 28
    finally:
        os.close(fd)
    return filler


def write_ctl(path: Path, line: str) -> int | None:
    """Write one line as `echo` does; the errno it failed with, or None."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as e:
        return e.errno
    return None


def test_a_full_state_disk_refuses_writes_with_enospc_and_keeps_serving(small_disks, tmp_path):
    statefs, vaultfs = small_disks
    m = Mount(tmp_path)
    m.state, m.vault = statefs / "state", vaultfs / "vault"
    m.mount()
    try:
        m.sh("echo 'spawn echo' > ctl && echo stop > agents/echo/ctl", check=True)
        filler = fill(statefs)
        acked, refused = [], None
        for i in range(20000):  # until the log must grow (the WAL may have room left)
            refused = write_ctl(m.path / "agents/echo/ctl", f"run n{i}\n")
            if refused is not None:
                break
            acked.append(f"n{i}\n")
        assert refused == 28, f"no ENOSPC after {len(acked)} writes (errno {refused})"
        # `echo` fails, and says why (coreutils' echo: dash's says "I/O error" for any
        # errno); reads go on, the server stays up
        r = m.sh("/bin/echo 'run more' > agents/echo/ctl")
        assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
        assert "full" in m.read("err") and "not logged" in m.read("err")
        # a stream opened on the full disk streams on: `cat events` gets the recovery below
        follower = subprocess.Popen(["cat", str(m.path / "events")], stdout=subprocess.PIPE)
        m.wait_reading([follower], "events")
        assert m.read("status").startswith("echo stopped")
        assert f"queued={len(acked)}" in m.read("ctl")
        assert m.sh("ls agents/echo/tasks | wc -l", check=True).stdout.strip() == str(len(acked))
        # a background service whose event the log refuses (the vault watcher, told of a
        # change made on disk) stops, and says so; the mount does not go with it
        (m.vault / "outside.txt").write_text("made on disk\n")
        wait_for(lambda: "stopped until the next mount" in m.read("err"), what="the watcher")
        assert m.alive() and m.read("vault/outside.txt") == "made on disk\n"
        # space comes back: so do writes, and the refusals are on the record
        filler.unlink()
        m.sh("echo 'run after' > agents/echo/ctl", check=True)
        events = [json.loads(line) for line in m.read("log/audit").splitlines()]
        back = [e for e in events if e["kind"] == "log_recovered"]
        assert back and back[-1]["errno"] == "ENOSPC" and back[-1]["refused"] >= 2, back
        try:
            read_until(follower.stdout, lambda got: b'"kind":"log_recovered"' in got,
                       what="the recovery on a stream opened while the disk was full")
        finally:
            follower.kill()
            follower.wait()
        # nothing acknowledged was lost, in this mount and the next
        m.umount()
        m.mount()
        ids = sorted(os.listdir(m.path / "agents/echo/tasks"), key=int)
        assert [m.read(f"agents/echo/tasks/{t}/input") for t in ids] == acked + ["after\n"]
    finally:
        m.umount()


def test_a_full_vault_disk_is_enospc_for_the_writer(small_disks, tmp_path):
    statefs, vaultfs = small_disks
    m = Mount(tmp_path)
    m.state, m.vault = statefs / "state", vaultfs / "vault"
    m.mount()
    try:
        r = m.sh("dd if=/dev/zero of=vault/big bs=64k count=200")  # 12.5 MiB on a 4 MiB disk
        assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
        assert (m.vault / "big").stat().st_size <= 4 << 20  # what fitted
        assert m.alive()
        m.sh("rm vault/big", check=True)
        # dd's close reaches fs9 as FUSE's RELEASE, which the kernel sends without
        # waiting: until fs9 has closed its descriptor, the removed file keeps its space
        m.wait_for(lambda: _free(vaultfs) >= 3 << 20, what="the removed file's space back")
        m.sh("echo fits > vault/small", check=True)
        assert (m.vault / "small").read_text() == "fits\n"
    finally:
        m.umount()


# --- a disk that fails --------------------------------------------------------------------

def inputs(m: Mount) -> list[str]:
    ids = sorted(os.listdir(m.path / "agents/echo/tasks"), key=int)
    return [m.read(f"agents/echo/tasks/{t}/input") for t in ids]


def test_failed_writes_of_the_log_are_never_acknowledged(lazy):
    fs, m = lazy
    m.mount()
    m.sh("echo 'spawn echo' > ctl && echo stop > agents/echo/ctl", check=True)
    acked = [f"a{i}\n" for i in range(20)]
    for line in acked:
        assert write_ctl(m.path / "agents/echo/ctl", f"run {line}") is None
    assert fs.tell("fail-writes") == "ok"
    refused = [write_ctl(m.path / "agents/echo/ctl", f"run x{i}\n") for i in range(10)]
    assert refused == [5] * 10  # EIO, every one
    err = m.read("err")
    assert "could not be written" in err and "not logged" in err, err
    assert m.read("status").startswith("echo stopped") and f"queued={len(acked)}" in m.read("ctl")
    assert fs.tell("heal") == "ok"
    assert write_ctl(m.path / "agents/echo/ctl", "run after\n") is None
    events = [json.loads(line) for line in m.read("log/audit").splitlines()]
    back = [e for e in events if e["kind"] == "log_recovered"]
    assert back and back[-1]["errno"] == "EIO" and back[-1]["refused"] >= 10, back
    m.umount()
    m.mount()
    assert inputs(m) == acked + ["after\n"]  # nothing refused slipped in, nothing lost
    assert m.bugs() == []


def test_a_failed_fsync_faults_the_log_until_the_next_mount(lazy):
    fs, m = lazy
    m.mount("--durability", "power")
    m.sh("echo 'spawn echo' > ctl && echo stop > agents/echo/ctl", check=True)
    acked = [f"a{i}\n" for i in range(20)]
    for line in acked:
        assert write_ctl(m.path / "agents/echo/ctl", f"run {line}") is None
    assert fs.tell("fail-fsyncs") == "ok"
    assert write_ctl(m.path / "agents/echo/ctl", "run lost\n") == 5  # not acknowledged
    assert fs.tell("heal") == "ok"
    # pages a failed fsync was given may be gone: nothing more is vouched for this mount
    assert write_ctl(m.path / "agents/echo/ctl", "run later\n") == 5
    err = m.read("err")
    assert "unusable until fs9 is mounted again" in err and "failed" in err, err
    assert m.read("status").startswith("echo stopped")  # reads go on
    assert m.alive()
    m.umount()
    m.mount("--durability", "power")
    back = inputs(m)
    assert back[:len(acked)] == acked and set(back[len(acked):]) <= {"lost\n"}, back
    events = [json.loads(line) for line in m.read("log/audit").splitlines()]
    fault = [e for e in events if e["kind"] == "log_fault"]
    assert fault and "unusable" in fault[-1]["reason"], fault
    r = subprocess.run([sys.executable, "-m", "fs9", "check", str(m.state)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
