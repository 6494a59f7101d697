"""An agent reading and driving an agent another node runs, through its view (issue 14,
items 1 and 5), compared with the same read or write of a twin on its own node: three
real nats-servers and three fs9 nodes on 127.0.0.1 (test_cluster.py's fixture)."""
import asyncio
import errno
import os
import shutil

import pytest

from conftest import errno_of, wait_for
from test_cluster import (LONG_S, cluster, kill_placed, kv, letters, live,  # noqa: F401
                          mailbox, results, spawn_again)  # (cluster: the fixture)


def _twins(nodes) -> None:
    """worker and top run on n3, their twins near and topnear on n1, with the readers:
    boss (pledges read and send) and blind (send only) on n1."""
    shown = '"agents" = "rw"\n'  # (not agents/topnear: unveiling it is refused at spawn)
    for m in nodes:
        m.define("worker", 'driver = "exec"\ncmd = ["cat"]\nrestart = "permanent"\n')
        m.define("top", 'driver = "exec"\ncmd = ["cat"]\nclearance = "confidential"\n')
        m.define("boss", 'driver = "exec"\ncmd = ["cat"]\npledge = ["read", "send"]\n'
                         f'[unveil]\n{shown}')
        m.define("blind", 'driver = "exec"\ncmd = ["cat"]\npledge = ["send"]\n'
                          f'[unveil]\n{shown}')
    n1, _, n3 = nodes
    for spec in ("worker node=n3", "near def=worker node=n1", "top node=n3",
                 "topnear def=top node=n1", "boss node=n1", "blind node=n1"):
        n1.write("nodes/ctl", f"spawn {spec}\n")
    for name, m in (("worker", n3), ("near", n1), ("top", n3), ("topnear", n1),
                    ("boss", n1), ("blind", n1)):
        wait_for(lambda: name in m.read("status").split(), LONG_S, f"{name} running")


def test_an_agent_reads_tasks_manifest_and_mail_of_another_nodes_agent_as_of_a_twin(cluster):
    """boss on n1 reads worker's (on n3) tasks/, a task's files, manifest, mailbox, a
    message, mail/next and mail/batch through its view, as it reads near's (worker's twin on n1);
    each refusal (no read pledge, a clearance below the agent's, no such task, a write
    to another's task or mail) the errno the twin's gives."""
    _, (n1, n2, n3) = cluster
    _twins((n1, n2, n3))
    for name, m in (("worker", n3), ("near", n1)):
        n2.write(f"agents/{name}/in", "hello\n")  # (the operator's, from a third node)
        wait_for(lambda: kv(m.read(f"agents/{name}/status"))["done"] == "1",
                 what=f"{name}'s task")
        n2.write(f"agents/{name}/mail/new", "type: event\n\nread me\n")
        wait_for(lambda: [n for n in os.listdir(m.path / f"agents/{name}/mail")
                          if n[0].isdigit()], what=f"{name}'s message")
    view = n1.path / "agents/boss/view/agents"
    got = {}
    for name, m in (("worker", n3), ("near", n1)):
        mine = m.path / f"agents/{name}"  # (as its own node's operator reads it)
        [task] = os.listdir(view / name / "tasks")
        assert [task] == os.listdir(mine / "tasks")
        files = sorted(os.listdir(view / name / "tasks" / task))
        status = kv((view / name / "tasks" / task / "status").read_text())
        assert status == kv((mine / "tasks" / task / "status").read_text())
        assert (view / name / "manifest").read_text() == (mine / "manifest").read_text()
        box = sorted(os.listdir(view / name / "mail"))
        assert box == sorted(os.listdir(mine / "mail"))
        [msg] = [n for n in box if n[0].isdigit()]
        text = (view / name / "mail" / msg).read_text()
        assert "from: operator\n" in text and text.endswith("\n\nread me\n")
        got[name] = dict(
            files=files, box=[n for n in box if not n[0].isdigit()],
            status=sorted(status), state=status["state"], body=text.split("\n\n", 1)[1],
            out=(view / name / "tasks" / task / "out").read_text(),
            err=(view / name / "tasks" / task / "err").read_text(),
            input=(view / name / "tasks" / task / "input").read_text(),
            next=(view / name / "mail/next").read_text().split("\n\n", 1)[1],
            ctl=(view / name / "ctl").read_text().split()[1:],  # (after the name)
            batch=[line.split("\t")[1:] for line in
                   (view / name / "mail/batch").read_text().splitlines()])
    assert got["worker"] == got["near"]
    assert got["worker"]["out"] == got["worker"]["input"] == "hello\n"
    assert got["worker"]["next"] == "read me\n"
    assert got["worker"]["batch"] == [["operator", "read me"]]
    # ctl's state line (the operator's, from another node, too), as its node renders it
    assert n1.read("agents/worker/ctl") == n3.read("agents/worker/ctl")
    assert n1.read("agents/worker/ctl").split()[:2] == ["worker", "idle"]
    assert "progress" in got["worker"]["files"] and got["worker"]["state"] == "done"
    # refusals: each the errno of the same call on the twin, boss's node's own agent
    blind = n1.path / "agents/blind/view/agents"
    task = os.listdir(n3.path / "agents/worker/tasks")[0]
    near_task = os.listdir(n1.path / "agents/near/tasks")[0]
    msg = [n for n in os.listdir(n3.path / "agents/worker/mail") if n[0].isdigit()][0]
    near_msg = [n for n in os.listdir(n1.path / "agents/near/mail") if n[0].isdigit()][0]
    for base, rel, call, want in (
            (blind, "X/tasks", os.listdir, None),  # (a listing needs no read pledge)
            (blind, "X/manifest", _read, errno.EACCES),  # a read does
            (blind, "X/mail", os.listdir, None),
            (blind, "X/mail/next", _read, errno.EACCES),
            (blind, "X/mail/batch", _read, errno.EACCES),
            (blind, "X/ctl", _read, errno.EACCES),
            (blind, "X/tasks/T/out", _read, errno.EACCES),
            (view, "TOP", os.listdir, errno.EACCES),  # top is above boss's clearance
            (view, "TOP/tasks", os.listdir, errno.EACCES),
            (view, "TOP/manifest", _read, errno.EACCES),
            (view, "TOP/mail", os.listdir, errno.EACCES),
            (view, "TOP/mail/next", _read, errno.EACCES),
            (view, "TOP/mail/batch", _read, errno.EACCES),
            (view, "TOP/ctl", _read, errno.EACCES),
            (view, "X/tasks/999/status", _read, errno.ENOENT),
            (view, "X/tasks/T/progress", _write, errno.EACCES),  # only X reports on it
            (view, "X/mail/M", os.unlink, errno.EACCES)):  # only X acknowledges it
        remote = rel.replace("TOP", "top").replace("X", "worker").replace("T", task) \
            .replace("M", msg)
        local = rel.replace("TOP", "topnear").replace("X", "near").replace("T", near_task) \
            .replace("M", near_msg)
        assert (errno_of(call, base / remote), errno_of(call, base / local)) == \
            (want, want), rel
    assert [n for n in os.listdir(n3.path / "agents/worker/mail") if n[0].isdigit()] == [msg]
    # a name spawned again inherits nothing: the killed holder's finished task, still in
    # its node's memory, is no task of the new worker's, through a view or not
    kill_placed(n1, "worker")
    for m in (n1, n3):
        wait_for(lambda: "worker" not in os.listdir(m.path / "agents"), LONG_S, "worker gone")
    spawn_again(n1, "worker", "n3")
    wait_for(lambda: "worker" in n3.read("status").split(), LONG_S, "worker again")
    for path in (view / "worker/tasks" / task / "status",
                 n1.path / "agents/worker/tasks" / task / "status",
                 n3.path / "agents/worker/tasks" / task / "status"):
        assert errno_of(_read, path) == errno.ENOENT, path
    assert os.listdir(view / "worker/tasks") == []
    for m in (n1, n2, n3):
        assert not m.bugs()


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _write(path) -> None:
    with open(path, "wb", buffering=0) as f:
        f.write(b"50%\n")


def stored(urls: str, agent: str) -> dict | None:
    """The headers of the last work FS9WORK holds for agent (not yet acked), read by the
    checker with its own client; None: none."""
    import nats

    async def read():
        nc = await nats.connect(servers=urls.split(","))
        try:
            msg = await nc.jetstream().get_last_msg("FS9WORK", f"fs9.work.{agent.encode().hex()}")
            return dict(msg.headers or {})
        except nats.js.errors.NotFoundError:
            return None
        finally:
            await nc.close()
    return asyncio.run(read())


def test_an_agents_work_for_an_agent_of_its_own_node_goes_through_jetstream(cluster):
    """boss's `in`, `ctl run` and mail/batch of near, placed in the cluster on boss's
    own node n1, are stored in FS9WORK as they are for an agent on another node: each
    task's result is in FS9RESULTS (only work from the stream has one), the batch is
    held there, from boss as n1 said, until near acks it; a task's result still comes
    back to its writer, placed in the cluster (boss) or n1's own agent (solo)."""
    nats_, (n1, n2, n3) = cluster
    shown = '"agents" = "rw"\n'
    for m in (n1, n2, n3):
        m.define("worker", 'driver = "exec"\ncmd = ["cat"]\nrestart = "permanent"\n')
        m.define("boss", 'driver = "exec"\ncmd = ["cat"]\npledge = ["read", "send", '
                         f'"spawn"]\n[unveil]\n{shown}')
    for spec in ("near def=worker node=n1", "boss node=n1"):
        n1.write("nodes/ctl", f"spawn {spec}\n")
    n1.write("ctl", "spawn solo def=boss\n")  # (n1's own, not placed in the cluster)
    for name in ("near", "boss", "solo"):
        wait_for(lambda: name in n1.read("status").split(), LONG_S, f"{name} running")
    boss, solo = "agents/boss/view/agents/near", "agents/solo/view/agents/near"
    for i, (path, data) in enumerate(((f"{boss}/in", "one\n"), (f"{boss}/ctl", "run two\n"),
                                      (f"{solo}/in", "three\n")), 1):
        n1.write(path, data)
        got = wait_for(lambda: len(results(nats_.urls, "near")) == i
                       and results(nats_.urls, "near"), what=f"result {i} in FS9RESULTS")
        assert sorted(r.get("out", "") for r in got) == sorted(["one\n", "two\n", "three\n"][:i])
    for writer, text in (("boss", "one\n"), ("solo", "three\n")):  # (ctl run: none, as on one node)
        [result] = wait_for(lambda: [t for t in letters(n1, writer) if "type: result" in t],
                            what=f"the result in {writer}'s mailbox")
        assert "from: near\n" in result and text in result
    assert kv(n1.read("agents/near/status"))["done"] == "3"
    n1.write(f"{boss}/mail/batch", "a\nb\n")
    held = stored(nats_.urls, "near")
    assert (held["Fs9-Kind"], held["Fs9-From"], held["Fs9-Node"]) == ("batch", "boss", "n1")
    lines = n1.read("agents/near/mail/batch").splitlines()
    assert sorted(line.split("\t")[1:] for line in lines) == [["boss", "a"], ["boss", "b"]]
    n1.write("agents/near/mail/ack", " ".join(line.split("\t")[0] for line in lines))
    wait_for(lambda: stored(nats_.urls, "near") is None, what="the batch acked in FS9WORK")
    n1.write(f"{boss}/ctl", "stop\n")  # (other verbs act on n1, as on one node)
    wait_for(lambda: kv(n1.read("agents/near/status"))["state"] == "stopped", what="stop")
    for m in (n1, n2, n3):
        assert not m.bugs()


def test_a_yes_is_not_used_by_a_message_the_cluster_did_not_store(cluster):
    """teller (n1) needs the operator's yes to mail keeper (n3) above internal: a
    message refused after the yes was given (over the 900 KiB a message of the work
    stream may hold: EFBIG) does not use it up; the next one goes with it, and then
    the one after that asks again (one yes, one message)."""
    _, (n1, n2, n3) = cluster
    for m in (n1, n2, n3):
        m.define("teller", 'driver = "exec"\ncmd = ["cat"]\nclearance = "confidential"\n'
                           'pledge = ["read", "send"]\n[approval]\nmail_above = "internal"\n'
                           '[unveil]\n"agents/keeper" = "rw"\n')
        m.define("keeper", 'driver = "exec"\ncmd = ["cat"]\nclearance = "confidential"\n')
    for spec in ("keeper node=n3", "teller node=n1"):
        n1.write("nodes/ctl", f"spawn {spec}\n")
    for name, m in (("keeper", n3), ("teller", n1)):
        wait_for(lambda: name in m.read("status").split(), LONG_S, f"{name} running")
    out, head = "agents/teller/outbox/keeper", "classification: confidential\n\n"
    assert errno_of(n1.write, out, head + "the plans\n") == errno.EAGAIN
    [aid] = os.listdir(n1.path / "approvals")
    n1.write(f"approvals/{aid}/ctl", "approve\n")
    assert errno_of(n1.write, out, head + "x" * (950 << 10) + "\n") == errno.EFBIG
    assert kv(n1.read(f"approvals/{aid}/status"))["used"] != "yes"
    n1.write(out, head + "the plans\n")  # (the same yes)
    assert kv(n1.read(f"approvals/{aid}/status"))["used"] == "yes"
    [letter] = wait_for(lambda: letters(n3, "keeper"), what="the plans on n3")
    assert letter.endswith("\n\nthe plans\n") and "from: teller\n" in letter
    assert errno_of(n1.write, out, head + "again\n") == errno.EAGAIN  # one yes, one message
    assert len(os.listdir(n1.path / "approvals")) == 2
    for m in (n1, n2, n3):
        assert not m.bugs()


@pytest.mark.timeout(240)  # (a busy 2-core machine: about 40 s when quiet)
def test_an_agents_work_for_its_own_nodes_agent_outlives_that_node(cluster):
    """boss and napper both on n2: boss's `in` and `ctl run` tasks of napper and its
    mail/batch, acknowledged, then kill -9 of n2 (its fs9 and its nats-server), its
    state deleted: napper runs again on a survivor with every task run (the one that
    was running again) and the batch in its mailbox, from boss."""
    nats_, (n1, n2, n3) = cluster
    for m in (n1, n2, n3):
        m.define("napper", 'driver = "exec"\ncmd = ["sh", "-c", "read s; sleep $s; '
                           'echo slept $s"]\nrestart = "permanent"\n')
        m.define("boss", 'driver = "exec"\ncmd = ["cat"]\nrestart = "permanent"\n'
                         'pledge = ["read", "send", "spawn"]\n[unveil]\n"agents" = "rw"\n')
    for spec in ("napper node=n2", "boss node=n2"):
        n1.write("nodes/ctl", f"spawn {spec}\n")
    for name in ("napper", "boss"):
        wait_for(lambda: name in n2.read("status").split(), LONG_S, f"{name} on n2")
    view = "agents/boss/view/agents/napper"
    n2.write(f"{view}/in", "3\n")
    wait_for(lambda: kv(n2.read("agents/napper/status"))["state"] == "running",
             what="the first task running")
    n2.write(f"{view}/ctl", "run 1\n")
    n2.write(f"{view}/ctl", "run 2\n")
    n2.write(f"{view}/mail/batch", "a\nb\n")
    n2.kill9()
    nats_.servers[1].kill9()
    shutil.rmtree(n2.state)
    urls = live(nats_)
    survivor = wait_for(lambda: next((m for m in (n1, n3)
                                      if "napper" in m.read("status").split()), None),
                        LONG_S, "napper running on a survivor")
    got = wait_for(lambda: {"slept 3\n", "slept 1\n", "slept 2\n"} <= {
        r.get("out") for r in results(urls, "napper")} and results(urls, "napper"),
        LONG_S, "every task's result")
    assert {r.get("out") for r in got} == {"slept 3\n", "slept 1\n", "slept 2\n"}
    assert sorted(wait_for(lambda: mailbox(survivor, "napper"), LONG_S, "the batch")) == \
        [("boss", "a"), ("boss", "b")]
    assert not survivor.bugs()
