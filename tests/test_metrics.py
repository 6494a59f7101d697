"""The root `metrics` (kernel/metrics.py): Prometheus text, parsed by prometheus-client's
own parser and checked against activity driven through a real mount."""
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Mount, fs9, fuse_unavailable


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, (label, value)...): value} of an exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_happened(mount):
    sh = lambda cmd: mount.sh(cmd, check=True)  # noqa: E731
    sh("echo 'spawn echo' > ctl && echo 'run a' > agents/echo/ctl && echo 'run b' > agents/echo/ctl")
    sh("echo \"spawn fail cmd='sh -c \\\"exit 3\\\"'\" > ctl && echo 'run x' > agents/fail/ctl")
    sh("echo 'spawn q cmd=cat' > ctl && echo stop > agents/q/ctl"
       " && echo 'run 1' > agents/q/ctl && echo 'run 2' > agents/q/ctl")
    mount.define("crashy", 'mode = "daemon"\ncmd = ["sh", "-c", "exit 1"]\n'
                           'restart = "permanent"\nmax_restarts = 2\n')
    sh("echo 'spawn crashy' > ctl")
    mount.wait_for(lambda: mount.status("echo")["done"] == "2" and mount.status("fail")["failed"] == "1"
                   and mount.status("crashy")["state"] == "failed", what="the activity done")
    got = samples(mount.read("metrics"))
    assert got[("fs9_agents", (("state", "idle"),))] == 2  # echo, fail
    assert got[("fs9_agents", (("state", "stopped"),))] == 1  # q
    assert got[("fs9_agents", (("state", "failed"),))] == 1  # crashy
    assert got[("fs9_agent_tasks", (("agent", "echo"), ("state", "done")))] == 2
    assert got[("fs9_agent_tasks", (("agent", "fail"), ("state", "failed")))] == 1
    assert got[("fs9_tasks", (("state", "queued"),))] == 2
    assert got[("fs9_agent_queue_depth", (("agent", "q"),))] == 2
    assert got[("fs9_agent_restarts_total", (("agent", "crashy"),))] == 2
    assert got[("fs9_task_duration_seconds_count", ())] == 3  # echo's 2, fail's 1 (q's: none ran)
    assert got[("fs9_task_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    assert got[("fs9_mail_pending", (("agent", "operator"),))] == 1  # crashy's escalation
    # durations are rebuilt from the log: a new mount shows the same
    mount.umount()
    mount.mount()
    again = samples(mount.read("metrics"))
    assert again[("fs9_task_duration_seconds_count", ())] == 3
    assert again[("fs9_task_duration_seconds_sum", ())] == got[("fs9_task_duration_seconds_sum", ())]
    assert again[("fs9_state_events_total", (("kind", "task_done"),))] == \
        got[("fs9_state_events_total", (("kind", "task_done"),))]


def test_an_agent_sees_only_the_agents_it_knows_of(mount):
    mount.define("peek", 'cmd = ["cat"]\n[unveil]\n"metrics" = "r"\n')
    mount.sh("echo 'spawn secret cmd=cat' > ctl && echo 'run s' > agents/secret/ctl"
             " && echo 'spawn peek' > ctl", check=True)
    mount.wait_for(lambda: mount.status("secret")["done"] == "1", what="secret's task done")
    assert "secret" in mount.read("metrics")
    seen = mount.read("agents/peek/view/metrics")
    got = samples(seen)
    assert "secret" not in seen and "operator" not in seen
    assert got[("fs9_agent_queue_depth", (("agent", "peek"),))] == 0
    assert got[("fs9_agents", (("state", "idle"),))] == 1


def test_state_events_and_fuse_requests_are_counted(mount):
    mount.sh("echo 'spawn echo' > ctl && printf 'hi\\n' > agents/echo/mail/new", check=True)
    mount.sh("cat agents/nobody/status", check=False)  # ENOENT: an error answered
    got = samples(mount.read("metrics"))
    assert got[("fs9_state_events_total", (("kind", "spawn"),))] == 1
    assert got[("fs9_state_events_total", (("kind", "mail_sent"),))] == 1
    assert got[("fs9_fuse_request_seconds_count", (("op", "write"),))] >= 2
    assert got[("fs9_fuse_errors_total", (("op", "lookup"),))] >= 1
    assert got[("fs9_fuse_request_seconds_count", (("op", "lookup"),))] > \
        got[("fs9_fuse_errors_total", (("op", "lookup"),))]
    mount.define("peek", 'cmd = ["cat"]\n[unveil]\n"metrics" = "r"\n')
    mount.sh("echo 'spawn peek' > ctl", check=True)
    seen = mount.read("agents/peek/view/metrics")
    assert "fs9_fuse" not in seen and "fs9_state_events" not in seen  # the operator's


def test_metrics_over_http_for_a_scraper(tmp_path):
    """fs9 mount --metrics 127.0.0.1:PORT: the operator's exposition over HTTP; only on a
    loopback address."""
    why = fuse_unavailable()
    if why:
        pytest.skip(f"cannot mount FUSE here: {why}")
    m = Mount(tmp_path)
    r = fs9("mount", str(m.path), "--state", str(m.state), "--agents", str(m.agents),
            "--metrics", "0.0.0.0:9109")
    assert r.returncode == 2 and "loopback" in r.stderr
    with socket.socket() as s:  # a free port (another process could take it: unlikely)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = fs9("mount", str(m.path), "--state", str(m.state), "--agents", str(m.agents),
            "--vault", str(m.vault), "--background", "--metrics", f"127.0.0.1:{port}")
    assert r.returncode == 0, r.stderr
    m.pid = int(dict(w.split("=") for w in m.read("ctl").split())["pid"])
    try:
        m.sh("echo 'spawn echo' > ctl && echo 'run hi' > agents/echo/ctl", check=True)
        m.wait_for(lambda: m.status("echo")["done"] == "1", what="the task done")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            got = samples(resp.read().decode())
        assert got[("fs9_agent_tasks", (("agent", "echo"), ("state", "done")))] == 1
        assert got[("fs9_task_duration_seconds_count", ())] == 1
    finally:
        m.umount()
