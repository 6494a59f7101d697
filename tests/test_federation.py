"""Federation (issue 13, first slice): two fs9 mounts, each its own server process and
log, joined through one real nats-server (tests/natsserver.py). Driven through
federation/ with shell tools; what arrived is read on the other side (mailboxes, the
log), never inferred from the sender."""
import errno
import json
import os
import sqlite3

import pytest

from conftest import Mount, errno_of, fuse_unavailable, wait_for
from natsserver import NatsServer, binary

LONG_S = 90  # catching up after a restart includes JetStream's redelivery wait


def headers(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.split("\n\n", 1)[0].splitlines())


def status(m: Mount, rel: str = "federation/status") -> dict[str, str]:
    return dict(line.split("=", 1) for line in m.read(rel).splitlines())


def mails(m: Mount, folder: str, last: int = 0) -> list[str]:
    """The messages pending in folder (a mail/ directory), their text, oldest first (the
    last `last` only, if set: a full mailbox is 10,000 reads)."""
    names = [n for n in sorted((m.path / folder).iterdir()) if n.name[0].isdigit()]
    return [n.read_text() for n in names[-last if last else 0:]]


def log_rows(m: Mount, kind: str) -> list[dict]:
    db = sqlite3.connect(f"file:{m.state / 'log.sqlite'}?mode=ro", uri=True)
    try:
        return [json.loads(r[0]) for r in
                db.execute("SELECT data FROM events WHERE kind=? ORDER BY seq", (kind,))]
    finally:
        db.close()


@pytest.fixture
def nats(tmp_path):
    if binary() is None:
        pytest.skip("no nats-server: `make deps` installs the pinned one "
                    "(scripts/nats-server.sh)")
    server = NatsServer(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


def mounted(tmp_path, names):
    """fs9 mounts named `names`, unjoined, for a fixture to yield from; each unmounted
    after the test and checked for handler bugs."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"cannot mount FUSE here: {reason}")
    made = []
    try:
        for name in names:
            (tmp_path / name).mkdir()
            made.append(Mount(tmp_path / name).mount())
        yield made
    finally:
        for m in made:
            m.umount()
    for m in made:
        assert not m.bugs(), "a handler hit an unexpected exception:\n" + "\n".join(m.bugs())


@pytest.fixture
def members(tmp_path):
    """Two fs9 mounts, unjoined: alpha and beta."""
    yield from mounted(tmp_path, ("alpha", "beta"))


def join(m: Mount, url: str, me: str, peer: str, ceiling: str = "internal") -> None:
    m.sh(f"echo 'join {url} AS {me}' > federation/ctl && "
         f"echo 'peer {peer} ceiling={ceiling} auth=delegated' > federation/ctl", check=True)


def connected(*ms: Mount) -> None:
    wait_for(lambda: all(status(m)["connection"] == "connected" for m in ms),
             what="members connected to NATS")


def federated(nats, a: Mount, b: Mount) -> None:
    """NATS up, `echo` on beta, alpha and beta joined as each other's peers."""
    nats.start()
    b.sh("echo 'spawn echo' > ctl", check=True)
    join(a, nats.url, "alpha", "beta")
    join(b, nats.url, "beta", "alpha")
    connected(a, b)


def test_join_cards_mail_and_reply(nats, members):
    a, b = members
    nats.start()
    a.sh("echo 'spawn echo' > ctl", check=True)
    b.sh("echo 'spawn upper' > ctl", check=True)
    join(a, nats.url, "alpha", "beta")
    join(b, nats.url, "beta", "alpha")
    connected(a, b)
    # each reads the other's card: A2A's field names, capabilities from `provides`
    wait_for(lambda: a.read("federation/peers/beta/card").strip(), what="beta's card")
    card = json.loads(a.read("federation/peers/beta/card"))
    assert card["name"] == "beta" and card["version"] and "capabilities" in card
    assert card["skills"] == [{"id": "upper-casing", "name": "upper-casing", "tags": ["upper"],
                               "description": "upper-casing: provided by upper"}]
    own, = card["capabilities"]["extensions"]  # fs9's own fields, as an A2A extension
    assert own["uri"] == "urn:fs9:federation"
    assert own["params"]["ceiling"] == {"alpha": "internal"}
    assert own["params"]["auth"] == {"alpha": "delegated"}
    # the shape of an agent's card (registry/cards/NAME): the A2A SDK's own AgentCard,
    # which refuses unknown fields, takes both
    a2a = pytest.importorskip("a2a.types.a2a_pb2", reason="a2a-sdk (the test extra) not installed")
    from google.protobuf import json_format
    parsed = json_format.ParseDict(card, a2a.AgentCard())
    assert parsed.skills[0].id == "upper-casing" and parsed.default_input_modes == ["text/plain"]
    agent_card = json.loads(b.read("registry/cards/upper"))
    assert set(agent_card) == set(card)
    assert json_format.ParseDict(agent_card, a2a.AgentCard()).skills[0].id == "upper-casing"
    assert status(a, "federation/peers/beta/status")["ceiling"] == "internal"
    wait_for(lambda: json.loads(b.read("federation/peers/alpha/card") or "{}").get("name")
             == "alpha", what="alpha's card")
    # beta's providers are listed on alpha after its own, as AGENT@OS
    assert a.read("registry/by-capability/upper-casing") == "upper@beta\n"
    wait_for(lambda: "echo@alpha" in b.read("registry/by-capability/echo"),
             what="alpha's echo listed on beta")

    # request/response: alpha's work_request to upper@beta is a task there, and its
    # result comes back to alpha's operator on the same correlation id
    a.sh("printf 'type: work_request\\nclassification: public\\ncorrelation-id: case-4521\\n\\n"
         "fix the CSV export\\n' > federation/outbox/upper@beta", check=True)
    wait_for(lambda: mails(a, "mail"), what="the result on alpha")
    [result] = mails(a, "mail")
    h = headers(result)
    assert result.endswith("\n\nFIX THE CSV EXPORT\n"), result
    assert h["from"] == "upper@beta" and h["type"] == "result" and h["x-status"] == "done"
    assert h["correlation-id"] == "case-4521" and h["classification"] == "internal"
    task = b.read(f"agents/upper/tasks/{h['x-task']}/status")
    assert "reply_to=operator@alpha" in task.split() and "corr=case-4521" in task.split()
    a.sh(f"rm mail/{h['id']}", check=True)
    # mail: an event to upper@beta waits in its mailbox; beta's operator answers
    a.sh("printf 'classification: public\\n\\nthe export is fixed?\\n'"
         " > federation/outbox/upper@beta", check=True)
    wait_for(lambda: mails(b, "agents/upper/mail"), what="the message on beta")
    [got] = mails(b, "agents/upper/mail")
    h = headers(got)
    assert got.endswith("\n\nthe export is fixed?\n")
    assert h["from"] == "operator@alpha" and h["to"] == "upper" and h["type"] == "event"
    assert h["classification"] == "public"
    b.sh(f"printf 'type: result\\nclassification: public\\ncorrelation-id: "
         f"{h['correlation-id']}\\n\\nfixed\\n' > federation/outbox/operator@alpha", check=True)
    wait_for(lambda: mails(a, "mail"), what="the reply on alpha")
    [reply] = mails(a, "mail")
    assert headers(reply)["from"] == "operator@beta" and reply.endswith("\n\nfixed\n")
    assert headers(reply)["correlation-id"] == h["correlation-id"]
    wait_for(lambda: status(a)["outbox"] == "0" and status(b)["outbox"] == "0",
             what="both outboxes drained")
    assert (status(a)["sent"], status(a)["received"]) == ("2", "2")
    # (beta also sent alpha its part of case-4521's trace, with the result: not mail)
    assert (status(b)["sent"], status(b)["received"]) == ("3", "2")
    # an agent sends only with the federate pledge; one that has it, from its own process
    assert errno_of(a.write, "agents/echo/outbox/upper@beta", "x\n") == errno.EACCES
    a.define("relay", 'driver = "exec"\ncmd = ["sh", "-c", "cat > \\"$FS9_OUTBOX/upper@beta\\""]\n'
             'pledge = ["send", "federate"]\nclearance = "public"\n')
    a.sh("echo 'spawn relay' > ctl && echo 'run from an agent' > agents/relay/ctl", check=True)
    wait_for(lambda: len(mails(b, "agents/upper/mail")) == 2, what="the agent's message")
    assert headers(mails(b, "agents/upper/mail")[1])["from"] == "relay@alpha"


def test_boundary_refusals(nats, members):
    a, b = members
    nats.start()
    b.sh("echo 'spawn echo' > ctl", check=True)
    join(a, nats.url, "alpha", "beta", ceiling="internal")
    join(b, nats.url, "beta", "gamma")  # beta has not declared alpha
    connected(a, b)
    # above the ceiling alpha declared for beta: refused at write(2), nothing queued
    assert errno_of(a.write, "federation/outbox/echo@beta",
                    "classification: confidential\n\nsecret\n") == errno.EACCES
    assert status(a)["outbox"] == "0"
    refused = [e for e in log_rows(a, "refused") if "accepts up to internal" in e["reason"]]
    assert refused, "the refusal's reason is in alpha's log"
    # to an OS that is not a peer, or a bad address: names nobody has, at open
    for name in ("echo@delta", "bad name@beta", "echo", "echo@"):
        assert errno_of(a.write, f"federation/outbox/{name}", "x\n") == errno.ENOENT, name
    # within alpha's terms, but beta never declared alpha: rejected there, logged
    a.sh("printf 'classification: public\\n\\nhello\\n' > federation/outbox/echo@beta",
         check=True)
    wait_for(lambda: log_rows(b, "fed_rejected"), what="beta's rejection")
    [rej] = log_rows(b, "fed_rejected")
    assert rej["origin"] == "alpha" and "not a declared peer" in rej["reason"]
    assert mails(b, "agents/echo/mail") == []
    # declared now, with a ceiling of public: an internal message is rejected, and the
    # sender's operator gets a `rejected` result
    b.sh("echo 'peer alpha ceiling=public auth=delegated' > federation/ctl", check=True)
    a.sh("printf 'classification: internal\\n\\nhello\\n' > federation/outbox/echo@beta",
         check=True)
    wait_for(lambda: len(log_rows(b, "fed_rejected")) == 2, what="the second rejection")
    assert "accepts up to public" in log_rows(b, "fed_rejected")[1]["reason"]
    wait_for(lambda: mails(a, "mail"), what="the rejected result on alpha")
    note = mails(a, "mail")[0]
    assert headers(note)["from"] == "federation@beta" and "rejected" in note
    assert mails(b, "agents/echo/mail") == []
    # a task's result is labelled its agent's clearance (internal): above what beta may
    # send alpha (public), it is withheld, said in beta's log, never sent lower
    a.sh("printf 'type: work_request\\nclassification: public\\n\\nq\\n'"
         " > federation/outbox/echo@beta", check=True)
    wait_for(lambda: [e for e in log_rows(b, "delivery_refused") if e.get("type") == "result"],
             what="the result withheld on beta")
    [withheld] = [e for e in log_rows(b, "delivery_refused") if e.get("type") == "result"]
    assert "alpha accepts up to public from us, the message is internal" == withheld["reason"]
    assert len(log_rows(b, "fed_queued")) == 1  # beta queued only its one rejection note
    # the ctl refuses what it cannot parse, with the reason
    assert errno_of(a.write, "federation/ctl", "peer beta ceiling=secret\n") == errno.EINVAL
    assert errno_of(a.write, "federation/ctl", "join nats://x AS alpha too\n") == errno.EINVAL


def publish_raw(url: str, subject: str, data: bytes) -> None:
    """What a hostile member could publish: straight to JetStream, past its fs9."""
    import asyncio
    import nats

    async def go():
        nc = await nats.connect(url)
        try:
            await nc.jetstream().publish(subject, data, timeout=10)
        finally:
            await nc.close()
    asyncio.run(go())


def test_what_a_remote_wrote_is_not_trusted(nats, members):
    a, b = members
    nats.start()
    b.sh("echo 'spawn echo' > ctl", check=True)
    join(a, nats.url, "alpha", "beta")
    join(b, nats.url, "beta", "alpha", ceiling="internal")
    connected(a, b)
    forged = [  # (id, from, extra headers): each as alpha's subject says it came
        ("00000000000000a1", "echo@gamma", "classification: public\n"),  # another OS's agent
        ("00000000000000a2", "operator", "classification: public\n"),  # no OS
        ("00000000000000a3", "operator@alpha", ""),  # no label: confidential, over the ceiling
        ("00000000000000a4", "operator@alpha", "classification: public\nx-status: done\n"),
    ]
    for mid, sender, extra in forged:
        publish_raw(nats.url, "fs9.fed.beta.alpha",
                    f"id: {mid}\nfrom: {sender}\nto: echo@beta\n{extra}\nbody\n".encode())
    # kept: one with only a reply-to the remote may not route by (dropped), said twice
    for _ in range(2):
        publish_raw(nats.url, "fs9.fed.beta.alpha", b"id: 00000000000000a5\nfrom: operator@alpha"
                    b"\nto: echo@beta\nclassification: public\nreply-to: echo\n\nok\n")
    wait_for(lambda: len(log_rows(b, "fed_rejected")) == 4 and mails(b, "agents/echo/mail")
             and status(b)["duplicates"] == "1", what="beta judging all six")
    reasons = {r["id"]: r["reason"] for r in log_rows(b, "fed_rejected")}
    assert "not an agent of alpha" in reasons["00000000000000a1"]
    assert "not an agent of alpha" in reasons["00000000000000a2"]
    assert "the message is confidential" in reasons["00000000000000a3"]
    assert "stamped by the kernel" in reasons["00000000000000a4"]
    [kept] = mails(b, "agents/echo/mail")
    assert "reply-to" not in headers(kept) and headers(kept)["from"] == "operator@alpha"
    # a rejection of alpha's own rejection note is not answered again (no ping-pong)
    publish_raw(nats.url, "fs9.fed.beta.alpha", b"id: 00000000000000a6\nfrom: federation@alpha"
                b"\nto: nobody@beta\ntype: result\nclassification: public\n\nrejected\n")
    wait_for(lambda: len(log_rows(b, "fed_rejected")) == 5, what="the note rejected")
    assert "no such agent: nobody@beta" in log_rows(b, "fed_rejected")[4]["reason"]
    assert [q for q in log_rows(b, "fed_queued") if q["to"].startswith("federation@")] == []
    # a card's skills are names or nothing: only `fine@beta` providing `ok` is listed
    publish_raw(nats.url, "fs9.card.beta", json.dumps({"skills": [
        {"id": "x/../y", "tags": ["a"]}, {"id": "ok", "tags": ["evil\n", "fine", 7]}, 5,
        {"id": "no-tags"}]}).encode())
    wait_for(lambda: os.path.exists(a.path / "registry/by-capability/ok"),
             what="the card's skill listed")
    assert a.read("registry/by-capability/ok") == "fine@beta\n"
    assert os.listdir(a.path / "registry/by-capability") == ["ok"]
    # a card past 64 KiB (as a hostile peer may publish one) is not shown
    wait_for(lambda: a.read("federation/peers/beta/card"), what="beta's card on alpha")
    publish_raw(nats.url, "fs9.card.beta", b"{" + b" " * (100 << 10) + b"}")
    wait_for(lambda: "card is over" in status(a)["last_error"], what="the big card refused")
    assert a.read("federation/peers/beta/card") == ""


def test_queued_before_nats_then_caught_up(nats, members):
    a, b = members
    join(a, nats.url, "alpha", "beta")  # NATS is not running yet
    join(b, nats.url, "beta", "alpha")
    b.sh("echo 'spawn echo' > ctl", check=True)
    for i in range(5):
        a.write("federation/outbox/echo@beta", f"classification: public\n\nmessage {i}\n")
    s = status(a)
    assert s["connection"] == "connecting" and s["outbox"] == "5"
    wait_for(lambda: status(a)["last_error"] != "-", what="the error said")
    a.kill9()  # the outbox is the log's: a sender killed keeps what it queued
    a.mount()
    assert status(a)["outbox"] == "5" and status(a, "federation/peers/beta/status")["queued"] == "5"
    # one whose deadline passes while it waits is given up: a dead letter, said in the log
    a.write("federation/outbox/echo@beta", "classification: public\ndeadline: +1\n\nlate\n")
    wait_for(lambda: status(a)["dead"] == "1", what="the dead letter")
    [dead] = os.listdir(a.path / "federation/dead")
    assert a.read(f"federation/dead/{dead}").endswith("\n\nlate\n")
    assert "deadline passed" in log_rows(a, "fed_dead")[0]["reason"]
    assert status(a)["outbox"] == "5"
    nats.start()
    wait_for(lambda: len(mails(b, "agents/echo/mail")) == 5, timeout=LONG_S,
             what="the queued messages delivered")
    bodies = [m.split("\n\n", 1)[1] for m in mails(b, "agents/echo/mail")]
    assert bodies == [f"message {i}\n" for i in range(5)]
    wait_for(lambda: status(a)["outbox"] == "0", what="alpha's outbox drained")


def test_receiver_killed_mid_stream_loses_nothing_and_repeats_nothing(nats, members):
    """Jepsen's four counts over N messages, with beta killed -9 while they arrive:
    lost (acked by JetStream to alpha, never recorded by beta), duplicated (recorded
    twice), unexpected (recorded, never sent), recovered (arrived after the remount)."""
    a, b = members
    n = 60
    federated(nats, a, b)

    def send(numbers):
        for i in numbers:
            a.write("federation/outbox/echo@beta", f"classification: public\n\nm{i}\n")
    send(range(n // 2))
    wait_for(lambda: int(status(b)["received"]) >= 5, what="beta receiving")
    b.kill9()
    before = {e["fed"] for e in log_rows(b, "mail_sent") if "fed" in e}
    send(range(n // 2, n))  # while beta is down
    b.mount()
    wait_for(lambda: status(a)["outbox"] == "0", timeout=LONG_S, what="alpha's outbox drained")
    sent = {e["id"] for e in log_rows(a, "fed_queued")}
    acked = {e["id"] for e in log_rows(a, "fed_sent")}
    wait_for(lambda: {e["fed"].split("/")[1] for e in log_rows(b, "mail_sent")
                      if "fed" in e} >= acked, timeout=LONG_S, what="beta caught up")
    recorded = [e["fed"].split("/")[1] for e in log_rows(b, "mail_sent") if "fed" in e]
    lost = acked - set(recorded)
    duplicated = len(recorded) - len(set(recorded))
    unexpected = set(recorded) - sent
    recovered = set(recorded) - {f.split("/")[1] for f in before}
    print(f"jepsen: lost={len(lost)} duplicated={duplicated} unexpected={len(unexpected)} "
          f"recovered={len(recovered)} of {n}")
    assert acked == sent and len(sent) == n
    assert (len(lost), duplicated, len(unexpected)) == (0, 0, 0)
    assert len(recovered) >= n // 2
    assert len(mails(b, "agents/echo/mail")) == n


def test_pause_resume_and_leave(nats, members):
    a, b = members
    federated(nats, a, b)
    a.sh("echo 'pause beta' > federation/ctl", check=True)
    a.write("federation/outbox/echo@beta", "classification: public\n\nheld\n")
    peer = status(a, "federation/peers/beta/status")
    assert peer["paused"] == "yes" and peer["queued"] == "1"
    a.sh("echo 'resume beta' > federation/ctl", check=True)
    wait_for(lambda: mails(b, "agents/echo/mail"), what="the held message delivered")
    assert status(a, "federation/peers/beta/status")["paused"] == "no"
    assert errno_of(a.write, "federation/ctl", "pause gamma\n") == errno.ENOENT
    a.sh("echo leave > federation/ctl", check=True)
    wait_for(lambda: status(a)["connection"] == "off", what="alpha off the federation")
    assert errno_of(a.write, "federation/outbox/echo@beta", "x\n") == errno.ENOTCONN
    assert errno_of(a.write, "ctl", "spawn federation def=echo\n") == errno.EINVAL
    # an agent's view does not show federation/ unless unveiled
    assert errno_of(a.read, "agents/echo/view/federation/status") == errno.ENOENT


def test_nats_killed_and_restarted_loses_nothing(nats, members):
    """kill -9 of the NATS server (its store fsynced at each write): the members queue
    meanwhile and catch up once it is back; every message arrives once."""
    a, b = members
    federated(nats, a, b)
    for i in range(10):
        a.write("federation/outbox/echo@beta", f"classification: public\n\nbefore {i}\n")
    nats.kill9()
    for i in range(10):
        a.write("federation/outbox/echo@beta", f"classification: public\n\nduring {i}\n")
    wait_for(lambda: status(a)["connection"] == "connecting", what="alpha sees NATS gone")
    nats.start()
    wait_for(lambda: len(mails(b, "agents/echo/mail")) == 20, timeout=LONG_S,
             what="all twenty on beta")
    bodies = sorted(m.split("\n\n", 1)[1] for m in mails(b, "agents/echo/mail"))
    assert bodies == sorted([f"before {i}\n" for i in range(10)]
                            + [f"during {i}\n" for i in range(10)])
    wait_for(lambda: status(a)["outbox"] == "0", what="alpha's outbox drained")


def test_mail_to_a_peer_above_a_label_waits_for_the_operators_yes(nats, members):
    a, b = members
    federated(nats, a, b)
    a.define("teller", 'cmd = ["cat"]\npledge = ["send", "federate", "declassify"]\n'
                       '[approval]\nmail_above = "public"\n')
    a.sh("echo 'spawn teller' > ctl", check=True)
    out = "agents/teller/outbox/echo@beta"  # sent as teller
    a.write(out, "classification: public\n\nthe weather\n")  # at the label: no question
    assert errno_of(a.write, out, "classification: internal\n\nthe plans\n") == errno.EAGAIN
    s = dict(line.split("=", 1) for line in a.read("approvals/1/status").splitlines())
    assert (s["agent"], s["action"], s["data"]) == ("teller", "mail_above",
                                                    "to echo@beta internal")
    a.sh("echo approve > approvals/1/ctl", check=True)
    a.write(out, "classification: internal\n\nthe plans\n")
    wait_for(lambda: len(mails(b, "agents/echo/mail")) == 2, what="both messages on beta")
    assert sorted(m.rsplit("\n\n", 1)[1] for m in mails(b, "agents/echo/mail")) == \
        ["the plans\n", "the weather\n"]
    assert errno_of(a.write, out, "classification: internal\n\nmore\n") == errno.EAGAIN


def test_a_full_mailbox_holds_a_peers_mail_back_and_loses_none(nats, members):
    """A peer's mail to a full mailbox is neither recorded nor acknowledged: JetStream
    keeps it, and it is delivered once there is room (the mailbox's cap holds across
    the boundary too)."""
    a, b = members
    federated(nats, a, b)
    b.sh("echo 'spawn box cmd=cat unconfined=true' > ctl && echo stop > agents/box/ctl",
         check=True)
    for _ in range(10):  # the operator fills box: its cap for others is 10,000 messages
        b.write("agents/box/mail/batch", "filler\n" * 1000)
    a.sh("printf 'classification: public\\n\\nlet me in\\n' > federation/outbox/box@beta",
         check=True)
    wait_for(lambda: "mailbox" in status(b)["last_error"], timeout=LONG_S,
             what="beta holding the message back")
    assert not any("let me in" in m for m in mails(b, "agents/box/mail", last=5))
    ids = [line.split("\t")[0] for line in b.read("agents/box/mail/batch").splitlines()[:100]]
    b.write("agents/box/mail/ack", " ".join(ids))
    wait_for(lambda: any("let me in" in m for m in mails(b, "agents/box/mail", last=5)),
             timeout=LONG_S, what="the message delivered once there is room")
    # once: one delivery in beta's log (reading all 9,900 files would take minutes)
    assert len([r for r in log_rows(b, "mail_sent") if r.get("fed")]) == 1
    assert sum("let me in" in m for m in mails(b, "agents/box/mail", last=50)) == 1


def trace(m: Mount, corr: str) -> list[dict]:
    return [json.loads(line) for line in m.read(f"log/trace/{corr}").splitlines()]


def test_a_trace_crosses_with_the_result(nats, members):
    """log/trace/ID on the OS that asked shows the answering OS's part too, each entry
    labelled with its OS, in order; a part is taken only for an id we asked under, only
    lines of the right shape, never lines claiming to be ours."""
    a, b = members
    federated(nats, a, b)
    a.sh("printf 'type: work_request\\nclassification: public\\ncorrelation-id: tr-1\\n\\n"
         "hi\\n' > federation/outbox/echo@beta", check=True)
    wait_for(lambda: any(line["member"] == "beta" for line in trace(a, "tr-1")),
             timeout=LONG_S, what="beta's part on alpha")
    lines = trace(a, "tr-1")
    assert [line["ts"] for line in lines] == sorted(line["ts"] for line in lines)
    mine = [line["kind"] for line in lines if line["member"] == "alpha"]
    theirs = [line["kind"] for line in lines if line["member"] == "beta"]
    assert mine[0] == "fed_queued" and "fed_trace" in mine
    assert theirs[0] == "mail_sent" and "task_done" in theirs
    assert all(set(line) <= {"member", "seq", "ts", "kind", "agent", "task"}
               for line in lines if line["member"] == "beta")  # no event's data crosses
    assert {line["member"] for line in trace(b, "tr-1")} == {"beta"}

    def part(mid: str, corr: str, body: str) -> None:
        publish_raw(nats.url, "fs9.fed.alpha.beta", (
            f"id: {mid}\nfrom: federation@beta\nto: federation@alpha\ntype: event\n"
            f"classification: public\ncorrelation-id: {corr}\nx-trace: part\n\n{body}"
        ).encode())
    part("00000000000000e1", "never-asked", '{"member":"beta","seq":1,"ts":1,"kind":"x"}\n')
    wait_for(lambda: log_rows(a, "fed_rejected"), what="the unasked part refused")
    assert "no request of ours went to beta" in log_rows(a, "fed_rejected")[0]["reason"]
    assert not os.path.exists(a.path / "log/trace/never-asked")  # nothing logged under it
    before = len(trace(a, "tr-1"))
    part("00000000000000e2", "tr-1", "\n".join([
        '{"member":"gamma","seq":7,"ts":5,"kind":"task_done","agent":"w","secret":"s",'
        '"via":"gamma"}',  # (its relay: the sender's word, not taken)
        '{"member":"alpha","seq":999999,"ts":6,"kind":"forged"}',  # as if ours
        '{"member":"beta","seq":"1","ts":7,"kind":"task_done"}', "not json", "[1]",
        '{"member":"be ta","seq":2,"ts":8,"kind":"task_done"}']) + "\n")
    wait_for(lambda: len(trace(a, "tr-1")) == before + 2, what="the part recorded")
    [gamma] = [line for line in trace(a, "tr-1") if line["member"] == "gamma"]
    assert gamma == {"member": "gamma", "seq": 7, "ts": 5.0, "kind": "task_done",
                     "agent": "w", "via": "beta"}
    assert not [line for line in trace(a, "tr-1") if line["kind"] == "forged"]


def test_a_peers_trace_parts_are_bounded(nats, members):
    """A peer that was sent a work request may send parts of its trace back, each
    checked against every line held under that id, on the receiver's loop: a hostile
    peer's parts under one id are at most 16, and the lines held under it 10,000, so
    one part costs the receiver a bounded look (64 parts of 2,000 lines once cost
    seconds of its loop)."""
    from fs9.kernel.federation import trace
    a, b = members
    federated(nats, a, b)
    for corr in ("tr-1", "tr-2"):
        a.write("federation/outbox/echo@beta", f"type: work_request\nclassification: public\n"
                                               f"correlation-id: {corr}\n\nhi\n")
    wait_for(lambda: len(mails(a, "mail")) == 2, timeout=LONG_S, what="both results")
    wait_for(lambda: len(log_rows(a, "fed_trace")) == 2, what="beta's own parts")
    seq = iter(range(1 << 30))

    def part(mid: int, corr: str, n: int) -> None:
        body = "".join(json.dumps({"member": "beta", "seq": next(seq), "ts": 1.0,
                                   "kind": "task_done"}) + "\n" for _ in range(n))
        publish_raw(nats.url, "fs9.fed.alpha.beta", (
            f"id: {mid:016x}\nfrom: federation@beta\nto: federation@alpha\ntype: event\n"
            f"correlation-id: {corr}\nx-trace: part\n\n{body}").encode())
    for i in range(8):  # big ones under tr-1
        part(0xe100 + i, "tr-1", trace.MAX_LINES)
    for i in range(20):  # many small ones under tr-2
        part(0xe200 + i, "tr-2", 1)
    wait_for(lambda: len(log_rows(a, "fed_trace")) + len(log_rows(a, "fed_rejected")) == 30,
             timeout=LONG_S, what="alpha judging the 28 parts")
    db = sqlite3.connect(f"file:{a.state / 'log.sqlite'}?mode=ro", uri=True)
    try:
        rows = [(c, json.loads(d)) for c, d in db.execute(
            "SELECT corr, data FROM events WHERE kind='fed_trace'")]
    finally:
        db.close()
    assert sum(d["n"] for c, d in rows if c == "tr-1") == trace.MAX_HELD
    assert sum(1 for c, d in rows if c == "tr-2") == trace.MAX_PARTS_PEER
    reasons = [r["reason"] for r in log_rows(a, "fed_rejected")]
    assert sum("lines of the trace of 'tr-1' held already" in r for r in reasons) == 3
    assert sum("taken from beta already" in r for r in reasons) == 20 + 1 - \
        trace.MAX_PARTS_PEER
    assert a.read("log/trace/tr-1").count('"member":"beta"') >= trace.MAX_HELD


def test_a_result_for_a_killed_requester_never_reaches_the_next_holder_of_its_name(
        nats, members):
    # asker@alpha asks slow@beta for work; while slow waits for a mail, alpha kills
    # asker and spawns a new agent under its name. The result was the first asker's:
    # it is refused on alpha ("no such agent"), never put in the new asker's mailbox.
    a, b = members
    nats.start()
    b.define("slow", 'cmd = ["sh", "work.sh"]\n', {"work.sh": (
        'cat >/dev/null\ncat "$FS9_AGENT_DIR/mail/next" >/dev/null\necho done\n')})
    b.sh("echo 'spawn slow' > ctl", check=True)
    a.define("asker", 'cmd = ["sh", "-c", "printf \'type: work_request\\\\nclassification: '
             'public\\\\n\\\\nx\\\\n\' > \\"$FS9_OUTBOX/slow@beta\\""]\n'
             'pledge = ["send", "federate"]\nclearance = "public"\n')
    join(a, nats.url, "alpha", "beta")
    join(b, nats.url, "beta", "alpha")
    connected(a, b)
    a.sh("echo 'spawn asker' > ctl && echo 'run go' > agents/asker/ctl", check=True)
    task = wait_for(lambda: os.listdir(b.path / "agents/slow/tasks"), timeout=LONG_S,
                    what="the request a task on beta")[0]
    a.sh("echo 'kill asker' > ctl && echo 'spawn asker' > ctl", check=True)
    b.write("agents/slow/mail/new", "finish\n")
    wait_for(lambda: "state=done" in b.read(f"agents/slow/tasks/{task}/status"),
             what="slow's task done")
    wait_for(lambda: log_rows(a, "fed_rejected"), timeout=LONG_S, what="alpha's refusal")
    [rej] = log_rows(a, "fed_rejected")
    assert rej["origin"] == "beta" and "no such agent: asker@alpha" in rej["reason"], rej
    assert mails(a, "agents/asker/mail") == [], "the new asker got the first one's result"
