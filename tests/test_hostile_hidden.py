"""A hidden agent is indistinguishable from one that does not exist (issue 20, item 5):
every way an agent can name another (its outbox, a reply-to, a correlation id, the
ctl words, the paths of agents/, the registry, the reasons of a refused spawn) answers
the same errno and the same words for an agent outside its view as for a name nobody
has, and leaves it nothing else to see (no mail, no line in its err that differs).

Requests come through the prober's view (`agents/spy/view/...`), exactly the directory
a confined agent's sandbox binds over the mount: the view is the identity."""
import errno
import json
import os

import pytest

from conftest import errno_of

SPY = ('cmd = ["cat"]\nunconfined = true\npledge = ["read", "send", "spawn"]\n'
       'spawns = ["echo", "rival", "peek"]\n[unveil]\n"ctl" = "w"\n')
VICTIM = ('cmd = ["cat"]\nunconfined = true\nclearance = "confidential"\n'
          'owns = ["vault/v"]\n')


@pytest.fixture
def spy(mount):
    (mount.vault / "v").mkdir()
    mount.define("spy", SPY)
    mount.define("victim", VICTIM)
    mount.define("rival", 'cmd = ["cat"]\nunconfined = true\nowns = ["vault/v/sub"]\n')
    mount.define("peek", 'cmd = ["cat"]\nunconfined = true\nclearance = "public"\n'
                 '[unveil]\n"agents/victim/memory" = "r"\n')
    mount.sh("echo 'spawn victim' > ctl; echo 'spawn spy' > ctl", check=True)
    mount.write("agents/victim/in", "its work\n")  # a task: a correlation id of its own
    mount.wait_for(lambda: mount.status("victim")["done"] == "1", what="victim's task")
    return mount


def refused(mount) -> list[str]:
    return [e["reason"] for e in map(json.loads, mount.read("log/audit").splitlines())
            if e["kind"] == "refused" and e.get("agent") == "spy"]


def observe(mount, probe, name: str) -> tuple:
    """What spy sees of probe(name): its errno, the lines it adds to spy's err and the
    refusals logged for it (the name written NAME), spy's mail; and what reached the
    victim (its mail, its tasks), which must be nothing."""
    err, logged = mount.read("agents/spy/err"), len(refused(mount))
    victim = (sorted(os.listdir(mount.path / "agents/victim/mail")),
              mount.status("victim")["latest"])
    code = errno_of(probe, name)
    said = mount.read("agents/spy/err")[len(err):].replace(name, "NAME")
    reasons = [r.replace(name, "NAME") for r in refused(mount)[logged:]]
    assert (sorted(os.listdir(mount.path / "agents/victim/mail")),
            mount.status("victim")["latest"]) == victim, "something reached the victim"
    mail = sorted(os.listdir(mount.path / "agents/spy/mail"))
    return code, said, reasons, mail


def write(mount, rel: str, text: str) -> None:
    with open(mount.path / "agents/spy/view" / rel, "w") as f:
        f.write(text)


PROBES = {
    "outbox": lambda m, n: write(m, f"agents/spy/outbox/{n}", "type: work_request\n\nhi\n"),
    "reply-to": lambda m, n: write(m, "agents/spy/mail/new", f"reply-to: {n}\n\nhi\n"),
    "kill": lambda m, n: write(m, "ctl", f"kill {n}\n"),
    "in": lambda m, n: write(m, f"agents/{n}/in", "hi\n"),
    "mail": lambda m, n: write(m, f"agents/{n}/mail/new", "hi\n"),
    "ctl": lambda m, n: write(m, f"agents/{n}/ctl", "stop\n"),
    "stat": lambda m, n: os.stat(m.path / "agents/spy/view/agents" / n),
    "memory": lambda m, n: open(m.path / f"agents/spy/view/agents/{n}/memory/x").close(),
    "registry": lambda m, n: open(m.path / f"agents/spy/view/registry/{n}").close(),
}


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_a_hidden_agent_answers_as_no_agent(spy, probe):
    hidden = observe(spy, lambda n: PROBES[probe](spy, n), "victim")
    absent = observe(spy, lambda n: PROBES[probe](spy, n), "ghost")
    assert hidden == absent
    assert hidden[0] is not None  # refused, both


def test_a_correlation_id_of_a_hidden_agent_answers_as_a_made_up_one(spy):
    task = spy.status("victim")["latest"]
    corr = dict(line.split("=", 1) for line in
                spy.read(f"agents/victim/tasks/{task}/status").splitlines())["corr"]

    def send(c):
        write(spy, "agents/spy/mail/new", f"correlation-id: {c}\n\nI am part of it\n")
    assert observe(spy, send, corr) == observe(spy, send, "0123456789abcdef")


def test_the_reasons_of_a_refused_spawn_name_no_hidden_agent(spy):
    """A definition spy may start claims a subtree inside victim's, or unveils victim's
    memory to a public agent: refused, without the victim's name (the operator is told)."""
    ctl = "agents/spy/view/ctl"
    assert errno_of(spy.write, ctl, "spawn r1 def=rival\n") == errno.EBUSY
    assert errno_of(spy.write, ctl, "spawn p1 def=peek\n") == errno.EACCES
    said = spy.read("agents/spy/err")
    assert "owned by an agent outside your view" in said and "another agent's directory" in said
    assert "victim" not in said and not any("victim" in r for r in refused(spy))
    assert errno_of(spy.write, "ctl", "spawn r1 def=rival\n") == errno.EBUSY
    assert "owned by agent victim" in spy.read("log/audit")  # the operator's own refusal


def test_a_hidden_name_cannot_be_spawned_and_says_only_that_it_is_taken(spy):
    """Names are unique, so spawning a hidden agent's name must fail: with the very
    answer a visible agent's name gets (EEXIST, the same words), nothing more."""
    spy.write("agents/spy/view/ctl", "spawn mine def=echo\n")  # spy sees what it started
    ctl = "agents/spy/view/ctl"
    taken = [observe(spy, lambda n: spy.write(ctl, f"spawn {n} def=echo\n"), n)
             for n in ("mine", "victim")]
    assert taken[0] == taken[1] and taken[0][0] == errno.EEXIST
    assert "agent already exists: NAME" in taken[0][1]


def test_an_agent_mails_the_agents_it_knows_of(spy):
    """What makes an agent known: its view shows it (its mail, here), it started it, it
    pledges discover; it then mails it through its outbox as before."""
    spy.define("friend", SPY.replace('"ctl" = "w"', '"agents/victim/mail" = "w"'))
    spy.define("scout", SPY.replace('"send", "spawn"', '"send", "discover"'))
    spy.sh("echo 'spawn friend' > ctl; echo 'spawn scout' > ctl", check=True)
    spy.write("agents/spy/view/ctl", "spawn mine def=echo\n")
    for sender, to in (("friend", "victim"), ("scout", "victim"), ("spy", "mine")):
        with open(spy.path / f"agents/{sender}/view/agents/{sender}/outbox/{to}", "w") as f:
            f.write(f"hello from {sender}\n")
        assert any(f"hello from {sender}" in spy.read(f"agents/{to}/mail/{n}")
                   for n in os.listdir(spy.path / f"agents/{to}/mail") if n[0].isdigit())
