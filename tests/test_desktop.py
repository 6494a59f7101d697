"""The mount as desktop tools see it (issue 22): times that tell when a file changed,
free space of the vault's disk, streams a desktop program reads as a snapshot (never
frozen), ctl state saved back by an editor changing nothing, modes that say what a file
takes. Real mounts, real tools: stat, find, ls, df, gio (GIO: what GNOME's and Xfce's
file managers and editors read files with)."""
import errno
import os
import shutil
import subprocess
import time

import pytest

from conftest import Events

GIO = shutil.which("gio")
needs_gio = pytest.mark.skipif(
    not GIO, reason="gio missing (apt-get install libglib2.0-bin; scripts/system-deps.sh --test)")
# only the local file backend: measure fs9, not a D-Bus session (gvfs) that may be absent
GIO_ENV = {**os.environ, "GIO_USE_VFS": "local", "GIO_USE_VOLUME_MONITOR": "unix"}
WINDOW_S = 2.0  # a double-click shows a window within this


def mtime(mount, rel: str) -> int:
    return os.stat(mount.path / rel).st_mtime_ns


def gio(*args: str, data: bytes | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run gio bounded by `timeout` (a hang is killed: the test then fails on time)."""
    start = time.monotonic()
    r = subprocess.run(["timeout", "-s", "KILL", "15", GIO, *args], input=data,
                       capture_output=True, env=GIO_ENV)
    return r, time.monotonic() - start


def so_far(mount, rel: str) -> bytes:
    """What a stream holds now: read opened O_NONBLOCK until it would wait."""
    fd = os.open(mount.path / rel, os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return data


def test_times_tell_when_each_file_changed(mount):
    mount.sh("echo 'spawn counter' > ctl", check=True)
    mount.wait_for(lambda: mount.status("counter")["state"] == "idle", what="counter idle")
    spawned = mtime(mount, "agents/counter/status")
    assert spawned > mtime(mount, "agents") - 5 * 10**9  # not the mount's time
    time.sleep(0.05)  # (the clock moves past the spawn: times are ns apart)
    before = time.time_ns()
    mount.write("agents/counter/in", "3\n")
    mount.wait_for(lambda: mount.status("counter")["state"] == "running", what="task starts")
    task = mount.status("counter")["task"]
    folder = f"agents/counter/tasks/{task}"
    created = mtime(mount, folder)
    assert before <= created <= time.time_ns(), "a task folder's time: its creation"
    assert mtime(mount, f"{folder}/input") == created
    # a stream's time is its last write: it moves while the task writes, then stays
    mount.wait_for(lambda: mount.read(f"{folder}/status").count("progress") and
                   mtime(mount, f"{folder}/out") > created, what="out written")
    mount.wait_for(lambda: mount.status("counter")["done"] == "1", what="task done")
    out_at, status_at = mtime(mount, f"{folder}/out"), mtime(mount, f"{folder}/status")
    assert created < out_at <= status_at, "out's last write came before the task ended"
    assert mtime(mount, "agents/counter/status") > spawned, "the agent's status changed"
    st = os.stat(mount.path / f"{folder}/status")
    assert st.st_atime_ns == st.st_mtime_ns == st.st_ctime_ns  # atime: no read times kept
    time.sleep(0.05)
    assert mtime(mount, f"{folder}/out") == out_at, "a stat changes no time"
    assert mtime(mount, folder) == created, "a task folder keeps its creation time"

    # the tools that sort and select by time see it
    newer = mount.sh(f"find agents/counter -newer {folder}/input", check=True).stdout.split()
    assert f"agents/counter/tasks/{task}/out" in newer
    assert f"agents/counter/tasks/{task}/input" not in newer
    assert "agents/counter/manifest" not in newer or \
        mtime(mount, "agents/counter/manifest") > created
    listed = mount.sh(f"ls -t {folder}", check=True).stdout.split()
    assert listed.index("status") < listed.index("input"), listed

    # a mailbox's time is its last delivery
    inbox = mtime(mount, "agents/counter/mail")
    time.sleep(0.05)
    mount.write("agents/counter/mail/new", "type: notice\n\nhello\n")
    # (a stat may be answered from the kernel's attribute cache for a second: ops.CACHE_S)
    mount.wait_for(lambda: mtime(mount, "agents/counter/mail") > inbox and
                   mtime(mount, "agents/counter/mail/next") == mtime(
                       mount, "agents/counter/mail"), what="the delivery's time")


def test_df_shows_the_vault_disk(mount):
    mount.vault.mkdir(exist_ok=True)
    r = subprocess.run(["df", "-P", "-B1", str(mount.path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    total = int(r.stdout.splitlines()[1].split()[1])
    disk = os.statvfs(mount.vault)
    assert total == disk.f_blocks * disk.f_frsize > 0
    ours = os.statvfs(mount.path)
    assert (ours.f_files, ours.f_bsize) == (disk.f_files, disk.f_bsize)
    # free space moves with the disk (other writers share it): within 1 GiB of it
    assert abs(ours.f_bavail * ours.f_frsize - disk.f_bavail * disk.f_frsize) < 1 << 30


@needs_gio
def test_a_desktop_program_reads_a_stream_as_a_snapshot_while_cat_streams(mount):
    mount.sh("echo 'spawn counter' > ctl", check=True)
    mount.write("agents/counter/in", "40\n")
    mount.wait_for(lambda: mount.status("counter")["state"] == "running", what="counter runs")
    task = mount.status("counter")["task"]
    cat = subprocess.Popen(["cat", str(mount.path / "agents/counter/out")],
                           stdout=subprocess.PIPE)
    try:
        mount.wait_for(lambda: b"2\n" in so_far(mount, "agents/counter/out"),
                       what="two lines out")
        for rel in ("agents/counter/out", f"agents/counter/tasks/{task}/out", "events",
                    "agents/counter/mail/next", "mail/next", "topics/quiet" if
                    mount.sh("touch topics/quiet").returncode == 0 else "events"):
            r, took = gio("cat", str(mount.path / rel))
            assert r.returncode == 0 and took < WINDOW_S, (rel, took, r.returncode, r.stderr)
            if rel.endswith("out"):
                assert r.stdout.startswith(b"1\n2\n"), (rel, r.stdout)
        assert b'"kind":"task_started"' in gio("cat", str(mount.path / "events"))[0].stdout
        assert cat.poll() is None, "cat of the same stream still streams"
    finally:
        cat.kill()
        cat.wait()
    assert mount.alive()


@needs_gio
def test_saving_a_ctl_back_changes_nothing(mount):
    mount.sh("echo 'spawn echo' > ctl && echo 'spawn counter' > ctl", check=True)
    mount.write("agents/counter/in", "2\n")
    mount.wait_for(lambda: mount.status("counter")["done"] == "1", what="counter's task")
    model = next(m for m in sorted(os.listdir(mount.path / "models"))
                 if (mount.path / "models" / m).is_dir())  # (the offline scripted model)
    conv = mount.read(f"models/{model}/clone").strip()
    ctls = ["ctl", "agents/echo/ctl", "agents/counter/ctl", "federation/ctl",
            f"models/{model}/{conv}/ctl"]
    shown = {rel: mount.read(rel) for rel in ctls}
    mount.write("agents/echo/in", "marker\n")  # the state moves on after it was read
    mount.wait_for(lambda: mount.status("echo")["done"] == "1", what="echo's task")
    events = Events(mount)  # what the saves cause, from here on
    try:
        for rel in ctls:
            r, took = gio("save", str(mount.path / rel), data=shown[rel].encode())
            assert r.returncode == 0 and took < WINDOW_S, (rel, took, r.stderr)
        mount.sh("echo 'spawn upper' > ctl", check=True)  # a command after them: a marker
        seen = events.until(lambda es: any(e["kind"] == "spawn" for e in es),
                            what="the marker's spawn")
    finally:
        events.close()
    # nothing was refused or done: no command ran, the agents are as they were
    assert [e["kind"] for e in seen] == ["spawn"], seen
    assert sorted(os.listdir(mount.path / "agents")) == ["counter", "echo", "upper"]
    assert mount.status("echo")["state"] == "idle" and mount.status("counter")["done"] == "1"
    assert "fs9:" not in mount.read("agents/echo/err")  # no refusal noted
    # what is not this ctl's state is still refused, as any unknown command
    assert mount.sh("echo 'counter idle - 0 0 1 0' > agents/echo/ctl").returncode != 0
    assert mount.sh("echo 'stpo' > agents/echo/ctl").returncode != 0


@needs_gio
def test_modes_tell_a_desktop_what_it_may_do(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    info = {}
    for rel in ("agents/echo/in", "agents/echo/steps", "agents/echo/out", "events"):
        r, _ = gio("info", "-a", "access::*,standard::*", str(mount.path / rel))
        assert r.returncode == 0, r.stderr
        info[rel] = r.stdout.decode()
    for rel in ("agents/echo/in", "agents/echo/steps"):  # write-only: never opened to read
        assert "access::can-read: FALSE" in info[rel], info[rel]
    for rel in ("agents/echo/out", "events"):  # streams: nothing to save back
        assert "access::can-write: FALSE" in info[rel], info[rel]


X_TOOLS = ("Xvfb", "mousepad", "xdotool")


@pytest.mark.skipif(not all(map(shutil.which, X_TOOLS)),
                    reason=f"needs {', '.join(X_TOOLS)} (apt-get install xvfb mousepad xdotool: "
                           "the editor pcmanfm and Thunar open text with)")
def test_an_editor_opened_on_a_stream_shows_a_window_while_the_task_runs(mount, tmp_path):
    """What a double-click in pcmanfm or Thunar does: Mousepad (GTK, reading through GIO)
    opens the file. On `out` of a running task and on `events` its window comes as soon as
    on a plain file (within WINDOW_S more), while the task still runs."""
    # -noreset: an X server resets when its last client leaves, refusing connections a
    # moment (between two editors)
    display = subprocess.Popen(["Xvfb", "-displayfd", "1", "-screen", "0", "1024x768x24",
                                "-nolisten", "tcp", "-noreset"], stdout=subprocess.PIPE,
                               stderr=open(tmp_path / "xvfb.log", "wb"))
    try:
        env = {**GIO_ENV, "DISPLAY": ":" + display.stdout.readline().decode().strip(),
               "NO_AT_BRIDGE": "1", "HOME": str(tmp_path)}
        mount.vault.mkdir(exist_ok=True)
        (mount.vault / "notes.txt").write_text("a plain file\n")
        mount.sh("echo 'spawn counter' > ctl", check=True)
        mount.write("agents/counter/in", "60\n")
        mount.wait_for(lambda: b"2\n" in so_far(mount, "agents/counter/out"),
                       what="two lines out")

        def window_after(rel: str) -> float:
            start = time.monotonic()
            editor = subprocess.Popen(["mousepad", str(mount.path / rel)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                found = subprocess.run(["timeout", "30", "xdotool", "search", "--sync",
                                        "--onlyvisible", "--pid", str(editor.pid)],
                                       env=env, capture_output=True)
                assert found.returncode == 0, (f"no window for {rel} in 30 s", env["DISPLAY"],
                                               found.stderr, (tmp_path / "xvfb.log").read_text())
                return time.monotonic() - start
            finally:
                editor.kill()
                editor.wait()

        window_after("vault/notes.txt")  # (the first start loads caches: not counted)
        plain = window_after("vault/notes.txt")
        for rel in ("agents/counter/out", "events"):
            took = window_after(rel)
            assert took < plain + WINDOW_S, (rel, took, plain)
        assert mount.status("counter")["state"] == "running"
    finally:
        display.terminate()  # (SIGTERM: it removes its socket and lock)
        display.wait(timeout=30)


def test_a_program_holding_a_ctl_open_has_each_write_past_the_start_applied(mount):
    mount.sh("echo 'spawn wx cmd=cat' > ctl && echo stop > agents/wx/ctl", check=True)
    state = mount.read("agents/wx/ctl").encode()
    fd = os.open(mount.path / "agents/wx/ctl", os.O_WRONLY)
    try:
        assert os.write(fd, state) == len(state)  # from the start: its state saved back
        for _ in range(3):
            os.write(fd, b"run x\n")  # past the start: commands, each applied
        with pytest.raises(OSError) as e:
            os.write(fd, state)  # its state past the start is no save: an unknown command
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    queued = [t for t in os.listdir(mount.path / "agents/wx/tasks") if t.isdigit()]
    assert len(queued) == 3
