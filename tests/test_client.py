"""fs9.client against a real mount: spawn, a task run and streamed, mail both ways,
topics, the registry and its A2A cards (validated by the A2A SDK's own types), traces;
an agent's view through the client hides what fs9 hides and follows no symlink."""
import errno
import os
import threading

import pytest

from conftest import errno_of
from fs9.client import Mount
from fs9.drivers import confine

pytestmark = pytest.mark.skipif(confine.unavailable() is not None,
                                reason=f"cannot confine here: {confine.unavailable()}")

WORKER = """
cmd = ["tr", "a-z", "A-Z"]
description = "upper-cases what it is given"
provides = ["shouting", "caps"]
accepts = ["work_request", "event"]
sla = "answers within 5 s"
pledge = ["read", "send", "discover"]
[unveil]
"vault/pub" = "r"
"""


@pytest.fixture
def fs(mount):
    mount.define("worker", WORKER)
    (mount.vault / "pub").mkdir()
    (mount.vault / "pub/a.md").write_text("the orchard grows red apples\n")
    (mount.vault / "private.md").write_text("not for the worker\n")
    m = Mount(str(mount.path))
    m.spawn("worker")
    m.spawn("echo")
    return m


def test_a_task_runs_and_streams(fs):
    task = fs.run("worker", "one two\n")
    assert "".join(task.out()) == "ONE TWO\n"
    status = task.status()
    assert status["state"] == "done" and status["agent"] == "worker"
    second = fs.run("worker", "three\n")
    assert second.id > task.id and second.wait() == "THREE\n"
    corr = status["corr"]
    assert any(e["kind"] == "task_done" for e in fs.trace(corr)), fs.trace(corr)


def test_concurrent_runs_each_find_their_own_task(fs):
    got: dict[int, str] = {}

    def one(i: int) -> None:
        got[i] = fs.run("worker", f"job {i}\n").wait()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == {i: f"JOB {i}\n" for i in range(4)}


def test_mail_round_trip_and_topics(fs):
    fs.send("echo", "ping\n", type="work_request")
    reply = fs.wait_mail(lambda m: m.headers.get("type") == "result", timeout=30)
    assert reply.body == "ping\n" and reply.headers["from"] == "echo"
    fs.ack(reply)
    assert reply.name not in fs.listdir("mail")
    fs.publish("news", "first")
    events = fs.stream("topics/news", timeout=30)
    fs.publish("news", "second")
    assert next(events) == "second\n"
    events.close()


def test_registry_and_a2a_cards(fs):
    entry = fs.registry("worker")
    assert entry["provides"] == ["shouting", "caps"] and entry["sla"] == ["answers within 5 s"]
    card = fs.card("worker")
    assert card["name"] == "worker" and card["version"]
    assert [s["id"] for s in card["skills"]] == ["shouting", "caps"]
    assert card["skills"][0]["tags"] == ["shouting", "work_request", "event"]
    assert "answers within 5 s" in card["description"]
    assert "cards" in fs.listdir("registry") and "worker" in fs.listdir("registry/cards")
    a2a = pytest.importorskip("a2a.types.a2a_pb2", reason="a2a-sdk (the test extra) not installed")
    from google.protobuf import json_format
    parsed = json_format.ParseDict(card, a2a.AgentCard())  # unknown fields refused
    assert parsed.skills[1].name == "caps" and parsed.default_input_modes == ["text/plain"]
    assert errno_of(fs.read, "registry/cards/nobody") == errno.ENOENT
    # the view: registry/ with the discover pledge, and only what it unveils
    view = fs.as_agent("worker")
    assert view.card("echo")["name"] == "echo"
    assert view.listdir("vault") == ["pub"]


def test_a_view_through_the_client_hides_and_follows_no_link(fs, mount, tmp_path):
    view = fs.as_agent("worker")
    assert view.read("vault/pub/a.md") == "the orchard grows red apples\n"
    assert errno_of(view.read, "vault/private.md") == errno.ENOENT
    assert errno_of(view.read, "../../../vault/private.md") == errno.EINVAL
    assert errno_of(view.write, "vault/pub/a.md", "x") == errno.EACCES
    assert fs.last_note("worker").startswith("fs9: ") and "vault/pub/a.md" in fs.last_note("worker")
    assert errno_of(view.read, "vault/pub/a\0.md") == errno.EINVAL
    assert errno_of(fs.as_agent, "worker/view/agents/echo") == errno.EINVAL
    assert errno_of(lambda: fs.send("echo", "hi", type="event\nreply-to: worker")) == errno.EINVAL
    assert fs.as_agent("echo").mail() == []  # nothing reached echo
    os.mkfifo(mount.vault / "pub/fifo")  # nobody reads it: neither call may block
    assert errno_of(fs.read, "vault/pub/fifo") == errno.EINVAL
    assert errno_of(fs.write, "vault/pub/fifo", "x") == errno.ENXIO
    (tmp_path / "host.txt").write_text("host canary")
    (mount.vault / "pub/link").symlink_to(tmp_path / "host.txt")
    assert errno_of(fs.read, "vault/pub/link") == errno.ELOOP  # the operator's mount too
    assert errno_of(view.read, "vault/pub/link") == errno.ELOOP
    assert (mount.vault / "pub/a.md").read_text() == "the orchard grows red apples\n"
    audit = mount.read("log/audit")
    assert '"kind":"unveil_denied","agent":"worker","path":"vault/private.md"' in audit
