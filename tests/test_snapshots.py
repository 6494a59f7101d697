"""Snapshots (kernel/snapshot.py) on a real mount: a mount from a snapshot serves what a
full replay serves, and a kill -9 while snapshots are being written (or just after one)
loses nothing acknowledged and runs nothing twice."""
import os
import re
import sqlite3
import subprocess

import pytest

from conftest import WAIT_S, wait_for
from test_faults import acked, found, tally, writers
from test_replay import _snapshot as _picture

from fs9.kernel import finished

ACKED_BEFORE_KILL = 300  # acknowledged writes before the kill, several snapshots' worth


def snapshot_at(m) -> int:
    """The seq of the snapshot in force in m's log (0: none)."""
    db = sqlite3.connect(f"file:{m.state / 'log.sqlite'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT seq FROM snapshot").fetchone()
        return row[0] if row else 0
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def mounted_from(m) -> list[int]:
    """The snapshots mounts of m started from, in order (the server's log says)."""
    try:
        text = (m.state / "fs9.log").read_text()
    except FileNotFoundError:
        return []
    return [int(s) for s in re.findall(r"state from the snapshot at event (\d+)", text)]


def mail_names(m, agent: str) -> list[str]:
    return sorted(n for n in os.listdir(m.path / f"agents/{agent}/mail")
                  if n not in ("new", "next", "dead"))


def test_a_mount_from_a_snapshot_serves_what_a_full_replay_does(mount):
    mount.sh("echo 'spawn echo' > ctl && echo 'spawn idle def=echo' > ctl"
             " && echo stop > agents/idle/ctl", check=True)
    for i in range(5):
        mount.write("agents/echo/in", f"t{i}\n")
    mount.wait_for(lambda: mount.status("echo")["done"] == "5", what="echo's tasks")
    for i in range(6):
        mount.write("agents/idle/mail/new", f"m{i}\n")
    mount.write("agents/idle/in", "waits\n")
    names = mail_names(mount, "idle")
    for name in names[:4]:  # acknowledged: never delivered again
        os.unlink(mount.path / f"agents/idle/mail/{name}")
    before = _picture(mount)
    outs = {t: mount.read(f"agents/echo/tasks/{t}/out")
            for t in os.listdir(mount.path / "agents/echo/tasks")}
    mount.umount()  # a clean unmount writes a snapshot
    at = snapshot_at(mount)
    assert at > 0
    mount.mount()
    assert mounted_from(mount) == [at]
    assert _picture(mount) == before
    assert mail_names(mount, "idle") == names[4:]
    assert {t: mount.read(f"agents/echo/tasks/{t}/out") for t in outs} == outs
    # acknowledged after the snapshot, then a kill -9: replayed from the snapshot on
    mount.write("agents/idle/in", "after\n")
    os.unlink(mount.path / f"agents/idle/mail/{names[4]}")
    after = _picture(mount)
    mount.kill9()
    mount.mount()
    assert mounted_from(mount) == [at, at]
    assert _picture(mount) == after and mail_names(mount, "idle") == names[5:]
    mount.umount()
    mount.mount("--full-replay")
    assert mounted_from(mount) == [at, at]  # (this one replayed from event 1)
    assert _picture(mount) == after and mail_names(mount, "idle") == names[5:]


@pytest.mark.timeout(900)  # a few hundred writes and three mounts, on a busy 2-core machine
def test_kill_9_while_snapshots_are_written_loses_nothing_acknowledged(mount, tmp_path):
    mount.umount()
    mount.mount("--snapshot-every", "20")  # a snapshot every few writes
    mount.sh("echo 'spawn echo' > ctl && echo stop > agents/echo/ctl", check=True)
    procs = writers(mount, tmp_path / "records")
    try:
        wait_for(lambda: sum(map(len, acked(tmp_path / "records").values())) >= ACKED_BEFORE_KILL,
                 timeout=480, what=f"{ACKED_BEFORE_KILL} acknowledged writes")
        mount.kill9()  # (while writes go on: some snapshot is just written, or being written)
    finally:
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    at = snapshot_at(mount)
    assert at > 0, "no snapshot was written"
    written = acked(tmp_path / "records")
    mounts = len(mounted_from(mount))
    mount.mount()
    assert mounted_from(mount)[mounts:] == [at]
    counts = tally(written, found(mount))
    assert counts["lost"] == counts["duplicated"] == counts["unexpected"] == 0, counts
    assert counts["prefix"], counts
    picture = _picture(mount)
    mount.umount()
    mount.mount("--full-replay")
    assert _picture(mount) == picture
    # nothing runs twice: every queued task runs once, on its first attempt
    tasks = sorted(os.listdir(mount.path / "agents/echo/tasks"), key=int)
    mount.write("agents/echo/ctl", "start\n")
    mount.wait_for(lambda: mount.status("echo")["done"] == str(len(tasks)),
                   timeout=max(WAIT_S, 600), what="every task ran")
    for t in tasks:
        status = mount.read(f"agents/echo/tasks/{t}/status")
        assert "state=done" in status and "attempt=1" in status, status
        assert mount.read(f"agents/echo/tasks/{t}/out") == \
            mount.read(f"agents/echo/tasks/{t}/input")


@pytest.mark.timeout(900)  # 1,010 tasks of a program, on a busy 2-core machine
def test_a_retired_task_still_reads_through_its_files(mount):
    """Past an agent's latest 1,000 finished tasks the oldest leave memory and the
    listing (kernel/finished.py); tasks/ID of one still answers, from the log, before
    and after a remount from a snapshot."""
    n = finished.TASKS_KEPT + 10
    mount.write("ctl", "spawn w cmd=cat unconfined=true\n")
    fd = os.open(mount.path / "agents/w/ctl", os.O_WRONLY)
    try:
        for i in range(n):
            os.write(fd, f"run r{i}\n".encode())
    finally:
        os.close(fd)
    mount.wait_for(lambda: mount.status("w")["done"] == str(n), timeout=max(WAIT_S, 600),
                   what="every task done")
    listed = sorted(map(int, os.listdir(mount.path / "agents/w/tasks")))
    assert len(listed) == finished.TASKS_KEPT
    for remount in (False, True):
        if remount:
            mount.umount()
            mount.mount()
            assert sorted(map(int, os.listdir(mount.path / "agents/w/tasks"))) == listed
        db = sqlite3.connect(f"file:{mount.state / 'log.sqlite'}?mode=ro", uri=True)
        try:
            made = [r[0] for r in db.execute("SELECT task FROM events WHERE kind = 'task_queued'"
                                             " AND agent = 'w' ORDER BY seq")]
        finally:
            db.close()
        retired = [t for t in made if t not in listed]
        assert len(made) == n and len(retired) == 10 and max(retired) < min(listed)
        assert not os.path.exists(mount.path / f"agents/w/tasks/{retired[0] + 1}")  # (an event's)
        for tid in retired[:2] + retired[-2:]:  # retired, not listed
            assert str(tid) not in os.listdir(mount.path / "agents/w/tasks")
            base = f"agents/w/tasks/{tid}"
            status = dict(line.split("=", 1) for line in mount.read(f"{base}/status").splitlines())
            assert status["state"] == "done" and status["agent"] == "w", status
            assert mount.read(f"{base}/input") == mount.read(f"{base}/out") != ""
        assert not os.path.exists(mount.path / f"agents/w/tasks/{listed[-1] + 10**6}")
        assert mount.status("w")["done"] == str(n)
