"""Mailboxes through files: send by writing, read with cat, acknowledge with rm; durable."""
import errno
import json
import os
import subprocess

import pytest

from midstream import killed_mid_stream


def send(mount, agent: str, text: str, name: str = "new") -> None:
    mount.write(f"agents/{agent}/mail/{name}", text)


def pending(mount, agent: str) -> list[str]:
    return [n for n in os.listdir(mount.path / f"agents/{agent}/mail")
            if n not in ("new", "next", "dead")]


def headers(text: str) -> dict[str, str]:
    head = text.split("\n\n", 1)[0]
    return dict(line.split(": ", 1) for line in head.splitlines())


def test_send_list_read_and_acknowledge_with_shell_tools(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    r = mount.sh("printf 'type: notice\\npriority: low\\n\\nlow one\\n' > agents/echo/mail/new"
                 " && printf 'priority: critical\\n\\nurgent\\n' > agents/echo/mail/any-name"
                 " && echo 'plain body' > agents/echo/mail/new && ls agents/echo/mail", check=True)
    names = r.stdout.split()
    assert names[:3] == sorted(names[:3]) and names[3:] == ["dead", "new", "next"]
    assert [n.split("-")[1] for n in names[:3]] == ["critical", "normal", "low"]
    first = mount.read(f"agents/echo/mail/{names[0]}")
    h = headers(first)
    assert first.endswith("\n\nurgent\n") and h["from"] == "operator" and h["to"] == "echo"
    assert h["priority"] == "critical" and len(h["id"]) == 16 and h["correlation-id"] == h["id"]
    assert mount.read("agents/echo/mail/next") == first  # next: the head of the queue
    mount.sh(f"rm agents/echo/mail/{names[0]}", check=True)
    assert pending(mount, "echo") == names[1:3]
    assert headers(mount.read("agents/echo/mail/next"))["type"] == "event"


def test_next_blocks_until_a_message_arrives(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    with subprocess.Popen(["cat", mount.path / "agents/echo/mail/next"],
                          stdout=subprocess.PIPE, text=True) as reader:
        mount.wait_reading([reader], "agents/echo/mail/next")
        assert reader.poll() is None  # still waiting
        send(mount, "echo", "hello\n")
        out, _ = reader.communicate(timeout=30)
    assert out.endswith("\n\nhello\n")
    r = mount.sh("timeout 30 cat agents/echo/mail/next")  # unacknowledged: delivered again
    assert r.stdout == out
    mount.sh(f"rm agents/echo/mail/{headers(out)['id']}", check=True)  # rm by id works too
    assert pending(mount, "echo") == []


@pytest.mark.parametrize("text, code, reason", [
    ("from: mallory\n\nx", errno.EPERM, "header 'from' is stamped by the kernel"),
    ("id: 1\n\nx", errno.EPERM, "header 'id' is stamped by the kernel"),
    ("colour: red\n\nx", errno.EINVAL, "unknown header 'colour'"),
    ("priority: urgent\n\nx", errno.EINVAL, "bad priority 'urgent'"),
    ("to: someone-else\n\nx", errno.EINVAL, "does not match this mailbox"),
    ("deadline: tomorrow\n\nx", errno.EINVAL, "bad deadline"),
    ("classification: confidential\n\nx", errno.EACCES, "echo is cleared for internal"),
    ("x" * ((1 << 20) + 1), errno.EFBIG, "message over 1048576 bytes"),
])
def test_bad_messages_are_refused_with_a_reason_and_harm_nothing(mount, text, code, reason):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    send(mount, "echo", "keep me\n")
    kept = pending(mount, "echo")
    with pytest.raises(OSError) as e:
        send(mount, "echo", text)
    assert e.value.errno == code
    assert reason in mount.read("agents/echo/err")
    assert pending(mount, "echo") == kept
    assert mount.read(f"agents/echo/mail/{kept[0]}").endswith("\n\nkeep me\n")


def test_unknown_recipient_is_enoent(mount):
    with pytest.raises(FileNotFoundError):
        send(mount, "nobody", "x")


def test_clearance_from_the_manifest_admits_confidential_mail(mount):
    mount.sh("echo 'spawn vault-keeper def=echo clearance=confidential' > ctl", check=True)
    send(mount, "vault-keeper", "classification: confidential\n\nsecret\n")
    assert len(pending(mount, "vault-keeper")) == 1


def test_idempotency_key_stores_a_message_once(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    for _ in range(3):
        send(mount, "echo", "idempotency-key: order-42\n\npay once\n")
    send(mount, "echo", "idempotency-key: order-43\n\npay again\n")
    assert len(pending(mount, "echo")) == 2


def test_deadline_moves_a_message_to_dead_letters_with_an_event(mount, events):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    send(mount, "echo", "deadline: +0.3\n\ntoo late\n")
    send(mount, "echo", "deadline: +600\n\nin time\n")
    seen = events.wait_kind("mail_expired")
    expired = next(e for e in seen if e["kind"] == "mail_expired")
    dead = os.listdir(mount.path / "agents/echo/mail/dead")
    assert dead == [expired["name"]]
    assert mount.read(f"agents/echo/mail/dead/{dead[0]}").endswith("\n\ntoo late\n")
    (left,) = pending(mount, "echo")
    assert mount.read(f"agents/echo/mail/{left}").endswith("\n\nin time\n")


def test_audit_and_trace_follow_a_message(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    send(mount, "echo", "correlation-id: job-7\n\nwork\n")
    mount.read("agents/echo/mail/next")
    (name,) = pending(mount, "echo")
    os.unlink(mount.path / f"agents/echo/mail/{name}")
    trace = [json.loads(line) for line in mount.read("log/trace/job-7").splitlines()]
    assert [e["kind"] for e in trace] == ["mail_sent", "mail_delivered", "mail_acked"]
    mount.sh("printf 'correlation-id: job-8\\n\\nbody\\n' > agents/echo/mail/new", check=True)
    (name,) = pending(mount, "echo")
    mount.read(f"agents/echo/mail/{name}")  # reading the file is a delivery too
    assert "mail_delivered" in mount.read("log/trace/job-8")
    assert "job-7" in os.listdir(mount.path / "log/trace")
    audit = [json.loads(line) for line in mount.read("log/audit").splitlines()]
    assert audit[0]["seq"] == 1 and [e["seq"] for e in audit] == list(range(1, len(audit) + 1))
    assert {"mount", "spawn", "mail_sent", "mail_acked"} <= {e["kind"] for e in audit}
    with pytest.raises(FileNotFoundError):
        mount.read("log/trace/no-such-work")


def test_kill_9_keeps_every_acknowledged_send_exactly_once(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    fd_count = 300
    for i in range(fd_count):
        send(mount, "echo", f"n{i}\n")
    names = pending(mount, "echo")
    for name in names[:100]:  # acknowledge the first hundred
        os.unlink(mount.path / f"agents/echo/mail/{name}")
    mount.kill9()
    mount.mount()
    left = pending(mount, "echo")
    assert left == names[100:]  # acknowledged ones gone, the rest delivered again
    bodies = [mount.read(f"agents/echo/mail/{n}").split("\n\n", 1)[1] for n in left]
    assert bodies == [f"n{i}\n" for i in range(100, fd_count)]


def test_a_work_request_becomes_a_task_and_its_result_comes_back_as_mail(mount):
    # (an agent mails the agents its view shows: here upper's mailbox)
    mount.define("asker", 'cmd = ["sh", "ask.sh"]\n[unveil]\n"agents/upper/mail" = "w"\n',
                 {"ask.sh": (
        'printf "type: work_request\\ncorrelation-id: $FS9_CORR\\n\\nplease shout\\n" '
        '> "$FS9_OUTBOX/upper"\necho asked\n')})
    mount.sh("echo 'spawn upper' > ctl && echo 'spawn asker' > ctl", check=True)
    mount.sh("echo 'run go' > agents/asker/ctl && cat agents/asker/out", check=True)
    result = mount.wait_for(lambda: [n for n in os.listdir(mount.path / "agents/asker/mail")
                                     if n not in ("new", "next", "dead")], what="result mail")
    text = mount.read(f"agents/asker/mail/{result[0]}")
    h = headers(text)
    assert h["type"] == "result" and h["from"] == "upper" and h["x-status"] == "done"
    assert text.endswith("\n\nPLEASE SHOUT\n")
    (task,) = os.listdir(mount.path / "agents/upper/tasks")
    assert "reply_to=asker" in mount.read(f"agents/upper/tasks/{task}/status")
    assert pending(mount, "upper") == []  # the request became the task
    kinds = [(e["kind"], e.get("agent")) for e in
             map(json.loads, mount.read(f"log/trace/{h['correlation-id']}").splitlines())]
    assert kinds[0] == ("task_queued", "asker")  # asker's own task started the work
    assert ("mail_sent", "upper") in kinds and ("task_done", "upper") in kinds
    assert kinds.index(("task_done", "upper")) < kinds.index(("mail_sent", "asker"))


def test_progress_reports_reach_the_requester_as_status_updates(mount):
    mount.define("slowpoke", 'cmd = ["sh", "work.sh"]\n', {"work.sh": (
        'cat >/dev/null\necho "half way" > "$FS9_PROGRESS"\necho done\n')})
    mount.define("asker", 'cmd = ["sh", "ask.sh"]\n[unveil]\n"agents/slowpoke/mail" = "w"\n',
                 {"ask.sh": 'printf "type: work_request\\n\\nx\\n" > "$FS9_OUTBOX/slowpoke"\n'})
    mount.sh("echo 'spawn slowpoke' > ctl && echo 'spawn asker' > ctl"
             " && echo 'run go' > agents/asker/ctl", check=True)
    mail = mount.wait_for(lambda: len(pending(mount, "asker")) == 2 and pending(mount, "asker"),
                          what="status update and result")
    texts = [mount.read(f"agents/asker/mail/{n}") for n in mail]
    types = sorted(headers(t)["type"] for t in texts)
    assert types == ["result", "status_update"]
    update = next(t for t in texts if "type: status_update" in t)
    assert update.endswith("\n\nhalf way\n") and headers(update)["from"] == "slowpoke"


def test_work_for_a_killed_requester_never_reaches_the_next_holder_of_its_name(mount):
    # slowpoke reports progress, then waits for a mail before it finishes: meanwhile the
    # asker is killed and a new agent takes its name. The work was the first asker's:
    # neither the result nor a later status update goes to the second.
    mount.define("slowpoke", 'mode = "task"\ncmd = ["sh", "work.sh"]\n', {"work.sh": (
        'cat >/dev/null\necho "half way" > "$FS9_PROGRESS"\n'
        'cat "$FS9_AGENT_DIR/mail/next" >/dev/null\necho "late" > "$FS9_PROGRESS"\n'
        'echo done\n')})
    mount.define("asker", 'cmd = ["sh", "ask.sh"]\n[unveil]\n"agents/slowpoke/mail" = "w"\n',
                 {"ask.sh": 'printf "type: work_request\\n\\nx\\n" > "$FS9_OUTBOX/slowpoke"\n'})
    mount.sh("echo 'spawn slowpoke' > ctl && echo 'spawn asker' > ctl"
             " && echo 'run go' > agents/asker/ctl", check=True)
    (update,) = mount.wait_for(lambda: pending(mount, "asker"), what="the status update")
    assert "type: status_update" in mount.read(f"agents/asker/mail/{update}")
    mount.sh("echo 'kill asker' > ctl && echo 'spawn asker' > ctl", check=True)
    mount.write("agents/slowpoke/mail/new", "finish\n")
    (task,) = os.listdir(mount.path / "agents/slowpoke/tasks")
    mount.wait_for(lambda: "state=done" in mount.read(f"agents/slowpoke/tasks/{task}/status"),
                   what="slowpoke's task done")
    assert pending(mount, "asker") == [], "the new asker got the first one's work"
    assert mount.read(f"agents/slowpoke/tasks/{task}/out") == "done\n"  # kept there


def test_a_killed_requesters_name_gives_its_worker_no_way_to_the_next_holder(mount):
    # relay takes the asker's work, then waits for a mail; meanwhile the asker is killed
    # and a new agent takes its name. The asker's work no longer makes the relay its
    # requester's correspondent: it may not mail the new asker (nor know of it), nor
    # name it reply-to of work it hands on (whose result would reach the new asker).
    mount.define("echoer", 'cmd = ["cat"]\n')
    mount.define("relay", 'cmd = ["sh", "relay.sh"]\n[unveil]\n'
                 '"agents/echoer/mail" = "w"\n', {"relay.sh": (
                     'cat >/dev/null\ncat "$FS9_AGENT_DIR/mail/next" >/dev/null\n'
                     'try() { if "$@"; then echo "$1 sent"; else echo "$1 refused"; fi; }\n'
                     'direct() { echo hi > "$FS9_OUTBOX/asker"; }\n'
                     'handed() { printf "type: work_request\\nreply-to: asker\\n\\nsecret\\n"'
                     ' > "$FS9_OUTBOX/echoer"; }\n'
                     'try direct 2>/dev/null; try handed 2>/dev/null\n')})
    mount.define("asker", 'cmd = ["sh", "ask.sh"]\n[unveil]\n"agents/relay/mail" = "w"\n',
                 {"ask.sh": 'printf "type: work_request\\n\\nx\\n" > "$FS9_OUTBOX/relay"\n'})
    mount.sh("echo 'spawn echoer' > ctl && echo 'spawn relay' > ctl && echo 'spawn asker' > ctl"
             " && echo 'run go' > agents/asker/ctl", check=True)
    (task,) = mount.wait_for(lambda: os.listdir(mount.path / "agents/relay/tasks"),
                             what="the request a task of relay's")
    mount.sh("echo 'kill asker' > ctl && echo 'spawn asker' > ctl", check=True)
    mount.write("agents/relay/mail/new", "go on\n")
    mount.wait_for(lambda: "state=" in mount.read(f"agents/relay/tasks/{task}/status")
                   and "state=running" not in mount.read(f"agents/relay/tasks/{task}/status"),
                   what="relay's task ended")
    assert mount.read(f"agents/relay/tasks/{task}/out") == "direct refused\nhanded refused\n"
    assert pending(mount, "asker") == [], "the new asker got mail of the first one's work"


def test_outbox_to_an_unknown_agent_is_enoent(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    with pytest.raises(FileNotFoundError):
        mount.write("agents/echo/outbox/nobody", "hi")
    mount.write("agents/echo/outbox/echo", "note to self\n")
    (name,) = pending(mount, "echo")
    assert headers(mount.read(f"agents/echo/mail/{name}"))["from"] == "echo"


SENDER = """
import sys
box = sys.argv[1]
i = 0
while True:
    try:
        with open(box + "/new", "w") as f:
            f.write(f"n{i}\\n")
    except OSError:
        break
    print(i, flush=True)  # acknowledged: the close returned
    i += 1
"""

RECEIVER = """
import os, sys
box = sys.argv[1]
while True:
    try:
        with open(box + "/next") as f:
            text = f.read()
        body = text.split("\\n\\n", 1)[1].strip()
        print("R", body, flush=True)  # read; the acknowledgement may yet be cut off
        name = [n for n in sorted(os.listdir(box)) if n[0].isdigit()][0]
        os.unlink(os.path.join(box, name))
    except OSError:
        break
    print("A", body, flush=True)  # acknowledged
"""


def test_kill_9_in_the_middle_of_a_stream_of_sends(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    box = str(mount.path / "agents/echo/mail")
    # kill -9 once the stream is well under way: over 50 sends and 10 receipts acknowledged
    said_sender, said_receiver = killed_mid_stream(mount, SENDER, RECEIVER, box, 50, 10,
                                                   "50 sends and 10 acknowledged receipts")
    sent = [int(line) for line in "".join(said_sender).split()]
    log = [line.split() for line in "".join(said_receiver).splitlines()]
    acked = {body for mark, body in log if mark == "A"}
    in_doubt = {body for mark, body in log if mark == "R"} - acked
    assert len(sent) > 50 and len(acked) > 10
    mount.mount()
    bodies = [mount.read(f"agents/echo/mail/{n}").split("\n\n", 1)[1].strip()
              for n in pending(mount, "echo")]
    assert len(bodies) == len(set(bodies))  # nothing twice
    assert not set(acked) & set(bodies)  # acknowledged: gone for good
    missing = {f"n{i}" for i in sent} - acked - set(bodies) - in_doubt
    assert not missing, f"acknowledged sends lost: {sorted(missing)[:5]}"


def test_two_agents_exchange_mail_under_load(mount):
    # ping sends N requests to pong; pong's results come back to ping's mailbox
    n = 60
    mount.define("ping", 'cmd = ["sh", "ping.sh"]\n[unveil]\n"agents/pong/mail" = "w"\n',
                 {"ping.sh": (
        f'i=0; while [ $i -lt {n} ]; do\n'
        '  printf "type: work_request\\nidempotency-key: ping-%s\\n\\n%s\\n" $i $i '
        '> "$FS9_OUTBOX/pong"; i=$((i+1))\ndone\n')})
    mount.sh("echo 'spawn ping' > ctl && echo 'spawn pong def=upper' > ctl"
             " && echo 'run go' > agents/ping/ctl", check=True)
    mount.wait_for(lambda: len(pending(mount, "ping")) == n, timeout=60, what="all results")
    bodies = sorted(int(mount.read(f"agents/ping/mail/{m}").split("\n\n", 1)[1])
                    for m in pending(mount, "ping"))
    assert bodies == list(range(n))
    assert mount.status("pong")["done"] == str(n)


def test_the_operators_requests_get_their_results_in_the_root_mailbox(mount):
    mount.sh("echo 'spawn upper' > ctl", check=True)
    r = mount.sh("printf 'type: work_request\\n\\nhello operator\\n' > agents/upper/mail/new"
                 " && timeout 30 cat mail/next", check=True)
    h = headers(r.stdout)
    assert h["type"] == "result" and h["to"] == "operator" and h["from"] == "upper"
    assert r.stdout.endswith("\n\nHELLO OPERATOR\n")
    (name,) = [n for n in os.listdir(mount.path / "mail") if n not in ("next", "dead")]
    mount.kill9()
    mount.mount()  # durable like any mailbox
    assert mount.read(f"mail/{name}") == r.stdout
    mount.sh(f"rm mail/{h['id']}", check=True)
    assert sorted(os.listdir(mount.path / "mail")) == ["dead", "next"]
    r = mount.sh("echo 'spawn operator cmd=cat' > ctl")
    assert r.returncode != 0  # the name is taken
