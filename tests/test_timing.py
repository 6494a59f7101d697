"""Task timing and progress (issue 15.4): tasks/ID/status and agents/NAME/status say when a
task was queued, started and ended, how long it ran, and its latest progress report."""
from datetime import datetime


def iso(value: str) -> float:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_a_task_shows_its_times_and_latest_progress(mount, tmp_path):
    m = mount
    go = tmp_path / "go"
    # reports progress (a line break in it too), then runs until the test says go
    m.define("worker", 'cmd = ["sh", "work.sh"]\nunconfined = true\n', {"work.sh": (
        'cat >/dev/null\necho "step 1" > "$FS9_PROGRESS"\n'
        "printf 'half\\nway=yes' > \"$FS9_PROGRESS\"\n"
        f'while [ ! -e {go} ]; do sleep 0.05; done\necho finished\n')})
    m.sh("echo 'spawn worker' > ctl && echo 'run job' > agents/worker/ctl", check=True)
    s = m.wait_for(lambda: (st := m.status("worker"))["task_progress"] == "half\\nway=yes"
                   and st, what="worker's second progress report")
    task = s["task"]
    t = dict(line.split("=", 1) for line in
             m.read(f"agents/worker/tasks/{task}/status").splitlines())
    assert t["state"] == "running" and t["progress"] == "half\\nway=yes"
    assert iso(t["queued_at"]) <= iso(t["started_at"]) and t["ended_at"] == ""
    assert float(t["elapsed"]) >= 0 and s["task_started_at"] == t["started_at"]
    first = float(m.status("worker")["task_elapsed"])
    m.wait_for(lambda: float(m.status("worker")["task_elapsed"]) > first,
               what="the running task's elapsed time growing")
    go.touch()
    s = m.wait_for(lambda: (st := m.status("worker"))["latest_state"] == "done" and st,
                   what="worker's task done")
    t = dict(line.split("=", 1) for line in
             m.read(f"agents/worker/tasks/{task}/status").splitlines())
    assert iso(t["ended_at"]) >= iso(t["started_at"]) and float(t["elapsed"]) > first
    assert (s["task"], s["task_started_at"], s["task_elapsed"], s["task_progress"]) == \
        ("", "", "", "")
    assert (s["latest_ended_at"], s["latest_elapsed"]) == (t["ended_at"], t["elapsed"])
    assert t["progress"] == "half\\nway=yes"  # the latest report stays with the task
    # a task still queued has no start, end or elapsed time
    m.sh("echo stop > agents/worker/ctl && echo 'run later' > agents/worker/ctl", check=True)
    queued = m.status("worker")["latest"]
    q = dict(line.split("=", 1) for line in
             m.read(f"agents/worker/tasks/{queued}/status").splitlines())
    assert q["state"] == "queued" and q["queued_at"]
    assert (q["started_at"], q["ended_at"], q["elapsed"], q["progress"]) == ("", "", "", "")
