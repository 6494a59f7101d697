"""The root `metrics` (kernel/metrics.py): Prometheus text, parsed by prometheus-client's
own parser and checked against activity driven through a real mount."""
import json
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Mount, fs9, fuse_unavailable, wait_task


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, (label, value)...): value} of an exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def free_port() -> int:
    """A free port on loopback (another process could take it meanwhile: unlikely)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = free_port()
    m.mount("--metrics", f"127.0.0.1:{port}")
    try:
        m.sh("echo 'spawn echo' > ctl && echo 'run hi' > agents/echo/ctl", check=True)
        m.wait_for(lambda: m.status("echo")["done"] == "1", what="the task done")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            got = samples(resp.read().decode())
        assert got[("fs9_agent_tasks", (("agent", "echo"), ("state", "done")))] == 1
        assert got[("fs9_task_duration_seconds_count", ())] == 1
    finally:
        m.umount()


SPY = """import socket
s = socket.create_connection(("127.0.0.1", PORT), timeout=20)
print("connected", flush=True)
s.sendall(b"GET /metrics HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
got = b""
try:
    while chunk := s.recv(65536):
        got += chunk
except OSError as e:
    print("error", e.errno)
print("got", len(got))
print(got.decode(errors="replace"))
"""


def test_the_metrics_address_answers_the_operator_only(tmp_path):
    """A confined agent that pledged `inet` shares the host's loopback, so it reaches the
    --metrics address; fs9 looks up who made the socket at the other end and answers
    the operator only: the agent's connection is closed unread (a `refused` event), so
    the names of agents it may not know of never reach it; the operator's scrape works."""
    from fs9.drivers import confine
    why = fuse_unavailable() or confine.unavailable()
    if why:
        pytest.skip(f"cannot run a confined agent on a mount here: {why}")
    m = Mount(tmp_path)
    port = free_port()
    m.mount("--metrics", f"127.0.0.1:{port}")
    try:
        m.define("spy", 'cmd = ["python3", "spy.py"]\npledge = ["read", "inet"]\n',
                 {"spy.py": SPY.replace("PORT", str(port))})
        m.define("unseen", 'cmd = ["cat"]\n')
        m.sh("echo 'spawn unseen' > ctl; echo 'spawn spy' > ctl", check=True)
        m.write("agents/spy/in", "go\n")
        out, err = wait_task(m, "spy", 120)
        assert out.startswith("connected\n"), err  # it reached the port: fs9 said no
        assert "unseen" not in out and "fs9_" not in out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            assert ("fs9_mail_pending", (("agent", "unseen"),)) in samples(resp.read().decode())
        m.wait_for(lambda: [e for e in map(json.loads, m.read("log/audit").splitlines())
                            if e["kind"] == "refused" and e.get("agent") == "spy"
                            and e.get("file") == "metrics (http)"], what="spy's refusal")
    finally:
        m.umount()
