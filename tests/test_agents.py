"""exec agents: streaming output, queues, concurrency, verbs and the supervisor."""
import os
import subprocess
import time


def spawn(mount, line: str) -> None:
    mount.sh(f"echo {line!r} > ctl", check=True)


def test_out_streams_while_the_task_runs(mount):
    spawn(mount, "spawn counter")
    mount.sh("echo 3 > agents/counter/in", check=True)
    # timed from the program's start (it prints 1 at once, then a line a second), not from
    # the submission: starting the agent's sandbox is not what this measures
    mount.wait_for(lambda: mount.status("counter")["pid"].isdigit(), what="the task to start")
    start = time.monotonic()
    with subprocess.Popen(["cat", mount.path / "agents/counter/out"], stdout=subprocess.PIPE) as p:
        first = p.stdout.readline()
        # line 1 came while the task still runs (it sleeps 1 s a line: 2 s to go)
        assert mount.status("counter")["done"] == "0"
        rest = p.stdout.read()
    assert first == b"1\n" and rest == b"2\n3\n"
    assert time.monotonic() - start > 1.9  # the rest came as it was written, not at once


def test_a_tasks_input_past_what_a_pipe_holds_reaches_its_program_whole(mount):
    """A task's input goes into its program's stdin pipe before the program starts
    (what fits: a pipe holds 64 KiB), the rest once it runs. Confined and unconfined,
    whole either way."""
    mount.define("count", 'cmd = ["sh", "-c", "wc -c"]\n')
    (mount.agents / "count").chmod(0o755)
    spawn(mount, "spawn c1 def=count")
    spawn(mount, "spawn c2 def=count unconfined=true")
    data = bytes(range(256)) * 1200  # 307,200 bytes
    for name in ("c1", "c2"):
        for size in (len(data), 65536, 1):
            with open(mount.path / "agents" / name / "in", "wb") as f:
                f.write(data[:size])
            with open(mount.path / "agents" / name / "out") as f:
                assert f.read().split() == [str(size)], (name, size)


def test_tasks_queue_in_order_and_agents_run_concurrently(mount):
    # unconfined: it keeps its own record on disk, outside any view
    sleeper = ('cmd = ["sh", "-c", "read x; s=$(date +%s.%N); sleep 1; echo $x; '
               f'echo $x $s $(date +%s.%N) >> {mount.root}/order-$FS9_AGENT"]\n'
               'unconfined = true\n')
    mount.define("slow", sleeper)
    spawn(mount, "spawn a def=slow")
    spawn(mount, "spawn b def=slow")
    mount.sh("for i in 1 2; do echo \"run a$i\" > agents/a/ctl; echo \"run b$i\" > agents/b/ctl; done",
             check=True)
    mount.wait_for(lambda: mount.status("a")["done"] == "2" and mount.status("b")["done"] == "2",
                   what="four tasks")
    ids = sorted(os.listdir(mount.path / "agents/a/tasks"), key=int)
    assert [mount.read(f"agents/a/tasks/{i}/out") for i in ids] == ["a1\n", "a2\n"]
    runs = {}  # each task's own record: its name, when it started and ended
    for agent in "ab":
        lines = (mount.root / f"order-{agent}").read_text().split("\n")[:-1]
        assert [line.split()[0] for line in lines] == [f"{agent}1", f"{agent}2"]  # queue order
        for line in lines:
            name, began, ended = line.split()
            runs[name] = (float(began), float(ended))
    assert runs["a1"][1] <= runs["a2"][0] and runs["b1"][1] <= runs["b2"][0]  # one at a time
    # the two agents' first tasks ran at the same time (each sleeps a whole second)
    assert max(runs["a1"][0], runs["b1"][0]) < min(runs["a1"][1], runs["b1"][1]), runs


def test_out_follows_the_queued_task_when_the_agent_is_busy(mount):
    mount.define("slow", 'cmd = ["sh", "-c", "read x; sleep 0.5; echo $x"]\n')
    spawn(mount, "spawn s def=slow")
    r = mount.sh("echo 'run first' > agents/s/ctl; cat agents/s/out; "
                 "echo 'run second' > agents/s/ctl; echo 'run third' > agents/s/ctl; "
                 "cat agents/s/out; cat agents/s/out", check=True)
    assert r.stdout == "first\nsecond\nthird\n"


def test_stop_start_restart_and_priority(mount):
    mount.define("slow", 'cmd = ["sh", "-c", "read x; sleep 30; echo $x"]\n')
    spawn(mount, "spawn s def=slow")
    mount.sh("echo 'run one' > agents/s/ctl; echo 'run two' > agents/s/ctl", check=True)
    # "running" comes a moment before its program's pid
    mount.wait_for(lambda: mount.status("s")["pid"].isdigit(), what="running")
    pid = int(mount.status("s")["pid"])
    mount.sh("echo 'priority background' > agents/s/ctl", check=True)
    assert mount.status("s")["priority"] == "background"
    mount.sh("echo restart > agents/s/ctl", check=True)  # the running task starts over
    mount.wait_for(lambda: mount.status("s")["pid"] not in ("", str(pid)), what="new pid")
    st = mount.status("s")
    assert st["restarts"] == "1" and st["queued"] == "1"
    newpid = int(st["pid"])
    assert os.getpriority(os.PRIO_PROCESS, newpid) == 10  # background runs niced
    mount.sh("echo stop > agents/s/ctl", check=True)
    mount.wait_for(lambda: mount.status("s")["state"] == "stopped", what="stopped")
    assert not os.path.exists(f"/proc/{newpid}") or \
        open(f"/proc/{newpid}/stat").read().split()[2] == "Z"
    st = mount.status("s")
    assert st["cancelled"] == "1" and st["queued"] == "1"
    mount.sh("echo start > agents/s/ctl", check=True)
    mount.wait_for(lambda: mount.status("s")["state"] == "running", what="running again")
    mount.sh("echo kill > agents/s/ctl", check=True)
    assert not (mount.path / "agents/s").exists()


def test_halt_pauses_everything_and_resume_requeues(mount):
    mount.define("slow", 'cmd = ["sh", "-c", "read x; sleep 30; echo $x"]\n')
    spawn(mount, "spawn s def=slow")
    mount.sh("echo 'run one' > agents/s/ctl", check=True)
    mount.wait_for(lambda: mount.status("s")["state"] == "running", what="running")
    mount.sh("echo halt > ctl", check=True)
    mount.wait_for(lambda: mount.status("s")["state"] == "halted", what="halted")
    assert mount.read("ctl").startswith("state=halted")
    assert mount.status("s")["queued"] == "1"  # the interrupted task waits, not lost
    mount.sh("echo resume > ctl", check=True)
    mount.wait_for(lambda: mount.status("s")["state"] == "running", what="resumed")
    task = os.listdir(mount.path / "agents/s/tasks")[0]
    assert "attempt=2" in mount.read(f"agents/s/tasks/{task}/status")


def test_daemon_crashing_is_restarted_then_failed_with_a_reason(mount, events):
    mount.define("crashy", 'mode = "daemon"\ncmd = ["sh", "-c", "echo up; exit 1"]\n'
                 'restart = "permanent"\nmax_restarts = 2\nwithin_s = 60\n')
    spawn(mount, "spawn crashy")
    seen = events.wait_kind("agent_failed")
    assert [e["kind"] for e in seen].count("agent_restart") == 2
    failed = next(e for e in seen if e["kind"] == "agent_failed")
    assert "more than 2 restarts within 60s" in failed["reason"]
    st = mount.status("crashy")
    assert st["state"] == "failed" and st["restarts"] == "2" and "gave up" in st["reason"]
    assert mount.read("agents/crashy/out") == "up\n"
    # start clears the failure: the supervisor tries again
    mount.sh("echo start > agents/crashy/ctl", check=True)
    events.wait_kind("agent_restart")


def test_daemon_restart_policies(mount, events):
    mount.define("once", 'mode = "daemon"\ncmd = ["sh", "-c", "exit 0"]\nrestart = "transient"\n')
    mount.define("temp", 'mode = "daemon"\ncmd = ["sh", "-c", "exit 1"]\nrestart = "temporary"\n')
    spawn(mount, "spawn once")
    spawn(mount, "spawn temp")
    mount.wait_for(lambda: mount.status("once")["state"] == "stopped"
                   and mount.status("temp")["state"] == "stopped", what="both exited for good")
    assert mount.status("once")["restarts"] == "0" and mount.status("temp")["restarts"] == "0"
    # a daemon takes no tasks
    r = mount.sh("echo 'run x' > agents/once/ctl")
    assert r.returncode != 0  # dash says only "I/O error"; bash names the errno
    assert "daemon agent and takes no tasks" in mount.read("agents/once/err")


def test_running_daemon_streams_and_stops(mount):
    mount.write("ctl", "spawn tick cmd=\"sh -c 'while :; do echo tick; sleep 0.2; done'\" mode=daemon")
    r = mount.sh("timeout 30 head -n 2 agents/tick/out", check=True)
    assert r.stdout == "tick\ntick\n"
    mount.sh("echo stop > agents/tick/ctl", check=True)
    mount.wait_for(lambda: mount.status("tick")["state"] == "stopped", what="stopped")
    assert mount.sh("timeout 30 cat agents/tick/out").returncode == 0  # EOF: the run ended
