"""A hostile agent and the bus (issue 20, items 3 and 5): classification is information
flow, checked at every delivery the kernel makes; a message says only what its sender
holds (correlation ids, reply-to, the kernel's own headers); numbers are bounded.

Requests come through the agents' views (`agents/NAME/view/...`), exactly the
directory a confined agent's sandbox binds over the mount: the view is the identity.
Each test asserts on what the other side received (mailboxes, topics, the log)."""
import errno
import json
import os

import pytest

from conftest import errno_of

UNVEIL = '[unveil]\n"agents" = "rw"\n"topics" = "rw"\n'
PUB = 'cmd = ["cat"]\nclearance = "public"\npledge = ["read", "send", "publish"]\n'
CONF = 'cmd = ["cat"]\nclearance = "confidential"\npledge = ["read", "send", "publish"]\n'


@pytest.fixture
def two(mount):
    """pub (cleared public) and conf (cleared confidential), both unconfined `cat`s:
    what is checked here is the bus, reached through their views."""
    mount.define("pub", PUB + "unconfined = true\n" + UNVEIL)
    mount.define("conf", CONF + "unconfined = true\n" + UNVEIL)
    mount.sh("echo 'spawn pub' > ctl; echo 'spawn conf' > ctl", check=True)
    return mount


def send_as(mount, who: str, to: str, text: str) -> int | None:
    """Write TEXT to agents/TO/mail/new through WHO's view; the errno of the refusal
    (at write(2) or at close(2), where a message is checked whole), None if sent."""
    def send(path):
        with open(path, "w") as f:
            f.write(text)
    return errno_of(send, mount.path / "agents" / who / "view/agents" / to / "mail/new")


def mail_of(mount, agent: str) -> list[str]:
    folder = mount.path / "agents" / agent / "mail"
    return [mount.read(f"agents/{agent}/mail/{n}") for n in sorted(os.listdir(folder))
            if n not in ("new", "next", "dead")]


def kinds(mount, kind: str) -> list[dict]:
    return [e for e in map(json.loads, mount.read("log/audit").splitlines())
            if e["kind"] == kind]


def test_a_message_is_labelled_at_least_its_senders_clearance(two):
    assert send_as(two, "conf", "conf", "hello\n") is None  # default: its clearance
    assert "classification: confidential" in mail_of(two, "conf")[0]
    assert send_as(two, "conf", "pub", "classification: public\n\nthe secret\n") == errno.EPERM
    assert mail_of(two, "pub") == []  # nothing reached the public agent
    assert any("declassify" in e["reason"] for e in kinds(two, "refused"))


def test_declassify_is_a_pledge_and_is_logged(mount):
    mount.define("conf", CONF.replace('"publish"]', '"publish", "declassify"]')
                 + "unconfined = true\n" + UNVEIL)
    mount.define("pub", PUB + "unconfined = true\n" + UNVEIL)
    mount.sh("echo 'spawn pub' > ctl; echo 'spawn conf' > ctl", check=True)
    assert send_as(mount, "conf", "pub", "classification: public\n\nreleased\n") is None
    assert "released" in mail_of(mount, "pub")[0]
    [event] = kinds(mount, "declassified")
    assert (event["agent"], event["from"], event["to_label"]) == ("conf", "confidential",
                                                                   "public")


def test_a_result_carries_the_workers_clearance_and_is_withheld_below_it(two):
    """A public agent asks the confidential one for work: the answer (the secret) does
    not come back to it, nor to a public reply-to."""
    assert send_as(two, "pub", "conf", "type: work_request\n\nthe secret plan\n") is None
    two.wait_for(lambda: kinds(two, "delivery_refused"), 20, "a refused delivery")
    assert mail_of(two, "pub") == []
    [refusal] = kinds(two, "delivery_refused")
    assert refusal["agent"] == "pub" and "confidential" in refusal["reason"]


def test_topics_have_labels(two):
    two.sh("touch topics/plans", check=True)
    fd = os.open(two.path / "agents/pub/view/topics/plans", os.O_RDONLY | os.O_NONBLOCK)
    try:  # pub subscribed while the topic was public...
        assert two.sh("echo 'the secret' > agents/conf/view/topics/plans").returncode == 0
        two.wait_for(lambda: any(e["kind"] == "published" for e in kinds(two, "published")),
                     10, "the publish")
        data = two.wait_for(lambda: os.read(fd, 65536), 10, "the note")
    finally:
        os.close(fd)
    assert b"the secret" not in data and b"above your clearance withheld" in data
    # ...and now that a confidential agent published, it cannot open it at all
    assert errno_of(open, two.path / "agents/pub/view/topics/plans") == errno.EACCES
    assert errno_of(lambda p: open(p).close(), two.path / "agents/conf/view/topics/plans") \
        is None  # the confidential agent may


def test_a_durable_subscriber_below_the_label_gets_nothing(mount):
    mount.define("pub", PUB + 'unconfined = true\nsubscribe = ["plans"]\n' + UNVEIL)
    mount.define("conf", CONF + "unconfined = true\n" + UNVEIL)
    mount.sh("echo 'spawn pub' > ctl; echo 'spawn conf' > ctl; touch topics/plans", check=True)
    assert mount.sh("echo 'the secret' > agents/conf/view/topics/plans").returncode == 0
    mount.wait_for(lambda: kinds(mount, "delivery_refused"), 10, "a refused delivery")
    assert mail_of(mount, "pub") == []


@pytest.mark.parametrize("header", ["x-task: 1", "x-status: done", "x-exit: 0", "x-topic: t"])
def test_the_kernels_own_headers_are_reserved(two, header):
    assert send_as(two, "pub", "pub", f"{header}\n\nforged\n") == errno.EPERM
    assert mail_of(two, "pub") == []


def test_a_correlation_id_is_one_the_sender_holds(two):
    two.sh("echo 'run job' > agents/conf/ctl", check=True)  # conf's task: a corr of its own
    task = two.wait_for(lambda: two.status("conf")["latest"], 10, "conf's task")
    task_corr = dict(line.split("=", 1) for line in
                     two.read(f"agents/conf/tasks/{task}/status").splitlines())["corr"]
    assert send_as(two, "pub", "conf", f"correlation-id: {task_corr}\n\nI am part of it\n") \
        == errno.EPERM
    assert not any("I am part of it" in m for m in mail_of(two, "conf"))
    assert not any(e.get("sender") == "pub" for e in
                   map(json.loads, two.read(f"log/trace/{task_corr}").splitlines()))
    assert send_as(two, "conf", "conf", f"correlation-id: {task_corr}\n\nmine\n") is None


def test_reply_to_is_the_sender_or_a_mailbox_it_may_write(two):
    two.define("closed", 'cmd = ["cat"]\nunconfined = true\npledge = ["send"]\n'
               '[unveil]\n"agents/closed" = "rw"\n')
    two.sh("echo 'spawn closed' > ctl", check=True)
    for to in ("operator", "nobody", "pub"):
        assert send_as(two, "closed", "closed", f"reply-to: {to}\n\nx\n") == errno.EPERM, to
    assert mail_of(two, "closed") == []
    assert send_as(two, "pub", "pub", "reply-to: conf\n\nfine: pub may write conf's mail\n") \
        is None


@pytest.mark.parametrize("deadline", ["+inf", "+nan", "+1e300", "+-1e300", "9999-01-01"])
def test_numbers_in_headers_are_bounded(two, deadline):
    assert send_as(two, "pub", "pub", f"deadline: {deadline}\n\nx\n") == errno.EINVAL
    assert two.bugs() == [] and mail_of(two, "pub") == []


def test_work_written_to_another_agents_in_keeps_the_label_rules(two):
    """`in` through a view hands the agent work at the writer's clearance, as mail
    would: conf's work does not reach pub, cleared lower (EACCES), and nothing of it
    runs; pub's reaches conf."""
    done = two.status("pub")["done"]
    assert errno_of(two.write, "agents/conf/view/agents/pub/in", "the plans\n") == errno.EACCES
    assert two.status("pub")["done"] == done and two.status("pub")["queued"] == "0"
    # the refusal is the writer's: said to conf, not written down into pub's err
    assert "work from conf is confidential" in two.read("agents/conf/err")
    assert "work from conf" not in two.read("agents/pub/err")
    two.write("agents/pub/view/agents/conf/in", "the weather\n")
    two.wait_for(lambda: "the weather" in two.read("agents/conf/out"), what="conf's task")


def test_mail_above_the_approval_label_goes_nowhere_else(mount):
    """approval.mail_above: mail over the label waits for the operator's yes; the same
    words written to another agent's `in`, or published on a topic, are refused (EPERM)
    rather than sent past the question."""
    mount.define("teller", 'cmd = ["cat"]\nunconfined = true\nclearance = "internal"\n'
                 'pledge = ["read", "send", "publish"]\n[approval]\nmail_above = "public"\n'
                 '[unveil]\n"agents/keeper" = "rw"\n"topics/t" = "rw"\n')
    mount.define("keeper", 'cmd = ["cat"]\nunconfined = true\nclearance = "internal"\n'
                 'subscribe = ["t"]\n')
    mount.sh("touch topics/t && echo 'spawn keeper' > ctl && echo 'spawn teller' > ctl",
             check=True)
    v = mount.path / "agents/teller/view"
    assert errno_of(mount.write, "agents/teller/view/agents/keeper/in", "x\n") == errno.EPERM
    assert errno_of(lambda: (v / "topics/t").write_bytes(b"y\n")) == errno.EPERM
    assert mount.status("keeper")["queued"] == "0" and mail_of(mount, "keeper") == []
    assert not os.listdir(mount.path / "approvals")


def test_mail_in_batches_meets_every_check_of_mail_new(two):
    """mail/batch (many messages a write) is one more way to send: each line is checked
    as a message written to mail/new is (labels, the kernel's headers, correlation ids,
    reply-to, numbers), a refused write sends none of its lines, and a reader cleared
    lower reads no batch of a mailbox above it."""
    def batch(who: str, to: str, data: str) -> int | None:
        return errno_of(two.write, f"agents/{who}/view/agents/{to}/mail/batch", data)
    assert batch("conf", "pub", "classification: public\n\nsecret 1\nsecret 2\n") == errno.EPERM
    assert batch("conf", "pub", "secret 3\n") == errno.EACCES  # conf's own label: above pub
    assert batch("pub", "conf", "x-task: 1\n\nforged\n") == errno.EPERM
    assert batch("pub", "conf", "reply-to: operator\n\nreply to him\n") == errno.EPERM
    # (nor through mail/new: "agents" = "rw" lets it write every agent's mail, never the
    # operator's, whose mailbox gets only the results of the operator's own requests)
    assert send_as(two, "pub", "conf", "reply-to: operator\n\nreply to him\n") == errno.EPERM
    assert batch("pub", "conf", "correlation-id: 0123456789abcdef\n\nnot mine\n") == errno.EPERM
    assert batch("pub", "conf", "deadline: +inf\n\nforever\n") == errno.EINVAL
    got = mail_of(two, "pub") + mail_of(two, "conf")
    assert not any(word in m for m in got for word in
                   ("secret", "forged", "reply to him", "not mine", "forever")), got
    two.write("agents/conf/mail/new", "for conf only\n")
    assert errno_of(two.read, "agents/pub/view/agents/conf/mail/batch") == errno.EACCES
