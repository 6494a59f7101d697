"""Federation traffic (issue 13): a cross-OS work_request's status updates and result
delivered where its callbacks say, in order (a stale update is delivered to nobody),
and large results crossing in chunks that both ends resume. Two real mounts and a real
nats-server; what arrived is read on the receiving side (mailboxes, the log)."""
import asyncio
import errno
import json
import os
import sqlite3
import time

import nats as natspy

from conftest import errno_of, wait_for
from test_federation import (LONG_S, connected, headers, join, log_rows, mails, members,
                             nats, publish_raw, status)
from fs9.kernel.federation import chunks

__all__ = ["members", "nats"]  # the fixtures, shared with test_federation.py


def request_state(m, corr: str) -> dict[str, str]:
    [line] = m.read(f"federation/requests/{corr}").splitlines()
    head, _, last = line.partition(" last=")  # (the last field is text)
    return dict(kv.split("=", 1) for kv in head.split(" ")) | {"last": last}


def test_callbacks_deliver_updates_and_the_result_in_order(nats, members):
    a, b = members
    nats.start()
    b.define("worker", 'cmd = ["sh", "work.sh"]\nclearance = "internal"\n', {"work.sh": (
        'cat >/dev/null\necho "investigating" > "$FS9_PROGRESS"\n'
        'echo "fix deployed" > "$FS9_PROGRESS"\necho "fixed in 1.2.3"\n')})
    b.sh("echo 'spawn worker' > ctl", check=True)
    for name in ("cases", "tracker"):
        a.sh(f"echo 'spawn {name} def=echo' > ctl", check=True)
    join(a, nats.url, "alpha", "beta")
    join(b, nats.url, "beta", "alpha")
    connected(a, b)
    # the callbacks must name a mailbox of this OS: checked at write(2)
    assert errno_of(a.write, "federation/outbox/worker@beta",
                    "type: work_request\non-completion: nobody\n\nx\n") == errno.ENOENT
    assert errno_of(a.write, "federation/outbox/worker@beta",
                    "on-completion: cases\n\nan event has no callbacks\n") == errno.EINVAL
    a.write("federation/outbox/worker@beta",
            "type: work_request\nclassification: public\ncorrelation-id: case-7\n"
            "on-status-change: tracker\non-completion: cases\n\nthe CSV export corrupts\n")
    wait_for(lambda: mails(a, "agents/cases/mail"), timeout=LONG_S, what="the result in cases")
    [result] = mails(a, "agents/cases/mail")
    h = headers(result)
    assert h["type"] == "result" and h["from"] == "worker@beta" and h["x-status"] == "done"
    assert h["correlation-id"] == "case-7" and result.endswith("\n\nfixed in 1.2.3\n")
    updates = mails(a, "agents/tracker/mail")
    assert [u.split("\n\n", 1)[1] for u in updates] == ["investigating\n", "fix deployed\n"]
    assert all(headers(u)["type"] == "status_update" for u in updates)
    assert mails(a, "mail") == []  # nothing to the sender: its callbacks took it all
    state = request_state(a, "case-7")
    assert (state["state"], state["updates"], state["to"]) == ("done", "3", "worker@beta")
    assert state["on_completion"] == "cases" and state["last"] == "fixed in 1.2.3"

    # status sync: an update older than what was taken, or after the result, is stale:
    # logged, delivered to nobody (alpha never says "investigating" after the fix)
    seq = int(headers(updates[1])["x-seq"])
    for mid, x_seq in (("00000000000000b1", seq - 1), ("00000000000000b2", seq + 10**6)):
        publish_raw(nats.url, "fs9.fed.alpha.beta", (
            f"id: {mid}\nfrom: worker@beta\nto: operator@alpha\ntype: status_update\n"
            f"classification: public\ncorrelation-id: case-7\nx-seq: {x_seq}\n\n"
            "under investigation\n").encode())
    wait_for(lambda: len(log_rows(a, "fed_stale")) == 2, what="both stale updates logged")
    reasons = [r["reason"] for r in log_rows(a, "fed_stale")]
    assert all("already done" in r for r in reasons), reasons
    assert len(mails(a, "agents/tracker/mail")) == 2 and mails(a, "mail") == []
    assert request_state(a, "case-7")["stale"] == "2" and status(a)["stale"] == "2"
    # the same answers from another agent of beta, or another OS, route by nothing
    publish_raw(nats.url, "fs9.fed.alpha.beta", (
        "id: 00000000000000b3\nfrom: other@beta\nto: cases@alpha\ntype: result\n"
        "classification: public\ncorrelation-id: case-7\n\nnot the worker\n").encode())
    wait_for(lambda: len(mails(a, "agents/cases/mail")) == 2, what="the other mail")
    assert request_state(a, "case-7")["updates"] == "3"
    # and all of it survives a remount (the log's record)
    a.kill9()
    a.mount()
    state = request_state(a, "case-7")
    assert (state["state"], state["updates"], state["stale"]) == ("done", "3", "2")


def test_an_agent_names_only_mailboxes_it_may_write(nats, members):
    a, b = members
    nats.start()
    b.sh("echo 'spawn echo' > ctl", check=True)
    a.sh("echo 'spawn cases def=echo' > ctl", check=True)
    join(a, nats.url, "alpha", "beta")
    connected(a)
    a.define("asker", 'driver = "exec"\ncmd = ["sh", "-c", "cat > \\"$FS9_OUTBOX/echo@beta\\""]\n'
             'pledge = ["send", "federate"]\nclearance = "public"\n')
    a.sh("echo 'spawn asker' > ctl", check=True)
    # cases: an agent asker does not know of (answers as a name nobody has); then itself
    a.sh("printf 'type: work_request\\non-completion: cases\\n\\nq\\n' > agents/asker/in")
    wait_for(lambda: "on-completion: no such agent: cases" in a.read("agents/asker/err"),
             what="the asker's refusal")
    assert status(a)["outbox"] == "0" and log_rows(a, "fed_queued") == []


def publish_chunks(url: str, parts) -> None:
    async def go():
        nc = await natspy.connect(url)
        try:
            js = nc.jetstream()
            for data, hdrs in parts:
                await js.publish("fs9.fed.alpha.beta", data, headers=hdrs, timeout=10)
        finally:
            await nc.close()
    asyncio.run(go())


def test_a_large_result_crosses_in_chunks(nats, members):
    a, b = members
    nats.start()
    b.define("big", 'cmd = ["sh", "-c", "cat >/dev/null; yes 0123456789abcdef | '
             'head -c 1500000"]\nclearance = "internal"\n')
    b.sh("echo 'spawn big' > ctl", check=True)
    join(a, nats.url, "alpha", "beta")
    join(b, nats.url, "beta", "alpha")
    connected(a, b)
    a.write("federation/outbox/big@beta", "type: work_request\nclassification: public\n"
            "correlation-id: big-1\n\ngo\n")
    wait_for(lambda: mails(a, "mail"), timeout=LONG_S, what="the large result")
    [result] = mails(a, "mail")
    body = result.split("\n\n", 1)[1]
    assert len(body) == 1_500_000 and body.startswith("0123456789abcdef\n")
    assert headers(result)["x-status"] == "done"
    n = -(-len(result.encode()) // chunks.CHUNK)
    assert sorted(e["i"] for e in log_rows(a, "fed_chunk")) == list(range(n))
    assert [e["i"] for e in log_rows(b, "fed_chunk_sent")] == list(range(n))


def test_chunks_resume_after_the_receiver_is_killed(nats, members):
    """A hostile or crashing sender's chunks: checked, resumed across a kill -9 of the
    receiver, delivered once; a wrong digest or a bad header rejects the message."""
    a, b = members
    nats.start()
    join(a, nats.url, "alpha", "beta")
    connected(a)
    body = b"0123456789abcdef" * 40000  # 640,000 bytes: three chunks
    msg = (b"id: 00000000000000c1\nfrom: worker@beta\nto: operator@alpha\ntype: result\n"
           b"classification: internal\ncorrelation-id: big-2\n\n" + body)
    parts = chunks.split("00000000000000c1", msg)
    assert len(parts) == 3
    publish_chunks(nats.url, parts[:2])
    wait_for(lambda: len(log_rows(a, "fed_chunk")) == 2, what="two chunks recorded")
    a.kill9()
    a.mount()
    publish_chunks(nats.url, [parts[0], parts[2], parts[1]])  # one again, the last, one again
    wait_for(lambda: mails(a, "mail"), timeout=LONG_S, what="the whole message")
    wait_for(lambda: int(status(a)["duplicates"]) >= 2, what="the repeats dropped")
    [got] = mails(a, "mail")
    assert got.encode().split(b"\n\n", 1)[1] == body
    assert sorted(e["i"] for e in log_rows(a, "fed_chunk")) == [0, 1, 2]
    # a digest that does not match, a header out of shape, a size out of place
    forged = chunks.split("00000000000000c2", msg.replace(b"c1", b"c2"))
    forged[2] = (forged[2][0][:-1] + b"X", forged[2][1])
    bad_header = [(b"x" * 10, {chunks.HEADER: "00000000000000c3 0 2 zz"})]
    short = [(b"x" * 10, {chunks.HEADER: f"00000000000000c4 0 2 {'0' * 64}"})]
    publish_chunks(nats.url, forged + bad_header + short)
    wait_for(lambda: len(log_rows(a, "fed_rejected")) == 3, what="three rejections")
    reasons = " | ".join(r["reason"] for r in log_rows(a, "fed_rejected"))
    assert "do not match their digest" in reasons and "bad Fs9-Chunk header" in reasons
    assert "chunk 0 of 2 has 10 bytes" in reasons
    assert len(mails(a, "mail")) == 1


def saga_status(m, sid: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in m.read(f"federation/sagas/{sid}/status")
                .splitlines())


def steps(m, sid: str) -> list[str]:
    return m.read(f"federation/sagas/{sid}/steps").splitlines()


def inputs(m, agent: str) -> list[str]:
    return [m.read(f"agents/{agent}/tasks/{t}/input")
            for t in sorted(os.listdir(m.path / f"agents/{agent}/tasks"), key=int)]


SAGA = """id = "csv-4521"
on_failure = "compensate"
[[step]]
name = "fix"
to = "echo@beta"
request = "fix the CSV export"
compensate = "revert the fix"
[[step]]
name = "notify"
to = "echo@beta"
request = "tell the customer"
[[step]]
name = "docs"
to = "failing@beta"
request = "update the known issues"
retries = 1
timeout_s = 30
"""


def test_a_saga_compensates_what_declares_how_and_keeps_the_rest(nats, members):
    a, b = members
    nats.start()
    b.define("failing", 'cmd = ["sh", "-c", "cat >/dev/null; echo no >&2; exit 3"]\n')
    b.sh("echo 'spawn echo' > ctl && echo 'spawn failing' > ctl", check=True)
    join(a, nats.url, "alpha", "beta")
    join(b, nats.url, "beta", "alpha")
    connected(a, b)
    assert errno_of(a.write, "federation/sagas/new", "id = 'x'\n") == errno.EINVAL
    assert errno_of(a.write, "federation/sagas/new",
                    SAGA.replace("failing@beta", "docs@gamma")) == errno.ENOENT
    a.write("federation/sagas/new", SAGA)
    assert errno_of(a.write, "federation/sagas/new", SAGA) == errno.EEXIST
    wait_for(lambda: saga_status(a, "csv-4521")["state"] == "compensated", timeout=LONG_S,
             what="the saga compensated")
    s = saga_status(a, "csv-4521")
    assert s["standing"] == "notify" and "step docs failed: failed" in s["reason"]
    fix, notify, docs = steps(a, "csv-4521")
    assert "state=undone" in fix and "state=done" in notify
    assert "state=failed attempt=2/2" in docs
    # what beta's agents were asked, in order: the undo after the failure, once
    assert inputs(b, "echo") == ["fix the CSV export\n", "tell the customer\n",
                                 "revert the fix\n"]
    assert len(inputs(b, "failing")) == 2
    # the whole saga in alpha's log under its id; its retry waited (backoff)
    kinds = [json.loads(line)["kind"] for line in a.read("log/trace/csv-4521").splitlines()]
    assert kinds[0] == "saga_started" and kinds[-1] == "saga_state"
    retry = [e for e in log_rows(a, "saga_step") if e["state"] == "retrying"]
    assert len(retry) == 1 and "again in 1 s" in retry[0]["reason"]
    # it all stands after a remount
    a.kill9()
    a.mount()
    assert saga_status(a, "csv-4521")["state"] == "compensated"


def test_a_saga_times_out_with_backoff_then_escalates_to_a_person(nats, members):
    a, b = members
    nats.start()
    b.define("failing", 'cmd = ["sh", "-c", "cat >/dev/null; exit 3"]\n')
    b.sh("echo 'spawn echo' > ctl && echo 'spawn failing' > ctl", check=True)
    join(a, nats.url, "alpha", "beta")
    join(b, nats.url, "beta", "alpha")
    connected(a, b)
    # beta unreachable for alpha (paused): each attempt times out, the next one waits
    # longer; once beta is back the step goes through
    a.sh("echo 'pause beta' > federation/ctl", check=True)
    a.write("federation/sagas/new", 'id = "slow"\n[[step]]\nto = "echo@beta"\n'
            'request = "hello"\nretries = 6\ntimeout_s = 2\n')
    wait_for(lambda: len([e for e in log_rows(a, "saga_step") if e["state"] == "retrying"])
             >= 2, timeout=LONG_S, what="two timed-out attempts")
    reasons = [e["reason"] for e in log_rows(a, "saga_step") if e["state"] == "retrying"]
    assert "no answer in 2 s (request queued); again in 1 s" == reasons[0]
    assert reasons[1].endswith("again in 2 s")
    a.sh("echo 'resume beta' > federation/ctl", check=True)
    wait_for(lambda: saga_status(a, "slow")["state"] == "completed", timeout=LONG_S,
             what="the slow saga completed")
    assert inputs(b, "echo") == ["hello\n"]  # the attempts given up never arrived
    assert int(status(a)["dead"]) >= 2
    # out of attempts with on_failure = escalate: it waits for the operator, told by mail
    a.write("federation/sagas/new", 'id = "esc"\non_failure = "escalate"\n[[step]]\n'
            'to = "failing@beta"\nrequest = "x"\nretries = 0\n')
    wait_for(lambda: saga_status(a, "esc")["state"] == "escalated", timeout=LONG_S,
             what="the escalation")
    [note] = [m for m in mails(a, "mail") if "saga esc needs you" in m]
    assert headers(note)["correlation-id"] == "esc"
    assert errno_of(a.write, "federation/sagas/esc/ctl", "escalate\n") == errno.EINVAL
    a.write("federation/sagas/esc/ctl", "retry\n")  # one more attempt, failing again
    wait_for(lambda: len(inputs(b, "failing")) == 2 and
             saga_status(a, "esc")["state"] == "escalated", timeout=LONG_S,
             what="the retry, escalated again")
    a.write("federation/sagas/esc/ctl", "abort\n")
    assert saga_status(a, "esc")["state"] == "aborted"
    # an agent never drives a saga
    assert errno_of(a.write, "agents/echo/view/federation/sagas/new", SAGA) in (
        errno.ENOENT, errno.EACCES)


def test_a_large_message_whose_chunks_stopped_gives_its_place_up(nats, members):
    """A peer that starts large messages and never finishes them (dead half way, or
    hostile) holds the 4 places it has only until its `wait` passes, then the oldest
    goes to the next one: rejected and logged, never silently."""
    a, b = members
    nats.start()
    join(a, nats.url, "alpha", "beta")
    connected(a)

    def message(mid: str) -> list:
        msg = (f"id: {mid}\nfrom: worker@beta\nto: operator@alpha\ntype: result\n"
               f"classification: internal\ncorrelation-id: c-{mid}\n\n").encode()
        return chunks.split(mid, msg + b"0123456789abcdef" * 20000)  # two chunks
    started = [f"00000000000000d{i}" for i in range(1, 5)]
    publish_chunks(nats.url, [message(mid)[0] for mid in started])  # first halves only
    wait_for(lambda: len(log_rows(a, "fed_chunk")) == 4, what="four halves held")
    publish_chunks(nats.url, message("00000000000000d5"))  # places taken, none stale
    wait_for(lambda: log_rows(a, "fed_rejected"), what="the fifth refused")
    assert "more than 4 large messages from beta at once" in \
        log_rows(a, "fed_rejected")[0]["reason"]
    a.sh("echo 'peer beta wait=1' > federation/ctl", check=True)
    assert "wait=1" in a.read("federation/peers/beta/status").split()
    assert errno_of(a.write, "federation/ctl", "peer beta wait=0\n") == errno.EINVAL
    db = sqlite3.connect(f"file:{a.state / 'log.sqlite'}?mode=ro", uri=True)
    try:  # when the halves came (the log's own clock)
        [(last,)] = db.execute("SELECT max(ts) FROM events WHERE kind='fed_chunk'")
    finally:
        db.close()
    wait_for(lambda: time.time() > last + 1.5, what="the halves going stale")
    publish_chunks(nats.url, message("00000000000000d6"))
    wait_for(lambda: mails(a, "mail"), timeout=LONG_S, what="the sixth delivered")
    assert headers(mails(a, "mail")[0])["correlation-id"] == "c-00000000000000d6"
    [gone] = [r for r in log_rows(a, "fed_rejected") if "stopped coming" in r["reason"]]
    assert gone["id"] == started[0] and gone["reason"].endswith("(none for 1 s)")
    # its other half, late, is a repeat of what was judged: dropped, not delivered
    publish_chunks(nats.url, [message(started[0])[1]])
    wait_for(lambda: int(status(a)["duplicates"]) >= 1, what="the late half dropped")
    assert len(mails(a, "mail")) == 1


def test_more_than_64_chunks_are_refused(nats, members):
    """A large message crosses in 64 chunks at most (16 MiB): a first chunk that says 65
    is refused whole, nothing of it kept; one that says 64 is held for the rest."""
    a, b = members
    nats.start()
    join(a, nats.url, "alpha", "beta")
    connected(a)
    assert chunks.MAX_CHUNKS == 64
    piece = b"x" * chunks.CHUNK
    publish_chunks(nats.url, [(piece, {chunks.HEADER: f"00000000000000f1 0 65 {'0' * 64}"}),
                              (piece, {chunks.HEADER: f"00000000000000f2 0 64 {'0' * 64}"})])
    wait_for(lambda: log_rows(a, "fed_rejected") and log_rows(a, "fed_chunk"),
             what="one refused, one held")
    [rej] = log_rows(a, "fed_rejected")
    assert "bad chunk 0 of 65 (2 to 64 chunks)" in rej["reason"]
    assert [(e["id"], e["n"]) for e in log_rows(a, "fed_chunk")] == [("00000000000000f2", 64)]
