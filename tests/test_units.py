"""Kernel logic without FUSE: parsers, manifests, supervisor, lifecycle, replay."""
import errno

import pytest
import trio

from fs9.errors import Fs9Error
from fs9.kernel import cmd
from fs9.kernel.agents import manifest
from fs9.kernel.agents.agent import CMDS as AGENT_CMDS
from fs9.kernel.kernel import Kernel
from fs9.kernel.supervisor import RestartWindow, should_restart
from fs9.kernel.task import BadTransition, Task


def test_parse_table_checks_every_line_and_quotes_the_bad_one():
    parsed = cmd.parse(AGENT_CMDS, b"run hello   world\npriority background\n")
    assert [(p.cmd.verb, p.args) for p in parsed] == [
        ("run", ["hello   world"]), ("priority", ["background"])]
    with pytest.raises(Fs9Error) as e:
        cmd.parse(AGENT_CMDS, b"stop\nfrobnicate now\n")
    assert e.value.errno == errno.EINVAL and "'frobnicate now'" in e.value.text
    for bad in (b"priority", b"stop now", b"run", b"", b"\xff\xfe"):
        with pytest.raises(Fs9Error) as e:
            cmd.parse(AGENT_CMDS, bad)
        assert e.value.errno == errno.EINVAL


def test_manifest_check_fills_defaults_and_names_the_bad_field():
    m = manifest.check({"cmd": "python3 main.py --x 'a b'"}, "t")
    assert m["cmd"] == ["python3", "main.py", "--x", "a b"]
    assert m["restart"] == "transient" and m["mode"] == "task"
    for raw, word in (({"cmd": []}, "cmd"), ({"cmd": ["x"], "restart": "sometimes"}, "restart"),
                      ({"cmd": ["x"], "cdm": 1}, "unknown key"),
                      ({"cmd": ["x"], "max_restarts": -1}, "max_restarts")):
        with pytest.raises(Fs9Error) as e:
            manifest.check(raw, "agents/x/agent.toml")
        assert e.value.errno == errno.EINVAL and word in e.value.text
    assert manifest.parse_override("max_restarts=5") == ("max_restarts", 5)
    assert manifest.parse_override("cmd=cat -n") == ("cmd", "cat -n")
    assert manifest.parse_override('cmd=["tr", "a", "b"]') == ("cmd", ["tr", "a", "b"])


def test_supervisor_policies_and_intensity():
    assert should_restart("permanent", 0) and should_restart("permanent", 1)
    assert not should_restart("transient", 0) and should_restart("transient", 3)
    assert not should_restart("temporary", 1)
    w = RestartWindow(max_restarts=2, within_s=10)
    assert w.add(0) and w.add(1) and not w.add(2)  # a third restart within 10 s: give up
    w = RestartWindow(max_restarts=2, within_s=10)
    assert w.add(0) and w.add(1) and w.add(11) and w.add(12)  # old ones left the window


def test_task_lifecycle_table():
    t = Task(1, "a", "c")
    t.move("running")
    t.move("interrupted")
    t.move("queued")
    t.move("running")
    t.move("done")
    with pytest.raises(BadTransition):
        t.move("running")


async def test_kernel_runs_a_task_and_replays_it(tmp_path):
    state, agents = tmp_path / "state", tmp_path / "agents"
    agents.mkdir()
    k = Kernel(str(state), str(agents))
    async with trio.open_nursery() as nursery:
        await nursery.start(k.serve)
        k.ctl(b"spawn up cmd='tr a-z A-Z' unconfined=true")
        task = k.agents["up"].run("hello")
        with trio.fail_after(10):
            while not task.final:
                await task.changes.wait_past(task.changes.version)
        assert task.state == "done" and bytes(k.stream(task, 1).data) == b"HELLO\n"
        nursery.cancel_scope.cancel()
    k.log.close()
    # a fresh kernel on the same log has the same agent and the same finished output
    k2 = Kernel(str(state), str(agents))
    async with trio.open_nursery() as nursery:
        await nursery.start(k2.serve)
        t2 = k2.tasks[task.id]
        assert t2.state == "done" and bytes(k2.stream(t2, 1).data) == b"HELLO\n"
        assert k2.task_input(t2) == b"hello\n"
        with pytest.raises(Fs9Error) as e:
            k2.ctl(b"spawn up cmd=cat unconfined=true")
        assert e.value.errno == errno.EEXIST
        nursery.cancel_scope.cancel()
    k2.log.close()


# --- views (kernel/agents/view.py): pure functions over a manifest ---------------------------

def test_view_access_follows_unveil_ownership_and_pledges():
    from fs9.kernel.agents import view
    v = view.parse("scout", {"pledge": ["read", "publish", "discover"],
                             "unveil": {"topics/news": "rw", "vault/docs": "r",
                                        "vault/docs/drafts": "w"},
                             "owns": ["vault/code"]})
    assert v.access(()) == v.access(("agents",)) == "r"  # the way in
    assert v.access(("agents", "scout", "out")) == "rw"  # its own folder
    assert v.access(("agents", "scout", "view")) is None  # never a view in a view
    assert v.access(("agents", "other")) is None and v.access(("ctl",)) is None
    assert v.access(("topics",)) == "r" and v.access(("topics", "news")) == "rw"
    assert v.access(("topics", "secret")) is None
    assert v.access(("vault", "docs", "a.md")) == "r"
    assert v.access(("vault", "docs", "drafts", "b.md")) == "w"  # the longest prefix wins
    assert v.access(("vault", "code", "x.py")) == "rw" and v.access(("registry",)) == "r"
    assert v.pledge_for(("topics", "news")) == "publish"
    assert v.pledge_for(("agents", "scout", "ctl")) is None  # it may stop itself
    assert v.pledge_for(("ctl",)) == v.pledge_for(("agents", "x", "ctl")) == "spawn"
    with pytest.raises(Fs9Error) as e:
        v.check_write(("vault", "code", "x.py"))  # owned, but "write" was not pledged
    assert e.value.errno == errno.EACCES and "did not pledge 'write'" in e.value.text
    with pytest.raises(Fs9Error) as e:
        v.check_write(("topics", "new"))  # creating outside the view: absent
    assert e.value.errno == errno.ENOENT
    v.check_write(("topics", "news"))


def test_view_the_longest_prefix_of_unveils_and_owned_subtrees_wins():
    """An owned subtree is read-write even under a read-only unveil of an ancestor; an
    unveil inside it (or of it) narrows it."""
    from fs9.kernel.agents import view
    v = view.parse("owner", {"unveil": {"vault": "r", "vault/c/docs": "r", "vault/c/drop": "w"},
                             "owns": ["vault/c"]})
    assert v.access(("vault",)) == v.access(("vault", "other")) == "r"
    assert v.access(("vault", "c")) == v.access(("vault", "c", "sub", "f")) == "rw"
    assert v.access(("vault", "c", "docs", "a")) == "r"
    assert v.access(("vault", "c", "drop", "a")) == "w"
    v.check_write(("vault", "c", "f"))
    for path in (("vault", "other"), ("vault", "c", "docs", "a")):
        with pytest.raises(Fs9Error) as e:
            v.check_write(path)
        assert e.value.errno == errno.EACCES and "read-only in the view" in e.value.text
    same = view.parse("owner", {"unveil": {"vault/c": "r"}, "owns": ["vault/c"]})
    assert same.access(("vault", "c", "f")) == "r"  # the subtree itself unveiled: narrowed
    assert view.parse("owner", {"owns": ["vault/c"]}).access(("vault", "c", "f")) == "rw"


@pytest.mark.parametrize("manifest, words", [
    ({"pledge": ["fly"]}, "unknown promise"),
    ({"pledge": "read"}, "list of strings"),
    ({"unveil": {"/etc": "r"}}, None),  # a leading / is stripped: the namespace's etc
    ({"unveil": {"a/../b": "r"}}, "not a path of the namespace"),
    ({"unveil": {"topics/x": "x"}}, "expected r, w or rw"),
    ({"owns": ["topics/x"]}, "not a vault subtree"),
])
def test_view_parse_refuses_what_it_cannot_mean(manifest, words):
    from fs9.kernel.agents import view
    if words is None:
        assert view.parse("a", manifest).access(("etc",)) == "r"
        return
    with pytest.raises(Fs9Error) as e:
        view.parse("a", manifest)
    assert e.value.errno == errno.EINVAL and words in e.value.text


def test_a_kernel_without_a_mount_refuses_confined_agents_with_the_reason(tmp_path):
    k = Kernel(str(tmp_path / "state"), str(tmp_path / "agents"))
    with pytest.raises(Fs9Error) as e:
        k.ctl(b"spawn up cmd=cat")
    assert e.value.errno == errno.EPERM
    assert "cannot be confined here" in e.value.text and "unconfined = true" in e.value.text
    k.ctl(b"spawn up cmd=cat unconfined=true")  # the explicit choice
    assert "up" in k.agents


def test_sandbox_starts_keep_room_for_the_operators_agents():
    """Agents an agent spawned hold at most all but RESERVED of the start places: with
    them all taken and more of them waiting, an agent the operator spawned starts at
    once."""
    from fs9.kernel.agents.starts import RESERVED, Starts
    import trio.testing

    async def main():
        starts, holding, release = Starts(4), [], trio.Event()

        async def start(who):
            async with starts.place(by_agent=who.startswith("a")):
                holding.append(who)
                await release.wait()
                holding.remove(who)

        async with trio.open_nursery() as nursery:
            for i in range(6):  # a spawn loop's sandboxes
                nursery.start_soon(start, f"a{i}")
            await trio.testing.wait_all_tasks_blocked()
            assert len(holding) == 4 - RESERVED, holding  # (trio starts them in any order)
            nursery.start_soon(start, "operator's")
            await trio.testing.wait_all_tasks_blocked()
            assert holding[-1] == "operator's"  # not behind the four agents waiting
            release.set()
        assert holding == []
    trio.run(main)


def test_llama_index_imported_from_two_threads_at_once():
    """The vault's index and a model call import llama-index at a mount's start, each in
    a worker thread: through fs9.heavy one thread imports at a time (two at once each
    met modules the other had half made: ImportError, or KeyError inside importlib)."""
    import subprocess
    import sys
    probe = """
import threading
from fs9 import heavy
names = [("llama_index.retrievers.bm25", "BM25Retriever"),
         ("llama_index.llms.openai_like", "OpenAILike"), ("tiktoken", "")]
errors, go = [], threading.Barrier(len(names))
def load(module, name):
    go.wait()
    try:
        heavy.load(module, name)
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=load, args=n) for n in names]
for t in threads: t.start()
for t in threads: t.join()
print(errors)
"""
    for _ in range(2):  # (a fresh interpreter each: the first import is the one at stake)
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)


def test_landlock_calls_are_not_failed_by_an_earlier_ctypes_failure():
    """The landlock package takes ctypes' errno for its call's own (it never looks at the
    result): a failure left by any earlier ctypes call in the thread (here close(-1),
    EBADF) once read as "Landlock is not available" and skipped confined tests; in a
    sandbox's zygote it would fail a ruleset, or a program's start. Each call clears it."""
    import ctypes
    import threading

    from fs9.drivers import confinable
    if confinable.unavailable():
        pytest.skip(f"agents are not confined here: {confinable.unavailable()}")
    from fs9.drivers import zygote
    found = []

    def stale_then(call):
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.close(-1) == -1 and ctypes.get_errno() == errno.EBADF
        found.append(call())

    for call in (confinable.unavailable,
                 lambda: zygote.landlock_ruleset({"read": ["/usr"], "devices": ["/dev/null"],
                                                  "write": ["/tmp"]})._fd >= 0):
        t = threading.Thread(target=stale_then, args=(call,))  # its own errno
        t.start()
        t.join()
    assert found == [None, True]


def test_idempotency_keys_are_bounded_in_all_and_a_flood_costs_its_sender():
    """latest.SentKeys: each sender's latest keys, the latest senders, and a total past
    which the sender holding the most loses its oldest: another sender's recent key (a
    retry to come) outlives a flood of keys under one name or many."""
    from fs9.kernel.latest import SentKeys
    keys = SentKeys(per_sender=5, senders=4, total=10)
    keys.put("honest", "k1", "m1")
    for i in range(100):  # one name's flood: its own oldest go
        keys.put("flood", f"f{i}", i)
    assert keys.get("honest", "k1") == "m1" and keys.count == 6
    assert keys.get("flood", "f94") is None and keys.get("flood", "f99") == 99
    for name in ("p1", "p2"):  # many names: the sender holding the most loses first
        for i in range(5):
            keys.put(name, f"{name}-{i}", i)
    assert keys.count == 10 and keys.get("honest", "k1") == "m1"
    assert len(keys.by["flood"]) < 5
    keys.put("p3", "x", 0)  # a fifth sender: the one that used a key longest ago goes
    assert "honest" not in keys.by and len(keys.by) == 4 and keys.count <= 10
    keys.put("p3", "x", 1)  # the same key again: no growth
    assert keys.get("p3", "x") == 1 and keys.count == sum(map(len, keys.by.values()))
