"""Governance at the federation's boundary (issue 13): the authorization modes enforced
(independent: the operator answers each request through a file; policy: pre-agreed rules,
else the operator), every decision logged; per-peer rates (back-pressure, nothing lost);
FS9FED bounded as a work queue. Two real mounts, a real nats-server."""
import asyncio
import errno
import os
import time

import nats as natspy

from conftest import errno_of, wait_for
from test_federation import (LONG_S, connected, headers, join, log_rows, mails, members,
                             nats, status)

__all__ = ["members", "nats"]  # the fixtures, shared with test_federation.py


def approvals(m) -> list[str]:
    return sorted(os.listdir(m.path / "federation/approvals"))


def tasks(m, agent: str) -> list[str]:
    return os.listdir(m.path / f"agents/{agent}/tasks")


def request(m, extra: str = "", body: str = "q") -> None:
    m.write("federation/outbox/echo@beta",
            f"type: work_request\nclassification: public\n{extra}\n{body}\n")


def setup(nats, a, b, auth: str) -> None:
    nats.start()
    b.sh("echo 'spawn echo' > ctl", check=True)
    join(a, nats.url, "alpha", "beta")
    join(b, nats.url, "beta", "alpha")
    b.sh(f"echo 'peer alpha auth={auth}' > federation/ctl", check=True)
    connected(a, b)


def test_independent_each_request_waits_for_the_operator(nats, members):
    a, b = members
    setup(nats, a, b, "independent")
    request(a, "correlation-id: ask-1\n", "please fix")
    wait_for(lambda: approvals(b), what="the request held on beta")
    [held] = approvals(b)
    text = b.read(f"federation/approvals/{held}")
    assert "from=operator@alpha" in text and "to=echo" in text and "please fix" in text
    assert "independent" in text and tasks(b, "echo") == [] and status(b)["approvals"] == "1"
    # an event asks for no work: delivered without asking
    a.write("federation/outbox/echo@beta", "classification: public\n\njust so you know\n")
    wait_for(lambda: mails(b, "agents/echo/mail"), what="the event")
    assert errno_of(b.write, f"federation/approvals/{held}", "maybe\n") == errno.EINVAL
    b.write(f"federation/approvals/{held}", "approve\n")
    wait_for(lambda: mails(a, "mail"), timeout=LONG_S, what="the approved request's result")
    [result] = mails(a, "mail")
    assert result.endswith("\n\nplease fix\n") and headers(result)["correlation-id"] == "ask-1"
    assert approvals(b) == [] and len(tasks(b, "echo")) == 1
    a.sh(f"rm mail/{headers(result)['id']}", check=True)
    # denied, with a reason: the sender is told; nothing runs
    request(a, "correlation-id: ask-2\n")
    wait_for(lambda: approvals(b), what="the second request held")
    b.write(f"federation/approvals/{approvals(b)[0]}", "deny not this week\n")
    wait_for(lambda: mails(a, "mail"), timeout=LONG_S, what="the denial")
    assert "rejected: denied by the operator of beta: not this week" in mails(a, "mail")[0]
    assert len(tasks(b, "echo")) == 1
    # a request held survives a kill -9 of its OS, and is then delivered once
    request(a, "correlation-id: ask-3\n", "after the crash")
    wait_for(lambda: approvals(b), what="the third request held")
    b.kill9()
    b.mount()
    [held] = approvals(b)
    b.write(f"federation/approvals/{held}", "approve\n")
    wait_for(lambda: len(tasks(b, "echo")) == 2, what="the third request run")
    assert errno_of(b.write, f"federation/approvals/{held}", "approve\n") == errno.ENOENT
    decisions = [(d["decision"], d["by"]) for d in log_rows(b, "fed_decided")]
    assert decisions == [("approve", "operator"), ("deny", "operator"), ("approve", "operator")]
    assert len(log_rows(b, "fed_held")) == 3


def test_policy_rules_decide_and_the_rest_asks(nats, members):
    a, b = members
    setup(nats, a, b, "policy")
    b.sh("echo 'rule alpha approve x-kind=bugfix x-severity=high,critical' > federation/ctl"
         " && echo 'rule alpha deny x-kind=spam' > federation/ctl", check=True)
    assert errno_of(b.write, "federation/ctl", "rule alpha perhaps x-kind=a\n") == errno.EINVAL
    assert errno_of(b.write, "federation/ctl", "rule alpha approve x-kind\n") == errno.EINVAL
    assert errno_of(b.write, "federation/ctl", "rule gamma approve x-kind=a\n") == errno.ENOENT
    peer = b.read("federation/peers/alpha/status")
    assert "rule=approve x-kind=bugfix x-severity=critical,high" in peer
    request(a, "x-kind: bugfix\nx-severity: critical\n", "auto")
    request(a, "x-kind: bugfix\nx-severity: low\n", "ask me")
    request(a, "x-kind: spam\n", "buy now")
    wait_for(lambda: len(tasks(b, "echo")) == 1 and approvals(b)
             and log_rows(b, "fed_rejected"), timeout=LONG_S, what="the three judged")
    assert b.read(f"agents/echo/tasks/{tasks(b, 'echo')[0]}/input") == "auto\n"
    assert "ask me" in b.read(f"federation/approvals/{approvals(b)[0]}")
    assert "no policy rule for alpha matches" in b.read(
        f"federation/approvals/{approvals(b)[0]}")
    [rej] = log_rows(b, "fed_rejected")
    assert rej["reason"] == "refused by policy rule 2 for alpha"
    [auto] = log_rows(b, "fed_decided")
    assert (auto["by"], auto["reason"]) == ("policy", "policy rule 1 for alpha")
    b.sh("echo 'rule alpha clear' > federation/ctl", check=True)
    assert "rule=" not in b.read("federation/peers/alpha/status")


def stream_state(url: str):
    async def go():
        nc = await natspy.connect(url)
        try:
            return await nc.jetstream().stream_info("FS9FED")
        finally:
            await nc.close()
    return asyncio.run(go())


def test_a_peer_over_its_rate_waits_and_nothing_is_lost(nats, members):
    a, b = members
    setup(nats, a, b, "delegated")
    b.sh("echo 'peer alpha rate=1' > federation/ctl", check=True)
    assert "rate=1" in b.read("federation/peers/alpha/status").split()
    assert errno_of(b.write, "federation/ctl", "peer alpha rate=0\n") == errno.EINVAL
    for i in range(12):
        a.write("federation/outbox/echo@beta", f"classification: public\n\nm{i}\n")
    wait_for(lambda: len(mails(b, "agents/echo/mail")) == 12, timeout=LONG_S,
             what="all twelve, at one a second past the burst")
    peer = dict(line.split("=", 1) for line in
                b.read("federation/peers/alpha/status").splitlines() if "=" in line)
    assert int(peer["throttled"]) > 0 and status(b)["duplicates"] == "0"
    assert sorted(m.split("\n\n", 1)[1] for m in mails(b, "agents/echo/mail")) == \
        sorted(f"m{i}\n" for i in range(12))
    # FS9FED: a work queue, bounded per pair of OSs, refusing (not dropping) past it
    info = stream_state(nats.url)
    cfg = info.config
    assert str(getattr(cfg.retention, "value", cfg.retention)) == "workqueue"
    assert str(getattr(cfg.discard, "value", cfg.discard)) == "new"
    assert cfg.discard_new_per_subject and cfg.max_msgs_per_subject == 10_000
    wait_for(lambda: stream_state(nats.url).state.messages == 0,
             what="acked messages gone from the stream")


def test_a_held_request_unanswered_expires(nats, members):
    """A held request waits for the peer's `wait`, or its own deadline if sooner; then
    it is decided `expired` and the sender told, as by a deny, both logged."""
    a, b = members
    setup(nats, a, b, "independent")
    assert errno_of(b.write, "federation/ctl", "peer alpha wait=x\n") == errno.EINVAL
    b.sh("echo 'peer alpha wait=2' > federation/ctl", check=True)
    request(a, "correlation-id: wait-1\n", "nobody answers")
    wait_for(lambda: approvals(b), what="the request held")
    [held] = approvals(b)
    assert "until=" in b.read(f"federation/approvals/{held}")
    wait_for(lambda: mails(a, "mail"), timeout=LONG_S, what="the expiry told to alpha")
    [note] = mails(a, "mail")
    assert "rejected: no answer from the operator of beta by " in note
    assert headers(note)["correlation-id"] == "wait-1"
    assert approvals(b) == [] and tasks(b, "echo") == []
    assert errno_of(b.write, f"federation/approvals/{held}", "approve\n") in \
        (errno.ENOENT, errno.EACCES)  # (gone: no such file, and none may be made there)
    a.sh(f"rm mail/{headers(note)['id']}", check=True)
    # its own deadline, sooner than the peer's wait, holds
    b.sh("echo 'peer alpha wait=3600' > federation/ctl", check=True)
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 4))
    request(a, f"correlation-id: wait-2\ndeadline: {soon}\n", "in a hurry")
    wait_for(lambda: mails(a, "mail"), timeout=LONG_S, what="the second expiry")
    assert headers(mails(a, "mail")[0])["correlation-id"] == "wait-2"
    decisions = [(d["decision"], d["by"]) for d in log_rows(b, "fed_decided")]
    assert decisions == [("expired", "deadline")] * 2 and tasks(b, "echo") == []
