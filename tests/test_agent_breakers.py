"""Circuit breakers per agent (kernel/agents/breaker.py): an agent whose tasks keep
failing is cut off (new work refused with EHOSTDOWN, its queue held), probed after a
cool-down, closed by a probe that succeeds or by the operator's `reset`; in its status,
the metrics and the events; kept across a remount."""
import errno
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Events, errno_of, fuse_unavailable
from fs9 import top

pytestmark = pytest.mark.skipif(bool(fuse_unavailable()),
                                reason=f"cannot mount FUSE: {fuse_unavailable()}")

# each task: its input line says how it ends
PICKY = """cmd = ["sh", "-c", "read x; [ \\"$x\\" = ok ]"]
[breaker]
failures = 2
window_s = 120
cooldown_s = {cooldown}
[unveil]
"models/scripted" = "rw"
"""


def breaker_state(m, agent: str) -> str:
    for family in text_string_to_metric_families(m.read("metrics")):
        for s in family.samples:
            if s.name == "fs9_agent_breaker" and s.labels["agent"] == agent and s.value == 1:
                return s.labels["state"]
    return "absent"


def test_failures_open_it_new_work_is_refused_the_operator_resets_it(mount):
    m = mount
    m.define("picky", PICKY.format(cooldown=600))
    m.sh("echo 'spawn picky' > ctl && echo 'run bad' > agents/picky/ctl", check=True)
    m.wait_for(lambda: m.status("picky")["failed"] == "1", what="the first failure")
    s = m.status("picky")
    assert (s["breaker"], s["breaker_failures"]) == ("closed", "1/2")
    m.write("agents/picky/ctl", "run bad again\n")
    m.wait_for(lambda: m.status("picky")["breaker"] == "open", what="the breaker open")
    s = m.status("picky")
    assert "task" in s["breaker_reason"] and "failed" in s["breaker_reason"]
    assert s["breaker_until"] and s["breaker_opened"] == "1"
    assert breaker_state(m, "picky") == "open"
    assert [a.state for a in top.agents(m.path)] == ["idle (breaker open)"]  # fs9 top
    # new work is refused at once, with the reason where the writer looks
    assert errno_of(m.write, "agents/picky/ctl", "run ok\n") == errno.EHOSTDOWN
    assert errno_of(m.write, "agents/picky/in", "ok\n") == errno.EHOSTDOWN
    r = m.sh("printf 'type: work_request\\n\\nok\\n' > agents/picky/mail/new")
    assert r.returncode != 0
    assert "circuit breaker open" in m.read("agents/picky/err")
    # and its model calls: nothing more is spent on it
    conv = m.read("agents/picky/view/models/scripted/clone").strip()
    assert errno_of(m.write, f"agents/picky/view/models/scripted/{conv}/request",
                    "hello\n") == errno.EHOSTDOWN
    assert "agent picky: circuit breaker open" in m.read("agents/picky/err")
    assert m.status("picky")["queued"] == "0" and m.status("picky")["done"] == "0"
    # kept across a remount (the failures and the opening are in the log)
    m.umount()
    m.mount()
    assert m.status("picky")["breaker"] == "open"
    # an agent may not reset it, even its own; the operator may
    assert errno_of(m.write, "agents/picky/view/agents/picky/ctl", "reset\n") == errno.EPERM
    m.write("agents/picky/ctl", "reset\n")
    assert m.status("picky")["breaker"] == "closed"
    assert errno_of(m.write, "agents/picky/ctl", "reset\n") == errno.EINVAL  # closed
    m.write("agents/picky/ctl", "run ok\n")
    m.wait_for(lambda: m.status("picky")["done"] == "1", what="work taken again")
    seen = [json.loads(line) for line in m.read("log/audit").splitlines()]
    kinds = [e["kind"] for e in seen if e["kind"].startswith("agent_breaker")]
    assert kinds == ["agent_breaker_opened", "agent_breaker_closed"]
    assert [e for e in seen if e["kind"] == "agent_breaker_closed"][0]["reason"] == \
        "reset by the operator"


def test_the_queue_waits_for_the_cool_down_then_one_task_probes(mount):
    m = mount
    m.define("picky", PICKY.format(cooldown=3))
    ev = Events(m)
    m.sh("echo 'spawn picky' > ctl && echo stop > agents/picky/ctl", check=True)
    for line in ("bad", "bad", "ok", "ok"):  # queued while stopped
        m.write("agents/picky/ctl", f"run {line}\n")
    m.write("agents/picky/ctl", "start\n")
    m.wait_for(lambda: m.status("picky")["done"] == "2", what="both ok tasks, after the probe")
    seen = ev.until(lambda s: any(e["kind"] == "agent_breaker_closed" for e in s))
    ev.close()
    mine = [e for e in seen if e.get("agent") == "picky"]
    opened = next(e for e in mine if e["kind"] == "agent_breaker_opened")
    probe = next(e for e in mine if e["kind"] == "agent_breaker_half_open")
    closed = next(e for e in mine if e["kind"] == "agent_breaker_closed")
    started = [e for e in mine if e["kind"] == "task_started"]
    assert len(started) == 4
    # the third task waited out the cool-down, then ran as the probe and closed it
    assert started[2]["task"] == probe["task"] == closed["task"]
    assert started[2]["ts"] - opened["ts"] >= 2.9
    assert "succeeded" in closed["reason"]
    assert m.status("picky")["breaker"] == "closed" and breaker_state(m, "picky") == "closed"


def test_a_failed_probe_opens_it_again(mount):
    m = mount
    m.define("picky", PICKY.format(cooldown=1))
    m.sh("echo 'spawn picky' > ctl && echo 'run bad' > agents/picky/ctl"
         " && echo 'run bad' > agents/picky/ctl", check=True)
    m.wait_for(lambda: m.status("picky")["breaker"] == "open", what="open")

    def probe_taken() -> bool:  # refused until the cool-down is over
        return errno_of(m.write, "agents/picky/ctl", "run bad\n") is None
    m.wait_for(probe_taken, what="work taken as the probe after the cool-down")
    m.wait_for(lambda: m.status("picky")["breaker_opened"] == "2", what="opened again")
    assert m.status("picky")["breaker"] == "open" and m.status("picky")["failed"] == "3"


def test_no_breaker_unless_the_manifest_asks_and_a_bad_table_is_refused(mount):
    m = mount
    m.sh("echo \"spawn fail cmd='sh -c \\\"exit 3\\\"'\" > ctl", check=True)
    for _ in range(4):
        m.write("agents/fail/ctl", "run x\n")
    m.wait_for(lambda: m.status("fail")["failed"] == "4", what="four failures")
    assert m.status("fail")["breaker"] == "none" and breaker_state(m, "fail") == "absent"
    m.define("bad", 'cmd = ["cat"]\n[breaker]\nfailures = -1\n')
    r = m.sh("echo 'spawn bad' > ctl")
    assert r.returncode != 0 and "breaker.failures" in m.read("err")


def test_work_another_agent_asked_for_does_not_trip_it(mount):
    """Failures of tasks another agent gave it (through its `in`) are not counted: a
    caller cannot cut off an agent it may give work to, the operator's work with it."""
    m = mount
    m.define("picky", PICKY.format(cooldown=600))
    m.define("caller", 'cmd = ["sleep", "600"]\nunconfined = true\n'
                       '[unveil]\n"agents/picky" = "rw"\n')
    m.sh("echo 'spawn picky' > ctl && echo 'spawn caller' > ctl", check=True)
    for n in range(3):
        m.write("agents/caller/view/agents/picky/in", "bad\n")
        m.wait_for(lambda: m.status("picky")["failed"] == str(n + 1), what=f"failure {n + 1}")
    s = m.status("picky")
    assert (s["breaker"], s["breaker_failures"]) == ("closed", "0/2")
    m.write("agents/picky/in", "ok\n")  # the operator's work still goes
    m.wait_for(lambda: m.status("picky")["done"] == "1", what="the operator's task")
