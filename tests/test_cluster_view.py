"""An agent reading and driving an agent another node runs, through its view (issue 14,
items 1 and 5), compared with the same read or write of a twin on its own node: three
real nats-servers and three fs9 nodes on 127.0.0.1 (test_cluster.py's fixture)."""
import errno
import os

from conftest import errno_of, wait_for
from test_cluster import LONG_S, cluster, kv  # noqa: F401 (cluster: the fixture)


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
    message and mail/next through its view, as it reads near's (worker's twin on n1);
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
            next=(view / name / "mail/next").read_text().split("\n\n", 1)[1])
    assert got["worker"] == got["near"]
    assert got["worker"]["out"] == got["worker"]["input"] == "hello\n"
    assert got["worker"]["next"] == "read me\n"
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
            (blind, "X/tasks/T/out", _read, errno.EACCES),
            (view, "TOP", os.listdir, errno.EACCES),  # top is above boss's clearance
            (view, "TOP/tasks", os.listdir, errno.EACCES),
            (view, "TOP/manifest", _read, errno.EACCES),
            (view, "TOP/mail", os.listdir, errno.EACCES),
            (view, "TOP/mail/next", _read, errno.EACCES),
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
    for m in (n1, n2, n3):
        assert not m.bugs()


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _write(path) -> None:
    with open(path, "wb", buffering=0) as f:
        f.write(b"50%\n")
