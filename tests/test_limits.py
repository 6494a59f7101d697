"""Resource limits of confined agents (issue 12, item 2; issue 20, item 7's kill):
each limit is crossed for real, bounded for a shared 2-core machine, and must end
that task with a reason a person understands, a `limit_exceeded` event, and nothing
left behind; the operator's `cat status` keeps answering, other agents keep working."""
import json
import os
import time

import pytest

from conftest import uid_procs
from fs9.drivers import cgroups, confine

pytestmark = pytest.mark.skipif(confine.unavailable() is not None,
                                reason=f"cannot confine here: {confine.unavailable()}")


def run_task(mount, name: str, manifest: str, files=None, stdin="go\n", timeout=60) -> dict:
    mount.define(name, manifest, files)
    mount.sh(f"echo 'spawn {name}' > ctl", check=True)
    mount.write(f"agents/{name}/in", stdin)
    return mount.wait_for(lambda: (s := mount.status(name))["latest_state"] in
                          ("done", "failed") and s, timeout, f"{name}'s task")


def exceeded(mount, name: str) -> list[dict]:
    return [e for e in map(json.loads, mount.read("log/audit").splitlines())
            if e["kind"] == "limit_exceeded" and e.get("agent") == name]


def responsive(mount) -> float:
    t = time.monotonic()
    mount.read("status")
    return time.monotonic() - t


@pytest.mark.skipif("memory" not in cgroups.hierarchies(), reason="no memory cgroup here")
def test_a_memory_hog_ends_its_task(mount):
    s = run_task(mount, "hog", 'cmd = ["python3", "-c", "x = bytearray(300 << 20); '
                 'print(len(x))"]\npledge = ["read"]\n[limits]\nmemory_mb = 64\n')
    assert s["latest_state"] == "failed" and "limit exceeded: memory 64 MiB" in \
        s["latest_reason"], s
    assert exceeded(mount, "hog")[0]["limit"] == "memory_mb"
    assert responsive(mount) < 1.0


@pytest.mark.skipif("pids" not in cgroups.hierarchies(), reason="no pids cgroup here")
def test_a_fork_storm_is_bounded_and_ends_its_task(mount):
    storm = ('cmd = ["python3", "-c", "import os, time\\nprint(os.getuid(), flush=True)\\n'
             'for i in range(300):\\n  try:\\n'
             '    os.fork() or (time.sleep(60), os._exit(0))\\n  except OSError:\\n'
             '    pass\\ntime.sleep(60)"]\npledge = ["read"]\n[limits]\nprocesses = 32\n')
    t0 = time.monotonic()
    s = run_task(mount, "storm", storm)
    assert time.monotonic() - t0 < 30  # ended by the limit, not by its own sleep
    assert "limit exceeded: processes 32" in s["latest_reason"], s
    uid = int(mount.read(f"agents/storm/tasks/{s['latest']}/out").split()[0])
    mount.wait_for(lambda: not uid_procs(uid), 20, "every process of the storm to end")
    assert responsive(mount) < 1.0


def test_output_past_its_limit_ends_the_task(mount):
    s = run_task(mount, "loud", 'cmd = ["sh", "-c", "yes | head -c 5000000; sleep 20"]\n'
                 'pledge = ["read"]\n[limits]\noutput_mb = 1\n')
    assert "limit exceeded: output 1 MiB" in s["latest_reason"], s
    out = mount.read(f"agents/loud/tasks/{s['latest']}/out")
    assert len(out) <= 1 << 20


def test_a_task_that_never_ends_is_ended(mount):
    s = run_task(mount, "forever", 'cmd = ["sleep", "600"]\npledge = ["read"]\ntimeout_s = 1\n')
    assert s["latest_state"] == "failed" and "timeout after 1s" in s["latest_reason"]
    assert exceeded(mount, "forever")[0]["limit"] == "timeout_s"


def test_scratch_is_bounded_and_shm_is_closed(mount):
    s = run_task(mount, "filler", 'cmd = ["sh", "-c", "dd if=/dev/zero of=$HOME/f bs=1M '
                 'count=20 2>&1 | tail -1; ls -l $HOME/f | cut -d\\" \\" -f5; '
                 'echo x > /dev/shm/x && echo shm-ok"]\npledge = ["read"]\n'
                 '[limits]\nscratch_mb = 4\n')
    out = mount.read(f"agents/filler/tasks/{s['latest']}/out").splitlines()
    assert "No space left on device" in out[0] or int(out[1]) <= 4 << 20, out
    assert int(out[1]) <= 4 << 20
    assert "shm-ok" not in out


def test_nothing_of_a_task_outlives_it(mount):
    """A program that double-forks and calls setsid escapes its process group, not its
    control group: when the task ends, so does it."""
    s = run_task(mount, "ghost", 'cmd = ["sh", "-c", "setsid sh -c \'sleep 300\' & '
                 'sleep 0.2; echo $!"]\npledge = ["read"]\n')
    assert s["latest_state"] == "done"
    pid = int(mount.read(f"agents/ghost/tasks/{s['latest']}/out").split()[0])
    mount.wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 20, "the ghost to end")


def test_others_keep_working_under_hogs(mount):
    mount.define("burn", 'cmd = ["sh", "-c", "timeout 15 sh -c \'while :; do :; done\'"]\n'
                         'pledge = ["read"]\npriority = "background"\n')
    mount.sh("echo 'spawn burn' > ctl; echo go > agents/burn/in", check=True)
    mount.wait_for(lambda: mount.status("burn")["state"] == "running", 30, "the burner")
    s = run_task(mount, "quick", 'cmd = ["id", "-u"]\npledge = ["read"]\n'
                 'priority = "interactive"\n')
    assert s["latest_state"] == "done" and responsive(mount) < 1.0
    cpu = cgroups.hierarchies().get("cpu")
    if cpu:  # the CPU share follows the priority: interactive 800 (v1: 8192 shares)
        uid = mount.read(f"agents/quick/tasks/{s['latest']}/out").strip()
        [group] = [os.path.join(cpu, d, uid) for d in os.listdir(cpu)
                   if d.startswith("fs9-") and os.path.isdir(os.path.join(cpu, d, uid))]
        weight = open(os.path.join(group, "cpu.weight" if os.path.exists(
            os.path.join(group, "cpu.weight")) else "cpu.shares")).read().strip()
        assert weight in ("800", str(800 * 1024 // 100)), weight
    mount.write("agents/burn/ctl", "stop\n")
