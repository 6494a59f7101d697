"""The root `metrics` (kernel/metrics.py): Prometheus text, parsed by prometheus-client's
own parser and checked against activity driven through a real mount."""
from prometheus_client.parser import text_string_to_metric_families


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
    assert got[("fs9_task_duration_seconds_count", (("agent", "echo"),))] == 2
    assert got[("fs9_task_duration_seconds_bucket", (("agent", "echo"), ("le", "+Inf")))] == 2
    assert ("fs9_task_duration_seconds_count", (("agent", "q"),)) not in got  # none ran
    assert got[("fs9_mail_pending", (("agent", "operator"),))] == 1  # crashy's escalation
    # durations are rebuilt from the log: a new mount shows the same
    mount.umount()
    mount.mount()
    again = samples(mount.read("metrics"))
    assert again[("fs9_task_duration_seconds_count", (("agent", "echo"),))] == 2
    assert again[("fs9_task_duration_seconds_sum", (("agent", "echo"),))] == \
        got[("fs9_task_duration_seconds_sum", (("agent", "echo"),))]


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
