"""Supervision trees (kernel/supervisor.py decides, kernel/supervision.py acts): the
strategies as pure functions, then real trees of real crashing agents on a mount."""
import json
import os

import pytest

from fs9.errors import Fs9Error
from fs9.kernel.agents import manifest
from fs9.kernel.supervisor import Child, children, plan, shutdown_s

KIDS = [("a", "permanent"), ("crash", "transient"), ("b", "permanent")]


# --- the strategies, pure -----------------------------------------------------------

def test_one_for_one_restarts_only_the_child_that_died():
    assert plan("one_for_one", KIDS, "crash") == ([], ["crash"])


def test_one_for_all_terminates_the_others_last_first_and_restarts_all_in_order():
    assert plan("one_for_all", KIDS, "crash") == (["b", "a"], ["a", "crash", "b"])


def test_rest_for_one_restarts_the_child_and_those_started_after_it():
    assert plan("rest_for_one", KIDS, "crash") == (["b"], ["crash", "b"])
    assert plan("rest_for_one", KIDS, "b") == ([], ["b"])
    assert plan("rest_for_one", KIDS, "a") == (["b", "crash"], ["a", "crash", "b"])


def test_a_temporary_sibling_is_terminated_and_not_restarted():
    kids = [("a", "temporary"), ("crash", "permanent"), ("b", "transient")]
    terminate, start = plan("one_for_all", kids, "crash")
    assert terminate == ["b", "a"] and start == ["crash", "b"]


def test_children_specs_and_shutdown_policies():
    assert children(["w", {"name": "x", "def": "worker", "shutdown": "brutal_kill"},
                     {"name": "y", "shutdown": 5}]) == [
        Child("w", "w"), Child("x", "worker", 0.0), Child("y", "y", 5.0)]
    assert shutdown_s(None) == 2.0
    for bad, words in (([{"name": "x", "shutdown": 0}], "shutdown"),
                       ([{"name": "x", "shutdown": "infinity"}], "brutal_kill"),
                       ([{"name": "x", "restart": "permanent"}], "unknown key"),
                       (["x", "x"], "named twice"), ([{"def": "x"}], "with a name"),
                       ("x", "list")):
        with pytest.raises(ValueError, match=words):
            children(bad)


def test_a_supervisor_manifest_is_checked():
    m = manifest.check({"mode": "supervisor", "children": ["a"]}, "t")
    assert m["strategy"] == "one_for_one" and m["cmd"] == []
    assert 'children = ["a"]' in manifest.render(m)
    tabled = manifest.check({"mode": "supervisor", "children": [{"name": "a", "def": "w"}]}, "t")
    assert 'children = [{ name = "a", def = "w" }]' in manifest.render(tabled)
    for raw, words in (({"mode": "supervisor", "strategy": "all_for_none"}, "strategy"),
                       ({"mode": "supervisor", "cmd": ["sh"]}, "runs no program"),
                       ({"mode": "daemon", "cmd": ["sh"], "children": ["a"]}, "supervisor's keys"),
                       ({"mode": "supervisor", "children": [{"name": 3}]}, "with a name")):
        with pytest.raises(Fs9Error, match=words):
            manifest.check(raw, "t")


# --- real trees on a mount ------------------------------------------------------------

UP = 'mode = "daemon"\nrestart = "permanent"\ncmd = ["sh", "-c", "echo up; exec sleep 600"]\n'
CRASH = 'mode = "daemon"\nrestart = "permanent"\ncmd = ["sh", "-c", "exit 1"]\n'


def define_tree(mount, strategy: str) -> None:
    """top (one_for_one, 1 restart) > mid (STRATEGY, 2 restarts) > a, crash, b."""
    mount.define("top", 'mode = "supervisor"\nmax_restarts = 1\nwithin_s = 600\n'
                        'children = ["mid"]\n')
    mount.define("mid", f'mode = "supervisor"\nstrategy = "{strategy}"\nmax_restarts = 2\n'
                        'within_s = 600\nchildren = ["a", {name = "crash", def = "crasher", '
                        'shutdown = "brutal_kill"}, "b"]\n')
    mount.define("a", UP)
    mount.define("b", UP)
    mount.define("crasher", CRASH)


def restarts(mount) -> dict[str, int]:
    return {name: int(mount.status(name)["restarts"]) for name in ("a", "crash", "b", "mid")}


@pytest.mark.parametrize("strategy, expected", [
    # crash dies 3 times per life of mid (2 restarts, then mid gives up); top restarts
    # mid's subtree once (everything +1), then mid and top give up
    ("one_for_one", {"a": 1, "crash": 5, "b": 1, "mid": 1}),
    ("one_for_all", {"a": 5, "crash": 5, "b": 5, "mid": 1}),
    ("rest_for_one", {"a": 1, "crash": 5, "b": 5, "mid": 1}),
])
def test_a_crashing_grandchild_is_restarted_per_strategy_then_escalated(
        mount, events, strategy, expected):
    define_tree(mount, strategy)
    mount.sh("echo 'spawn top' > ctl", check=True)
    seen = events.wait_kind("escalated", timeout=90)
    mount.wait_for(lambda: mount.status("top")["state"] == "failed", what="top failed")
    assert restarts(mount) == expected
    ours = [e for e in seen if e["kind"] == "supervisor_restart"]
    assert [e["agent"] for e in ours] == ["mid", "mid", "top", "mid", "mid"]
    assert ours[0]["strategy"] == strategy and ours[0]["child"] == "crash"
    assert ours[2]["child"] == "mid" and "gave up" in ours[2]["reason"]
    escalated = next(e for e in seen if e["kind"] == "escalated")
    assert escalated["agent"] == "top" and "more than 1 restarts within 600s" in escalated["reason"]
    # the whole tree is down, and says why
    st = mount.status("top")
    assert "gave up" in st["reason"]
    mount.wait_for(lambda: all(mount.status(n)["state"] in ("stopped", "failed")
                               for n in ("a", "crash", "b", "mid")), what="the subtree stopped")
    # the operator hears of it in its mail/
    mail = [mount.read(f"mail/{name}") for name in os.listdir(mount.path / "mail")
            if name not in ("next", "dead")]
    [letter] = [m for m in mail if "type: escalation" in m]
    assert "from: top" in letter and "top failed" in letter and "\n  mid failed" in letter
    # start acts on the subtree: every agent in it starts again (and crash crashes again,
    # up to the operator once more)
    mount.sh("echo start > agents/top/ctl", check=True)
    again = events.until(lambda got: {"top", "mid", "a", "crash", "b"} <= {
        e["agent"] for e in got if e["kind"] == "agent_start"}
        and any(e["kind"] == "escalated" for e in got), timeout=90, what="the tree again")
    assert [e["agent"] for e in again if e["kind"] == "agent_start"][:5] == \
        ["top", "mid", "a", "crash", "b"]  # parents first, children in start order


def test_the_tree_as_files_and_stop_start_restart_act_on_the_subtree(mount):
    mount.define("team", 'mode = "supervisor"\nstrategy = "one_for_all"\n'
                         'children = ["w1", {name = "w2", def = "w1"}]\n')
    mount.define("w1", UP)
    mount.sh("echo 'spawn team' > ctl && echo 'spawn solo cmd=cat' > ctl", check=True)
    assert mount.read("agents/team/children") == "w1\nw2\n"
    assert mount.read("agents/w2/supervisor") == "team\n"
    assert mount.read("agents/team/supervisor") == "" and mount.read("agents/w1/children") == ""
    mount.wait_for(lambda: all(mount.status(n)["state"] == "running" for n in ("w1", "w2")),
                   what="w1 and w2 running")
    tree = mount.read("tree").splitlines()
    assert tree[0] == "solo idle restarts=0"
    assert tree[1] == "team running restarts=0 strategy=one_for_all intensity=3/60s"
    assert tree[2:] == ["  w1 running restarts=0", "  w2 running restarts=0"]
    # stop: the subtree stops (children first), and nothing restarts it
    mount.sh("echo stop > agents/team/ctl", check=True)
    mount.wait_for(lambda: all(mount.status(n)["state"] == "stopped" for n in ("team", "w1", "w2")),
                   what="the subtree stopped")
    mount.sh("echo start > agents/team/ctl", check=True)
    mount.wait_for(lambda: mount.status("w1")["pid"].isdigit() and mount.status("w2")["pid"].isdigit(),
                   what="the subtree running again")
    pids = {n: mount.status(n)["pid"] for n in ("w1", "w2")}
    mount.sh("echo restart > agents/team/ctl", check=True)
    mount.wait_for(lambda: all(mount.status(n)["pid"].isdigit() and mount.status(n)["pid"] != pids[n]
                               for n in ("w1", "w2")), what="both children restarted")
    assert [mount.status(n)["restarts"] for n in ("team", "w1", "w2")] == ["1", "1", "1"]
    # a supervisor takes no tasks; kill takes its subtree with it
    r = mount.sh("echo 'run x' > agents/team/ctl")
    assert r.returncode != 0 and "supervisor agent and takes no tasks" in mount.read("agents/team/err")
    mount.sh("echo 'kill team' > ctl", check=True)
    assert sorted(os.listdir(mount.path / "agents")) == ["solo"]


def test_a_tree_is_spawned_whole_or_not_at_all(mount):
    mount.define("team", 'mode = "supervisor"\nchildren = ["ok", "missing"]\n')
    mount.define("ok", UP)
    r = mount.sh("echo 'spawn team' > ctl")
    assert r.returncode != 0
    assert os.listdir(mount.path / "agents") == []
    mount.define("loop", 'mode = "supervisor"\nchildren = [{name = "again", def = "loop"}]\n')
    assert mount.sh("echo 'spawn loop' > ctl").returncode != 0
    mount.sh("echo 'spawn ok' > ctl", check=True)  # a child's name in use: EEXIST, nothing spawned
    mount.define("team2", 'mode = "supervisor"\nchildren = ["ok"]\n')
    assert mount.sh("echo 'spawn team2' > ctl").returncode != 0
    assert os.listdir(mount.path / "agents") == ["ok"]
    refused = [json.loads(line) for line in mount.read("log/audit").splitlines()
               if '"refused"' in line]
    assert any("no agent definition 'missing'" in e["reason"] for e in refused)
    assert any("nested deeper than 8" in e["reason"] for e in refused)
    assert any("'ok' exists already" in e["reason"] for e in refused)


def test_shutdown_policy_sigterm_then_sigkill_or_brutal_kill(mount):
    """A child that traps SIGTERM hears it (shutdown = N s); brutal_kill sends SIGKILL
    at once, so its trap never runs. (Unconfined, so that it can leave a mark on disk.)"""
    marks = mount.root / "marks"
    marks.mkdir()
    mount.define("trapper", 'mode = "daemon"\nrestart = "permanent"\nunconfined = true\n'
                 'cmd = ["sh", "-c", "trap \'echo term > $MARKS/$FS9_AGENT; exit 0\' TERM; '
                 'touch $MARKS/$FS9_AGENT.up; while :; do sleep 0.1; done"]\n'
                 f'[env]\nMARKS = "{marks}"\n')
    mount.define("pair", 'mode = "supervisor"\nchildren = [{name = "gentle", def = "trapper", '
                         'shutdown = 10}, {name = "brutal", def = "trapper", '
                         'shutdown = "brutal_kill"}]\n')
    mount.sh("echo 'spawn pair' > ctl", check=True)
    mount.wait_for(lambda: (marks / "gentle.up").exists() and (marks / "brutal.up").exists(),
                   what="both traps set")
    mount.sh("echo stop > agents/pair/ctl", check=True)
    mount.wait_for(lambda: all(mount.status(n)["state"] == "stopped" for n in ("gentle", "brutal")),
                   what="both stopped")
    assert (marks / "gentle").read_text() == "term\n"
    assert not (marks / "brutal").exists()


def test_an_agent_may_not_command_a_supervisor(mount):
    """Acting on a supervisor acts on agents the asker may not see: the operator's alone."""
    mount.define("team", 'mode = "supervisor"\nchildren = ["w1"]\n')
    mount.define("w1", UP)
    mount.define("boss", 'cmd = ["cat"]\npledge = ["read", "spawn"]\n'
                         '[unveil]\n"agents/team" = "rw"\n"ctl" = "rw"\n')
    mount.sh("echo 'spawn team' > ctl && echo 'spawn boss' > ctl", check=True)
    mount.wait_for(lambda: mount.status("w1")["state"] == "running", what="w1 running")
    for path, line in (("agents/boss/view/agents/team/ctl", "stop"),
                       ("agents/boss/view/ctl", "kill team")):
        assert mount.sh(f"echo '{line}' > {path}").returncode != 0
    assert mount.status("team")["state"] == "running" and mount.status("w1")["state"] == "running"
    refused = [json.loads(line)["reason"] for line in mount.read("log/audit").splitlines()
               if '"refused"' in line]
    assert sum("supervision trees are the operator's" in r for r in refused) == 2


def operator_mail(mount, kind: str) -> list[str]:
    return [text for text in (mount.read(f"mail/{name}") for name in os.listdir(mount.path / "mail")
                              if name not in ("next", "dead")) if f"type: {kind}" in text]


def test_a_daemon_nobody_supervises_escalates_to_the_operator(mount, events):
    mount.define("lone", CRASH + "max_restarts = 1\n")
    mount.sh("echo 'spawn lone' > ctl", check=True)
    seen = events.wait_kind("escalated")
    assert [e["kind"] for e in seen].count("agent_restart") == 1
    [letter] = operator_mail(mount, "escalation")
    assert "from: lone" in letter and "more than 1 restarts within 60s" in letter


def test_the_tree_survives_a_new_mount(mount):
    mount.define("team", 'mode = "supervisor"\nstrategy = "rest_for_one"\n'
                         'children = ["w1", {name = "sub", def = "subsup"}]\n')
    mount.define("subsup", 'mode = "supervisor"\nchildren = [{name = "w2", def = "w1"}]\n')
    mount.define("w1", UP)
    mount.sh("echo 'spawn team' > ctl", check=True)
    both_running = lambda: all(mount.status(n)["state"] == "running" for n in ("w1", "w2"))
    mount.wait_for(both_running, what="w1 and w2 running")
    before = mount.read("tree")
    assert before.splitlines()[2:] == ["  sub running restarts=0 strategy=one_for_one "
                                       "intensity=3/60s", "    w2 running restarts=0"]
    mount.umount()
    mount.mount()
    mount.wait_for(both_running, what="w1 and w2 running again")
    assert mount.read("tree") == before
    assert mount.read("agents/w2/supervisor") == "sub\n"
    assert mount.read("agents/team/children") == "w1\nsub\n"
