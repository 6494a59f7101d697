"""The state directory has one owner: a second server on it is refused at once, in one
line naming the holder, and the first goes on unharmed; a killed server leaves no lock."""
import hashlib
import json
import os
import random
import sqlite3
import subprocess

import pytest

from conftest import fs9, mounted
from fs9.kernel import state


def mount_args(m, mnt):
    return ["mount", str(mnt), "--state", str(m.state), "--agents", str(m.agents),
            "--vault", str(m.vault), "--background"]


def test_a_second_server_on_one_state_is_refused_and_the_first_goes_on(mount, tmp_path):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    other = tmp_path / "other"
    r = fs9(*mount_args(mount, other))
    try:
        assert r.returncode == 1, r.stdout + r.stderr
        line, = r.stderr.splitlines()  # one line, naming the holder
        assert line.startswith("fs9: state ") and f"fs9 pid {mount.pid} serving {mount.path}" \
            in line, line
        assert not mounted(other)
        holder = json.loads((mount.state / "lock").read_text())
        assert holder["pid"] == mount.pid and holder["mount"] == str(mount.path)
        # the first server is unharmed: it takes and logs writes as before
        for i in range(20):
            mount.sh(f"echo 'run n{i}' > agents/echo/ctl", check=True)
        mount.wait_for(lambda: mount.status("echo")["done"] == "20", what="20 tasks done")
        assert mount.alive() and mount.read("agents/echo/out") == "n19\n"
        # and once it is unmounted, the state is free for the next server
        mount.umount()
        r = fs9(*mount_args(mount, other))
        assert r.returncode == 0, r.stderr
        assert (other / "agents/echo").is_dir()
    finally:
        if mounted(other):
            assert fs9("umount", str(other)).returncode == 0


def test_fs9_umount_frees_the_state_before_it_returns(mount):
    """`make stop; make run`, or systemd's restart (ExecStop, then ExecStart): the next
    server takes the state the moment `fs9 umount` has returned, and learns of a clean stop."""
    mount.sh("echo 'spawn echo' > ctl", check=True)
    old = mount.pid
    for _ in range(3):
        r = fs9("umount", str(mount.path))
        assert r.returncode == 0, r.stderr
        holder = json.loads((mount.state / "lock").read_text())
        assert holder["pid"] == old and holder["stopped"] > 0, holder  # written at its stop
        r = fs9(*mount_args(mount, mount.path))  # at once: no wait, no retry
        assert r.returncode == 0, r.stderr
        mount.pid = old = int(dict(w.split("=") for w in mount.read("ctl").split())["pid"])
        assert json.loads((mount.state / "lock").read_text())["pid"] == old
        assert (mount.path / "agents/echo").is_dir()


def test_kill_9_leaves_no_stale_lock(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    old = mount.pid
    mount.kill9()
    mount.mount()  # the same state, at once: the dead server's flock went with it
    assert mount.pid != old and (mount.path / "agents/echo").is_dir()
    assert json.loads((mount.state / "lock").read_text())["pid"] == mount.pid


# --- a damaged or foreign state is refused, and left as it was ------------------------------

def populate(m) -> None:
    """Agents, finished and queued tasks, and pending mail."""
    m.sh("echo 'spawn echo' > ctl && echo 'spawn upper' > ctl", check=True)
    for i in range(5):
        m.sh(f"echo 'run done{i}' > agents/upper/ctl", check=True)
    m.wait_for(lambda: m.status("upper")["done"] == "5", what="5 tasks done")
    m.sh("echo stop > agents/echo/ctl", check=True)
    for i in range(3):
        m.sh(f"echo 'run queued{i}' > agents/echo/ctl", check=True)
        m.sh(f"printf 'type: event\\n\\nbody {i}\\n' > agents/echo/mail/new", check=True)


def snapshot(m) -> dict:
    """What an operator sees of agents, tasks and mail."""
    seen = {"agents": sorted(os.listdir(m.path / "agents"))}
    for agent in seen["agents"]:
        for t in sorted(os.listdir(m.path / f"agents/{agent}/tasks"), key=int):
            base = f"agents/{agent}/tasks/{t}"
            status = dict(w.split("=", 1) for w in m.read(f"{base}/status").split()
                          if w.split("=", 1)[0] in ("state", "exit"))
            out = m.read(f"{base}/out") if status["state"] in ("done", "failed") else ""
            seen[base] = (m.read(f"{base}/input"), out, status)  # (a queued task's out waits)
        mail = sorted(n for n in os.listdir(m.path / f"agents/{agent}/mail")
                      if n not in ("new", "next", "dead"))
        seen[f"agents/{agent}/mail"] = [m.read(f"agents/{agent}/mail/{n}") for n in mail]
    return seen


def log_files(m) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in m.state.iterdir() if p.name in ("log.sqlite", "log.sqlite-wal")}


def refused(m, *needles) -> str:
    """Mount m's state: it must be refused in one line; the log files stay as they were."""
    before = log_files(m)
    r = fs9(*mount_args(m, m.path))
    assert r.returncode == 1, f"mounted a damaged state: {r.stdout}{r.stderr}"
    assert not mounted(m.path)
    line, = r.stderr.splitlines()
    assert line.startswith("fs9: ") and all(n in line for n in needles), line
    assert log_files(m) == before, "the refused state was changed"
    return line


@pytest.fixture
def served(mount):
    """A state with agents, tasks and mail, unmounted (checkpointed into log.sqlite)."""
    populate(mount)
    mount.umount()
    assert not (mount.state / "log.sqlite-wal").exists()  # a clean stop folds the WAL in
    good = (mount.state / "log.sqlite").read_bytes()
    yield mount
    for p in mount.state.glob("log.sqlite*"):  # the sound log back, for the teardown's look
        p.unlink()
    (mount.state / "log.sqlite").write_bytes(good)


def test_a_truncated_log_is_refused(served):
    log = served.state / "log.sqlite"
    with open(log, "r+b") as f:
        f.truncate(log.stat().st_size // 2)
    refused(served, "log.sqlite", "damaged", "left as they are")
    r = fs9("check", str(served.state))
    assert r.returncode == 1 and "damaged" in r.stderr


def test_an_empty_log_is_refused_never_started_over(served):
    (served.state / "log.sqlite").write_bytes(b"")
    refused(served, "empty")
    assert (served.state / "log.sqlite").stat().st_size == 0


def test_a_garbage_log_is_refused(served):
    log = served.state / "log.sqlite"
    log.write_bytes(random.Random(9).randbytes(log.stat().st_size))
    refused(served, "damaged or not a database")
    assert fs9("check", str(served.state)).returncode == 1


def test_a_foreign_database_is_refused(served):
    log = served.state / "log.sqlite"
    log.unlink()
    db = sqlite3.connect(log)
    db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    db.commit()
    db.close()
    refused(served, "not an fs9 log")


def test_a_newer_schema_is_refused_and_an_unversioned_one_migrated(served):
    log = served.state / "log.sqlite"
    db = sqlite3.connect(log)
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    refused(served, "newer fs9", "schema version 99")
    # a log from before versions (no application id, user_version 0) is fs9's layout 1
    db = sqlite3.connect(log)
    db.execute("PRAGMA user_version=0")
    db.execute("PRAGMA application_id=0")
    db.commit()
    db.close()
    served.mount()
    assert served.status("upper")["done"] == "5"
    served.umount()
    db = sqlite3.connect(log)
    assert db.execute("PRAGMA user_version").fetchone()[0] == state.VERSION
    assert db.execute("PRAGMA application_id").fetchone()[0] == state.APP_ID
    db.close()


def test_a_checkpoint_torn_with_its_wal_lost_is_refused(served):
    """The log as a power cut mid-checkpoint leaves it when the WAL is then lost too:
    the first half of its pages new, the rest old."""
    log = served.state / "log.sqlite"
    old = log.read_bytes()
    db = sqlite3.connect(log)
    db.execute("PRAGMA wal_autocheckpoint=0")
    for i in range(2000):  # new events after the last, as a server would append them
        db.execute("INSERT INTO events (seq, ts, kind, data, blob) VALUES "
                   "((SELECT max(seq) + 1 FROM events), 0, 'refused', '{}', ?)", (b"x" * 300,))
        db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    new = log.read_bytes()
    half = len(new) // 2 // 1024 * 1024
    log.write_bytes(new[:half] + old[half:])
    refused(served, "damaged")


def test_a_missing_log_with_its_wal_left_is_refused(served):
    (served.state / "log.sqlite").rename(served.state / "moved.sqlite")
    (served.state / "log.sqlite-wal").write_bytes(b"\0" * 4096)
    refused(served, "missing", "refusing to start empty")
    assert not (served.state / "log.sqlite").exists()


# --- check and backup -------------------------------------------------------------------

def test_backup_while_writing_then_restore_and_compare(mount, tmp_path):
    populate(mount)
    writer = subprocess.Popen(
        ["sh", "-c", "i=0; while [ $i -lt 400 ]; do echo \"run w$i\" > agents/echo/ctl || exit 1;"
                     " i=$((i+1)); done"], cwd=mount.path)
    try:
        mount.wait_for(lambda: mount.status("echo")["queued"] != "3", what="writes begin")
        dest = tmp_path / "backup"
        r = fs9("backup", str(mount.state), str(dest))
        assert r.returncode == 0, r.stderr
        copied = int(r.stdout.split(": ")[1].split()[0])
    finally:
        assert writer.wait(timeout=120) == 0
    assert fs9("check", str(mount.state)).returncode == 0  # while served
    r = fs9("check", str(dest))
    assert r.returncode == 0 and f"{copied} events" in r.stdout, r.stdout + r.stderr
    # the backup holds a prefix of the live log, event for event
    live = sqlite3.connect(f"file:{mount.state / 'log.sqlite'}?mode=ro", uri=True)
    back = sqlite3.connect(dest / "log.sqlite")
    rows = "SELECT seq, ts, kind, agent, task, corr, data, blob FROM events ORDER BY seq"
    backed = back.execute(rows).fetchall()
    assert backed == live.execute(rows).fetchall()[:copied] and len(backed) == copied
    back.close()
    live.close()
    mount.umount()
    before = snapshot(mount.mount())
    mount.umount()
    # restored: the backup directory mounted as a state; what it had, the same
    restored = type(mount)(tmp_path / "restored")
    restored.state = dest
    restored.agents = mount.agents
    restored.vault = mount.vault
    restored.mount()
    try:
        after = snapshot(restored)
    finally:
        restored.umount()
    assert after["agents"] == before["agents"] == ["echo", "upper"]
    for key, value in after.items():
        if "/tasks/" in key and "echo" in key:  # the live log went on writing after
            assert before[key] == value
    assert {k: v for k, v in after.items() if "upper" in k or "mail" in k} == \
        {k: v for k, v in before.items() if "upper" in k or "mail" in k}
    assert len(after["agents/echo/mail"]) == 3


def test_a_wal_torn_in_the_middle_is_refused(mount):
    """kill -9 leaves committed events in the WAL; a frame damaged early in it makes
    SQLite drop every frame after (its recovery stops at the first bad checksum), so
    events that had reached the disk would silently vanish: the mount refuses instead."""
    mount.sh("echo 'spawn echo' > ctl && echo stop > agents/echo/ctl", check=True)
    # A reader's snapshot from here on keeps the server's checkpoints from copying the
    # events below into the database file: they stay in the WAL only, as after a burst
    # that a checkpoint (every 2 s) has not reached yet, however slow the machine.
    reader = sqlite3.connect(f"file:{mount.state / 'log.sqlite'}?mode=ro", uri=True)
    reader.execute("BEGIN")
    before = reader.execute("SELECT max(seq) FROM events").fetchone()[0]
    for i in range(300):
        assert mount.sh(f"echo 'run n{i}' > agents/echo/ctl").returncode == 0
    # the synced mark covers them (durability=process syncs every second)
    mount.wait_for(lambda: int((mount.state / "synced").read_text()) >= before + 300,
                   what="the mark")
    mount.kill9()
    reader.close()
    wal = mount.state / "log.sqlite-wal"
    frame = 24 + 1024  # frame header + one page (page_size 1024)
    assert wal.stat().st_size > 32 + 10 * frame
    with open(wal, "r+b") as f:
        f.seek(32 + 2 * frame + 500)
        f.write(b"\xff" * 64)
    line = refused(mount, "left as they are")
    assert "tail was lost" in line or "damaged" in line, line
    r = fs9("check", str(mount.state))
    assert r.returncode == 1 and r.stderr
    wal.unlink()  # the teardown reads what is left (the database file alone is sound)
    (mount.state / "synced").unlink()


def test_a_log_changed_after_a_clean_stop_is_checked_whole_even_with_its_mtime_back(served):
    """A clean stop lets the next mount skip SQLite's whole-file check (5 s of a
    million-event log) only while the file is as it left it: inode, size, mtime and
    ctime (state.fingerprint). A change that even puts the mtime back is checked whole."""
    log = served.state / "log.sqlite"
    st = log.stat()
    pages = st.st_size // 1024
    with open(log, "r+b") as f:
        for page in range(pages // 2, pages, 3):  # b-tree page headers: no page type
            f.seek(page * 1024)
            f.write(b"\xff" * 12)
    os.utime(log, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert log.stat().st_size == st.st_size and log.stat().st_mtime_ns == st.st_mtime_ns
    refused(served, "log.sqlite", "damaged", "left as they are")
