"""The tree and its files, driven with sh, echo, cat and ls on a real mount."""
import json
import os
import subprocess


def test_root_and_agent_layout(mount):
    assert sorted(os.listdir(mount.path)) == ["agents", "approvals", "ctl", "err", "events", "federation", "log", "mail", "metrics", "models", "nodes", "registry", "search", "status", "topics", "tree", "vault"]
    assert os.listdir(mount.path / "agents") == []
    mount.sh("echo 'spawn echo' > ctl", check=True)
    assert os.listdir(mount.path / "agents") == ["echo"]
    assert sorted(os.listdir(mount.path / "agents/echo")) == [
        "approve", "children", "ctl", "err", "in", "mail", "manifest", "memory", "out", "outbox",
        "status", "steps", "supervisor", "tasks", "view"]
    line = mount.read("ctl")
    assert line.startswith("state=running ") and "agents=1" in line
    assert mount.read("status") == "echo idle - 0 0 0 0\n"
    # federation/ is there, off until joined (tests/test_federation.py)
    assert sorted(os.listdir(mount.path / "federation")) == [
        "approvals", "card", "ctl", "dead", "outbox", "peers", "requests", "sagas", "status", "topics"]
    assert "connection=off" in mount.read("federation/status")
    # nodes/ is there, empty outside a cluster (tests/test_cluster.py)
    assert os.listdir(mount.path / "nodes") == []


def test_run_then_cat_out_prints_the_result(mount):
    r = mount.sh("echo 'spawn upper' > ctl && echo 'run hello fs9' > agents/upper/ctl"
                 " && cat agents/upper/out", check=True)
    assert r.stdout == "HELLO FS9\n"
    st = mount.status("upper")
    assert st["state"] == "idle" and st["done"] == "1" and st["latest_exit"] == "0"
    assert mount.read("status").split() == ["upper", "idle", "-", "0", "0", "1", "0"]


def test_a_file_written_to_in_is_one_task_with_those_bytes(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    data = bytes(range(256)) * 300  # binary, 76 KiB: many FUSE writes, one task
    with open(mount.path / "agents/echo/in", "wb") as f:
        for i in range(0, len(data), 1000):
            f.write(data[i:i + 1000])
            f.flush()
    tasks = os.listdir(mount.path / "agents/echo/tasks")
    assert len(tasks) == 1
    with open(mount.path / "agents/echo/out", "rb") as f:
        assert f.read() == data
    t = mount.path / "agents/echo/tasks" / tasks[0]
    assert (t / "input").read_bytes() == data and (t / "out").read_bytes() == data
    status = dict(line.split("=", 1) for line in (t / "status").read_text().splitlines())
    assert status["state"] == "done" and status["exit"] == "0" and status["agent"] == "echo"


def test_task_files_stderr_exit_status_and_environment(mount):
    mount.define("envy", 'cmd = ["sh", "run.sh"]\n', {"run.sh": (
        'cat >/dev/null\necho "agent=$FS9_AGENT task=$FS9_TASK mnt=$FS9_MNT"\n'
        'echo "to stderr" >&2\nexit 3\n')})
    mount.sh("echo 'spawn envy' > ctl && echo 'run x' > agents/envy/ctl", check=True)
    out = mount.read("agents/envy/out")
    task = os.listdir(mount.path / "agents/envy/tasks")[0]
    assert out == f"agent=envy task={task} mnt={mount.path}\n"
    assert mount.read("agents/envy/err") == "to stderr\n"
    assert mount.read(f"agents/envy/tasks/{task}/err") == "to stderr\n"
    status = mount.read(f"agents/envy/tasks/{task}/status")
    assert "state=failed" in status and "exit=3" in status
    assert mount.status("envy")["failed"] == "1"


def test_manifest_shows_the_effective_manifest_with_overrides(mount):
    mount.sh("echo 'spawn e2 def=echo priority=background max_restarts=7' > ctl", check=True)
    text = mount.read("agents/e2/manifest")
    assert 'cmd = ["cat"]' in text and 'priority = "background"' in text
    assert "max_restarts = 7" in text
    assert mount.status("e2")["priority"] == "background"


def test_events_are_json_lines_from_the_moment_of_open(mount, events):
    mount.sh("echo 'spawn echo' > ctl && echo 'run hi' > agents/echo/ctl", check=True)
    mount.wait_for(lambda: mount.status("echo")["done"] == "1", what="the first task")
    seen = events.wait_kind("task_done")
    kinds = [e["kind"] for e in seen]
    assert kinds[:4] == ["spawn", "task_queued", "task_started", "task_done"]
    assert all(e["agent"] == "echo" for e in seen[:4])
    assert seen[1]["task"] == seen[3]["task"] and seen[1]["corr"] == seen[3]["corr"]
    assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)
    # a second reader opened now does not see the past
    # (a check that nothing comes: the past would be served at once; 2 s is ample)
    r = mount.sh("timeout 2 cat events")
    assert r.returncode == 124 and r.stdout == ""


def test_kill_removes_the_agent_and_spawn_again_starts_fresh(mount):
    mount.sh("echo 'spawn echo' > ctl && echo 'run one' > agents/echo/ctl && cat agents/echo/out",
             check=True)
    mount.sh("echo 'kill echo' > ctl", check=True)
    assert not (mount.path / "agents/echo").exists()
    mount.sh("echo 'spawn echo' > ctl", check=True)
    assert os.listdir(mount.path / "agents/echo/tasks") == []
    assert mount.read("agents/echo/out") == ""


def test_ls_and_stat_work_with_standard_tools(mount):
    mount.sh("echo 'spawn echo' > ctl && echo 'run hi' > agents/echo/ctl", check=True)
    mount.wait_for(lambda: mount.status("echo")["done"] == "1", what="the first task")
    r = mount.sh("ls -la agents/echo && stat -c '%n %a' agents/echo/in agents/echo/status "
                 "agents/echo && find . -maxdepth 4 | sort | head -50", check=True)
    assert "agents/echo/in 200\n" in r.stdout and "agents/echo/status 444\n" in r.stdout
    assert "agents/echo 555\n" in r.stdout and "./agents/echo/tasks/" in r.stdout
    # status files report their real size, so tail and wc work
    assert mount.sh("tail -n 1 agents/echo/status", check=True).stdout.startswith("reason=")
    head = subprocess.Popen(["head", "-n", "1", mount.path / "events"], stdout=subprocess.PIPE)
    mount.wait_reading([head], "events")  # it has opened events (and waits)
    mount.sh("echo 'run again' > agents/echo/ctl", check=True)
    ev = json.loads(head.communicate(timeout=30)[0])
    assert ev["kind"] == "task_queued"
