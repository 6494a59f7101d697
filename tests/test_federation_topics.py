"""Topics across OSs (issue 13, event-driven coordination and choreography): a member
exports a local topic, peers subscribe, and each event published on it arrives on
their `topics/TOPIC@OS` and as mail to their durable subscribers; the publisher does not
know who listens. Real mounts and a real nats-server (tests/natsserver.py); what arrived
is read on the receiving side (its topics, mailboxes and log)."""
import errno
import json

import pytest

from conftest import Mount, errno_of, wait_for
from test_federation import (LONG_S, connected, join, log_rows, mails, members, mounted,
                             nats, publish_raw, status)

__all__ = ["members", "nats"]  # the fixtures, shared with test_federation.py


def topics(m: Mount) -> dict[str, dict[str, str]]:
    """federation/topics: `export T ...` and `subscription T@OS ...` lines, by their
    second word, each as its KEY=VALUE terms."""
    out = {}
    for line in m.read("federation/topics").splitlines():
        line, _, reason = line.partition(" reason=")  # (the last term: it has spaces)
        words = line.split(" ")
        if len(words) > 1:
            out[words[1]] = dict(w.split("=", 1) for w in words[2:] if "=" in w)
            out[words[1]]["reason"] = reason
    return out


def subscribed(m: Mount, name: str) -> None:
    wait_for(lambda: topics(m).get(name, {}).get("state") == "active", timeout=LONG_S,
             what=f"{name} active")


def bodies(m: Mount, folder: str) -> list[str]:
    return [t.split("\n\n", 1)[1] for t in mails(m, folder)]


def test_an_exported_topic_reaches_subscribed_peers(nats, members):
    a, b = members
    nats.start()
    join(a, nats.url, "alpha", "beta")
    join(b, nats.url, "beta", "alpha")
    connected(a, b)
    a.sh("echo 'export deployments' > federation/ctl", check=True)
    wait_for(lambda: "deployments" in json.loads(b.read("federation/peers/alpha/card") or "{}")
             .get("capabilities", {}).get("extensions", [{}])[0].get("params", {})
             .get("topics", []), what="the export in alpha's card on beta")
    # a durable subscriber on beta: every event as mail, also while it is not reading
    b.define("box", 'cmd = ["cat"]\nsubscribe = ["deployments@alpha"]\n')
    b.sh("echo 'spawn box unconfined=true' > ctl", check=True)
    b.sh("echo 'subscribe alpha deployments' > federation/ctl", check=True)
    subscribed(b, "deployments@alpha")
    assert topics(a)["deployments"]["subscribers"] == "beta"
    with open(b.path / "topics/deployments@alpha", "rb", buffering=0) as reader:
        a.write("topics/deployments", "deployment 7 completed\n")
        got = b""
        while b"\n" not in got:  # (a stream: blocks until the event is there)
            got += reader.read(4096)
    assert got == b"deployment 7 completed\n"
    [mail] = mails(b, "agents/box/mail")
    head, body = mail.split("\n\n", 1)
    h = dict(line.split(": ", 1) for line in head.splitlines())
    assert body == "deployment 7 completed\n"
    assert (h["type"], h["x-topic"], h["from"], h["classification"]) == \
        ("event", "deployments@alpha", "operator@alpha", "internal")
    [rec] = [e for e in log_rows(b, "published") if e.get("fed")]
    assert rec["topic"] == "deployments@alpha" and rec["sender"] == "operator@alpha"
    # the peer's topic is written by the federation alone
    assert errno_of(b.write, "topics/deployments@alpha", "forged\n") == errno.EPERM
    # unsubscribed: the publisher stops sending (its subscriber gone)
    b.sh("echo 'unsubscribe alpha deployments' > federation/ctl", check=True)
    wait_for(lambda: topics(a)["deployments"]["subscribers"] == "-", what="beta gone on alpha")
    a.write("topics/deployments", "deployment 8 completed\n")
    assert status(a)["outbox"] == "0" and len(mails(b, "agents/box/mail")) == 1
    # a topic beta never exported: refused, said on both sides
    a.sh("echo 'subscribe beta secrets' > federation/ctl", check=True)
    wait_for(lambda: topics(a)["secrets@beta"]["state"] == "refused", what="the refusal")
    assert "does not export secrets" in topics(a)["secrets@beta"]["reason"]
    assert [e["state"] for e in log_rows(b, "fed_subscriber")
            if e["topic"] == "secrets"] == ["refused"]
    # the ctl's refusals
    assert errno_of(a.write, "federation/ctl", "subscribe gamma x\n") == errno.ENOENT
    assert errno_of(a.write, "federation/ctl", "subscribe beta a/b\n") == errno.EINVAL
    assert errno_of(a.write, "federation/ctl", "export x@y\n") == errno.EINVAL
    assert errno_of(a.write, "federation/ctl", "unexport nothing\n") == errno.ENOENT
    assert errno_of(b.write, "federation/ctl", "unsubscribe alpha deployments\n") == errno.ENOENT


def test_governance_at_the_boundary(nats, members):
    """The ceiling holds per event (above it, never sent: said in the publisher's log);
    what a peer wrote is judged on our side: only topics we subscribed to at that peer,
    a label within our ceiling for it (none stated: confidential), a name for its
    publisher, a topic event's size; counts are capped."""
    a, b = members
    nats.start()
    join(a, nats.url, "alpha", "beta", ceiling="public")  # alpha sends beta public only
    join(b, nats.url, "beta", "alpha", ceiling="internal")
    connected(a, b)
    a.sh("echo 'export news' > federation/ctl", check=True)
    b.sh("echo 'subscribe alpha news' > federation/ctl", check=True)
    subscribed(b, "news@alpha")
    a.write("topics/news", "internal news\n")  # the operator's: internal, over the ceiling
    [withheld] = [e for e in log_rows(a, "delivery_refused") if e.get("topic") == "news"]
    assert withheld["reason"] == "beta accepts up to public from us, the event is internal"
    assert status(a)["outbox"] == "0" and "withheld=1" in a.read("federation/topics").split()
    a.define("crier", 'cmd = ["cat"]\nclearance = "public"\npledge = ["read", "publish"]\n'
                      'unconfined = true\n[unveil]\n"topics" = "rw"\n')
    a.sh("echo 'spawn crier' > ctl", check=True)
    a.write("agents/crier/view/topics/news", "public news\n")  # published as crier
    wait_for(lambda: [e for e in log_rows(b, "published") if e.get("fed")], what="the event")
    [rec] = [e for e in log_rows(b, "published") if e.get("fed")]
    assert (rec["sender"], rec["label"], rec["topic"]) == ("crier@alpha", "public", "news@alpha")

    def raw(mid: str, topic: str, extra: str, body: str = "x\n", sender="federation@alpha",
            origin="alpha") -> None:
        publish_raw(nats.url, f"fs9.fed.beta.{origin}", (
            f"id: {mid}\nfrom: {sender}\nto: federation@beta\ntype: event\n"
            f"x-fed-topic: {topic}\n{extra}\n{body}").encode())
    pub = "x-fed-publisher: p\n"
    raw("00000000000000b1", "other", "classification: public\n" + pub)
    raw("00000000000000b2", "news", "classification: confidential\n" + pub)
    raw("00000000000000b3", "news", pub)  # no label: confidential
    raw("00000000000000b4", "news", "classification: public\nx-fed-publisher: a/b\n")
    raw("00000000000000b5", "news", "classification: public\n" + pub, "y" * (70 << 10))
    raw("00000000000000b6", "news", "classification: public\nx-fed-sub: active\n")
    raw("00000000000000b7", "other", "classification: public\nx-fed-sub: active\n")
    raw("00000000000000b8", "news", "classification: public\n" + pub, origin="gamma")
    wait_for(lambda: len(log_rows(b, "fed_rejected")) == 7, what="beta judging them")
    reasons = {r["id"]: r["reason"] for r in log_rows(b, "fed_rejected")}
    assert "not subscribed to" in reasons["00000000000000b1"]
    assert "the event is confidential" in reasons["00000000000000b2"]
    assert "the event is confidential" in reasons["00000000000000b3"]
    assert "bad x-fed-publisher" in reasons["00000000000000b4"]
    assert "an event of 71680 bytes" in reasons["00000000000000b5"]
    assert "did not subscribe to" in reasons["00000000000000b7"]
    assert "gamma is not a declared peer" in reasons["00000000000000b8"]
    # b6 (a note on a topic we did subscribe to) only repeats its state: recorded
    assert [e["id"] for e in log_rows(b, "fed_subscription")][-1] == "00000000000000b6"
    assert len([e for e in log_rows(b, "published") if e.get("fed")]) == 1
    # bounded: 64 topics subscribed at one peer, 64 exported
    for i in range(63):
        b.write("federation/ctl", f"subscribe alpha t{i}\n")
    assert errno_of(b.write, "federation/ctl", "subscribe alpha t63\n") == errno.ENOSPC
    for i in range(63):
        a.write("federation/ctl", f"export e{i}\n")
    assert errno_of(a.write, "federation/ctl", "export e63\n") == errno.ENOSPC


def test_subscriber_killed_mid_stream_loses_nothing(nats, members):
    """Jepsen's four counts over N events, the subscriber killed -9 while they arrive:
    lost (acked by JetStream to the publisher, never recorded by the subscriber),
    duplicated (recorded twice), unexpected (recorded, never published), recovered
    (recorded after the remount). Each recorded event is also one mail to the durable
    subscriber."""
    a, b = members
    n = 60
    nats.start()
    join(a, nats.url, "alpha", "beta")
    join(b, nats.url, "beta", "alpha")
    connected(a, b)
    a.sh("echo 'export ticks' > federation/ctl", check=True)
    b.define("box", 'cmd = ["cat"]\nsubscribe = ["ticks@alpha"]\n')
    b.sh("echo 'spawn box unconfined=true' > ctl", check=True)
    b.sh("echo 'subscribe alpha ticks' > federation/ctl", check=True)
    subscribed(b, "ticks@alpha")

    def recorded() -> list[str]:
        return [e["fed"].split("/")[1] for e in log_rows(b, "published") if e.get("fed")]

    for i in range(n // 2):
        a.write("topics/ticks", f"t{i}\n")
    wait_for(lambda: len(recorded()) >= 5, what="beta receiving")
    b.kill9()
    before = set(recorded())
    for i in range(n // 2, n):
        a.write("topics/ticks", f"t{i}\n")
    b.mount()
    wait_for(lambda: status(a)["outbox"] == "0", timeout=LONG_S, what="alpha's outbox drained")
    queued = {e["id"] for e in log_rows(a, "fed_queued") if e.get("topic") == "ticks"
              and "note" not in e}
    acked = {e["id"] for e in log_rows(a, "fed_sent")} & queued
    wait_for(lambda: set(recorded()) >= acked, timeout=LONG_S, what="beta caught up")
    got = recorded()
    lost = acked - set(got)
    duplicated = len(got) - len(set(got))
    unexpected = set(got) - queued
    recovered = set(got) - before
    print(f"jepsen: lost={len(lost)} duplicated={duplicated} unexpected={len(unexpected)} "
          f"recovered={len(recovered)} of {n}")
    assert len(queued) == n and acked == queued
    assert (len(lost), duplicated, len(unexpected)) == (0, 0, 0)
    assert len(recovered) >= n // 2
    assert sorted(bodies(b, "agents/box/mail")) == sorted(f"t{i}\n" for i in range(n))


def test_publisher_and_nats_killed_lose_nothing(nats, members):
    """kill -9 of the publisher with events in its outbox, and of the nats-server: what
    a write(2) to the topic returned for is sent after the remount and the restart, and
    recorded once on the subscriber."""
    a, b = members
    nats.start()
    join(a, nats.url, "alpha", "beta")
    join(b, nats.url, "beta", "alpha")
    connected(a, b)
    a.sh("echo 'export ticks' > federation/ctl", check=True)
    b.sh("echo 'subscribe alpha ticks' > federation/ctl", check=True)
    subscribed(b, "ticks@alpha")
    nats.kill9()
    wait_for(lambda: status(a)["connection"] == "connecting", what="alpha sees NATS gone")
    for i in range(20):
        a.write("topics/ticks", f"t{i}\n")  # queued in alpha's outbox (its log)
    a.kill9()
    a.mount()
    assert status(a)["outbox"] == "20"
    for i in range(20, 30):
        a.write("topics/ticks", f"t{i}\n")
    nats.start()
    wait_for(lambda: topics(b)["ticks@alpha"]["received"] == "30", timeout=LONG_S,
             what="all thirty on beta")
    wait_for(lambda: status(a)["outbox"] == "0", what="alpha's outbox drained")
    got = [e["fed"] for e in log_rows(b, "published") if e.get("fed")]
    assert len(got) == len(set(got)) == 30


def choreographer(script: str) -> dict[str, str]:
    """An agent that reacts to each event mailed to it: a daemon reading mail/next, its
    body handed to `script` (sh, $T the topic, $B the body), then removed."""
    return {"react.sh": (
        'while :; do\n'
        '  m=$(cat "$FS9_AGENT_DIR/mail/next")\n'
        '  id=$(printf "%s\\n" "$m" | sed -n "s/^id: //p" | head -n 1)\n'
        '  T=$(printf "%s\\n" "$m" | sed -n "s/^x-topic: //p" | head -n 1)\n'
        '  B=$(printf "%s\\n" "$m" | sed "1,/^\\$/d")\n'
        f'  {script}\n'
        '  rm "$FS9_AGENT_DIR/mail/$id"\n'
        'done\n')}


@pytest.fixture
def three(tmp_path):
    """Coding, Knowledge and Support: three fs9 mounts, unjoined."""
    yield from mounted(tmp_path, ("coding", "knowledge", "support"))


def test_choreography_by_events_alone(nats, three):
    """No OS asks another for anything: Coding publishes "bug-fixed" on a topic it
    exports; Knowledge's docs agent, subscribed, updates the docs and publishes
    "docs-updated"; Support's cases agent, subscribed to both, notifies the customer
    once the docs are updated. Nothing crosses but topic events (and the subscriptions'
    notes): each OS only knows what it listens to."""
    coding, knowledge, support = three
    nats.start()
    members = {"coding": coding, "knowledge": knowledge, "support": support}
    for me, m in members.items():
        m.sh(f"echo 'join {nats.url} AS {me}' > federation/ctl", check=True)
        for peer in members:
            if peer != me:
                m.write("federation/ctl", f"peer {peer} ceiling=internal\n")
    connected(*members.values())
    react = 'cmd = ["sh", "react.sh"]\nmode = "daemon"\nunconfined = true\n' \
            'pledge = ["read", "publish"]\n[unveil]\n"topics" = "rw"\n'
    knowledge.define("docs", 'subscribe = ["bug-fixed@coding"]\n' + react, choreographer(
        'printf "known-issues.md: %s\\n" "$B" > "$FS9_AGENT_DIR/view/topics/docs-updated"'))
    support.define("cases", 'subscribe = ["bug-fixed@coding", "docs-updated@knowledge"]\n'
                   + react, choreographer(
                       '[ "$T" = docs-updated@knowledge ] && printf "customer told: %s\\n" '
                       '"$B" > "$FS9_AGENT_DIR/view/topics/customers"'))
    coding.sh("echo 'export bug-fixed' > federation/ctl", check=True)
    knowledge.sh("echo 'export docs-updated' > federation/ctl", check=True)
    knowledge.sh("echo 'spawn docs' > ctl && "
                 "echo 'subscribe coding bug-fixed' > federation/ctl", check=True)
    support.sh("echo 'spawn cases' > ctl && touch topics/customers && "
               "echo 'subscribe coding bug-fixed' > federation/ctl && "
               "echo 'subscribe knowledge docs-updated' > federation/ctl", check=True)
    subscribed(knowledge, "bug-fixed@coding")
    subscribed(support, "bug-fixed@coding")
    subscribed(support, "docs-updated@knowledge")
    # Coding publishes; it names no one
    coding.write("topics/bug-fixed", "CSV export corrupts files (case 4521)\n")
    wait_for(lambda: [e for e in log_rows(support, "published") if e["topic"] == "customers"],
             timeout=LONG_S, what="Support telling the customer")
    told = [e for e in log_rows(support, "published") if e["topic"] == "customers"]
    assert len(told) == 1 and told[0]["sender"] == "cases"
    heard = [(e["topic"], e["sender"]) for e in log_rows(support, "published") if e.get("fed")]
    assert sorted(heard) == [("bug-fixed@coding", "operator@coding"),
                             ("docs-updated@knowledge", "docs@knowledge")]
    assert [(e["topic"], e["sender"]) for e in log_rows(knowledge, "published")
            if e.get("fed")] == [("bug-fixed@coding", "operator@coding")]
    # by events alone: every cross-OS message was a topic's (an event or a note),
    # federation to federation; no mail, no work request
    for m in members.values():
        crossed = log_rows(m, "fed_queued")
        assert crossed and all(q.get("topic") and q["type"] == "event"
                               and q["to"].startswith("federation@") for q in crossed)
        assert not [t for t in log_rows(m, "task_queued") if not t.get("daemon")]
    # Coding never learnt of Support's reaction, nor of Knowledge's
    assert {q["os"] for q in log_rows(coding, "fed_queued") if "note" not in q} == \
        {"knowledge", "support"}
    assert not [e for e in log_rows(coding, "published") if e.get("fed")]
