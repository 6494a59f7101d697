"""Authority that cannot be borrowed (issue 20, item 5): an agent lowers its priority,
never raises it; it ends only agents it sees or started; it starts only the
definitions its manifest lists. Requests come through the agent's view, the very
directory its sandbox binds over the mount; each test checks what happened to the
other agents, not only the errno."""
import errno
import os

import pytest

from conftest import errno_of, wait_task

BOSS = ('cmd = ["cat"]\nunconfined = true\npledge = ["read", "spawn", "send"]\n'
        'spawns = ["echo"]\n[unveil]\n"ctl" = "w"\n')


def test_an_agent_may_lower_its_priority_never_raise_it(mount):
    mount.define("a", 'cmd = ["cat"]\nunconfined = true\n')
    mount.sh("echo 'spawn a' > ctl", check=True)
    ctl = "agents/a/view/agents/a/ctl"
    assert errno_of(mount.write, ctl, "priority interactive\n") == errno.EPERM
    assert mount.status("a")["priority"] == "normal"
    mount.write(ctl, "priority background\n")
    assert mount.status("a")["priority"] == "background"
    assert errno_of(mount.write, ctl, "priority normal\n") == errno.EPERM
    mount.write("agents/a/ctl", "priority interactive\n")  # the operator may
    assert mount.status("a")["priority"] == "interactive"


def test_kill_reaches_only_agents_in_view_or_spawned(mount):
    mount.define("boss", BOSS)
    mount.sh("echo 'spawn boss' > ctl; echo 'spawn victim cmd=cat' > ctl", check=True)
    ctl = "agents/boss/view/ctl"
    # the victim is hidden from boss: the same answer as a name nobody has
    assert errno_of(mount.write, ctl, "kill victim\n") == errno.ENOENT
    assert errno_of(mount.write, ctl, "kill nobody\n") == errno.ENOENT
    assert "victim" in os.listdir(mount.path / "agents")
    mount.write(ctl, "spawn mine def=echo\n")  # one it starts, it may end
    mount.write(ctl, "kill mine\n")
    assert "mine" not in os.listdir(mount.path / "agents")


def test_an_agent_starts_only_the_definitions_it_lists(mount):
    mount.define("boss", BOSS)
    mount.define("wide", 'cmd = ["cat"]\npledge = ["read", "write", "send", "spawn"]\n'
                         '[unveil]\n"vault" = "rw"\n"ctl" = "w"\n')
    mount.sh("echo 'spawn boss' > ctl", check=True)
    ctl = "agents/boss/view/ctl"
    for line in ("spawn w1 def=wide", "spawn wide", "spawn e1 def=upper"):
        assert errno_of(mount.write, ctl, line + "\n") == errno.EPERM, line
    assert not {"w1", "wide", "e1"} & set(os.listdir(mount.path / "agents"))
    assert "spawns lists" in mount.read("agents/boss/err")
    mount.write(ctl, "spawn e2 def=echo\n")
    assert "e2" in os.listdir(mount.path / "agents")


def test_uids_never_repeat_while_a_holder_may_live(tmp_path):
    """A uid whose previous holder's program still runs is skipped; two fs9 instances
    that would pick the same uid range never share it."""
    import subprocess
    from fs9.drivers import uidslots
    from fs9.kernel.kernel import Kernel
    (tmp_path / "agents").mkdir()
    a = Kernel(str(tmp_path / "a"), str(tmp_path / "agents"))
    a.spawn("first", "cmd=cat", "unconfined=true")
    held = a.agents["first"].uid + 1  # the uid the next spawn would get
    squatter = subprocess.Popen(["sleep", "60"], user=held, group=held)
    try:
        a.spawn("second", "cmd=cat", "unconfined=true")
        assert a.agents["second"].uid not in (held, a.agents["first"].uid)
    finally:
        squatter.kill()
        squatter.wait()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "uid-slot").write_text(str(a.uid_slot))  # asks for a's range
    b = Kernel(str(tmp_path / "b"), str(tmp_path / "agents"))
    if a._uid_claim is None:
        pytest.skip(f"uid ranges cannot be claimed here ({uidslots.CLAIMS})")
    assert b.uid_slot != a.uid_slot
    assert (tmp_path / "b" / "uid-slot").read_text() == str(b.uid_slot)  # remembered


def test_uids_vetted_ahead_skip_one_a_holder_may_use(tmp_path):
    """Spawns take uids a background walk of /proc vetted ahead (agents/uidreserve.py):
    a uid a previous holder's program still runs as is not among them, and a spawn past
    the vetted ones (a walk of its own) skips it too."""
    import subprocess
    import trio
    from fs9.kernel.agents import uidreserve
    from fs9.kernel.kernel import Kernel
    (tmp_path / "agents").mkdir()
    a = Kernel(str(tmp_path / "a"), str(tmp_path / "agents"))
    a.spawn("first", "cmd=cat", "unconfined=true")
    held = a.agents["first"].uid + 1  # the uid the next spawn would get

    async def vet():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.uid_reserve.keep, a)
            with trio.fail_after(60):
                while len(a.uid_reserve) < uidreserve.LOW:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    squatter = subprocess.Popen(["sleep", "60"], user=held, group=held)
    try:
        trio.run(vet)
        vetted = len(a.uid_reserve)
        for n in range(vetted + 3):  # every vetted uid, then three found by a walk
            a.spawn(f"a{n}", "cmd=cat", "unconfined=true")
            assert a.agents[f"a{n}"].uid != held, n
        assert len(a.uid_reserve) == 0
    finally:
        squatter.kill()
        squatter.wait()


def test_memory_belongs_to_the_definition_and_clearance_not_the_name(mount):
    mount.define("keeper", 'cmd = ["cat"]\nunconfined = true\nclearance = "confidential"\n')
    mount.sh("echo 'spawn keeper' > ctl", check=True)
    mount.write("agents/keeper/memory/plan", "the confidential plan\n")
    mount.sh("echo 'kill keeper' > ctl", check=True)
    # another agent given the name sees no notes
    mount.sh("echo 'spawn keeper cmd=cat unconfined=true clearance=\"public\"' > ctl",
             check=True)
    assert os.listdir(mount.path / "agents/keeper/memory") == []
    assert errno_of(open, mount.path / "agents/keeper/memory/plan") == errno.ENOENT
    mount.sh("echo 'kill keeper' > ctl; echo 'spawn keeper' > ctl", check=True)
    assert mount.read("agents/keeper/memory/plan") == "the confidential plan\n"


def spawned(mount, ctl: str, prefix: str, most: int) -> tuple[int, int]:
    """Spawn PREFIXn def=echo through ctl until refused (at most `most`): how many
    started, and the errno of the refusal (0: none)."""
    for n in range(most):
        e = errno_of(mount.write, ctl, f"spawn {prefix}{n} def=echo\n")
        if e is not None:
            return n, e
    return most, 0


def test_a_spawn_loop_meets_the_limit_and_the_operator_keeps_room(tmp_path):
    """With --max-agents 30, agents' spawns stop 3 short (a tenth): the operator still
    starts the last three, then is refused too; a kill makes room again."""
    from conftest import Mount, fuse_unavailable
    if fuse_unavailable():
        pytest.skip(f"cannot mount FUSE here: {fuse_unavailable()}")
    m = Mount(tmp_path).mount("--max-agents", "30")
    try:
        m.define("boss", BOSS)
        m.write("ctl", "spawn boss\n")
        started, e = spawned(m, "agents/boss/view/ctl", "e", 40)
        assert (started, e) == (26, errno.EAGAIN)  # 27 agents with boss: 30 less 3
        assert "fs9 holds as many agents as agents may start" in \
            m.read("agents/boss/err")
        for n in range(3):
            m.write("ctl", f"spawn op{n} cmd=cat\n")
        assert errno_of(m.write, "ctl", "spawn op3 cmd=cat\n") == errno.EAGAIN
        assert "fs9 holds 30 agents: 30 at the most" in m.read("err")
        assert len(os.listdir(m.path / "agents")) == 30
        m.write("ctl", "kill op0\n")
        m.write("ctl", "spawn op3 cmd=cat\n")  # room again
    finally:
        m.umount()
    assert not m.bugs()


def test_an_agent_starts_so_many_agents_and_a_definition_has_so_many(mount):
    mount.define("boss", BOSS)
    mount.write("ctl", "spawn boss\n")
    ctl = "agents/boss/view/ctl"
    started, e = spawned(mount, ctl, "e", 120)
    assert (started, e) == (100, errno.EDQUOT)
    assert "agent boss has started 100 live agents: 100 at the most" in \
        mount.read("agents/boss/err")
    mount.write(ctl, "kill e7\n")
    mount.write(ctl, "spawn e100 def=echo\n")  # (its share again)
    # a definition that says how many of it may live: the operator's spawns keep to it
    mount.define("w", 'cmd = ["cat"]\nunconfined = true\nmax_instances = 2\n')
    mount.write("ctl", "spawn w1 def=w\nspawn w2 def=w\n")
    assert errno_of(mount.write, "ctl", "spawn w3 def=w\n") == errno.EDQUOT
    assert "definition w has 2 live agents: 2 at the most" in mount.read("err")
    assert "w3" not in os.listdir(mount.path / "agents")
    # one write is checked whole: two more of w in it are refused together
    mount.write("ctl", "kill w1\n")
    assert errno_of(mount.write, "ctl", "spawn w4 def=w\nspawn w5 def=w\n") == errno.EDQUOT
    assert not {"w4", "w5"} & set(os.listdir(mount.path / "agents"))


def test_a_name_spawned_again_inherits_nothing_of_its_last_holder(mount):
    """What a killed agent left under its name (its finished tasks, its conversations
    with a model) is not the next holder's: an agent that may spawn a lower definition
    under that name reads none of it, by id or by listing."""
    mount.define("vipdef", 'cmd = ["cat"]\nunconfined = true\nclearance = "confidential"\n'
                           '[unveil]\n"models/scripted" = "rw"\n')
    mount.define("low", 'cmd = ["cat"]\n'
                        '[unveil]\n"models/scripted" = "rw"\n')
    mount.define("boss", 'cmd = ["cat"]\nunconfined = true\npledge = ["spawn"]\n'
                         'spawns = ["low"]\n[unveil]\n"ctl" = "w"\n')
    mount.sh("echo 'spawn vip def=vipdef' > ctl; echo 'spawn boss' > ctl", check=True)
    mount.write("agents/vip/in", "the merger closes friday\n")
    assert wait_task(mount, "vip")[0] == "the merger closes friday\n"
    tid = mount.status("vip")["latest"]
    models = "agents/vip/view/models/scripted"
    cid = mount.read(f"{models}/clone").strip()
    mount.write(f"{models}/{cid}/request", "the merger closes friday\n")
    assert "merger" in mount.read(f"{models}/{cid}/reply")
    assert cid in os.listdir(mount.path / models)
    mount.write("ctl", "kill vip\n")
    mount.write("agents/boss/view/ctl", "spawn vip def=low\n")
    mine = mount.path / "agents/vip/view/agents/vip/tasks"
    assert tid not in os.listdir(mine)
    for path in (mine / tid, mine / tid / "in", mine / tid / "out",
                 mount.path / "agents/vip/tasks" / tid):
        assert errno_of(os.stat, path) == errno.ENOENT, path
    assert cid not in os.listdir(mount.path / models)
    for name in ("history", "last", "request", "status"):
        assert errno_of(os.stat, mount.path / models / cid / name) == errno.ENOENT, name
    assert "merger" not in "".join(mount.read(f"models/scripted/{c}/history")
                                   for c in os.listdir(mount.path / "models/scripted")
                                   if c.isdigit())


def test_notes_of_killed_agents_an_agent_spawned_are_bounded(mount):
    """An agent spawning and killing children under ever new names cannot grow fs9's
    memory and log with their notes without end: past KEPT_HOLDERS such killed agents'
    notes, the stalest go (logged); the operator's killed agents' notes stay for a
    respawn, and a remount keeps what was cut cut."""
    import json
    from fs9.drivers import confinable
    from fs9.kernel.agents.memory import KEPT_HOLDERS
    if confinable.unavailable():  # (an agent starts only confined agents)
        pytest.skip(f"agents are not confined here: {confinable.unavailable()}")
    mount.define("kid", 'start = "on-demand"\ncmd = ["cat"]\n')  # (no process: cheap)
    mount.define("spawner", BOSS.replace('"echo"', '"kid"'))
    mount.sh("echo 'spawn spawner' > ctl; echo 'spawn mine def=kid' > ctl", check=True)
    mount.write("agents/mine/memory/n", "the operator's\n")
    mount.write("ctl", "kill mine\n")
    ctl = "agents/spawner/view/ctl"
    for i in range(KEPT_HOLDERS + 2):
        mount.write(ctl, f"spawn k{i} def=kid\n")
        mount.write(f"agents/k{i}/memory/n", f"note {i}\n")
        mount.write(ctl, f"kill k{i}\n")
    pruned = [json.loads(x) for x in mount.read("log/audit").splitlines()
              if '"memory_pruned"' in x]
    assert sorted(p["agent"] for p in pruned) == ["k0", "k1"], pruned
    assert "spawned by an agent" in pruned[0]["reason"]
    mount.umount()
    mount.mount()
    for name, note in (("k0", None), ("k1", None), ("k2", "note 2\n"),
                       (f"k{KEPT_HOLDERS + 1}", f"note {KEPT_HOLDERS + 1}\n"),
                       ("mine", "the operator's\n")):
        mount.write("ctl", f"spawn {name} def=kid\n")  # the same definition again
        got = os.listdir(mount.path / f"agents/{name}/memory")
        assert got == ([] if note is None else ["n"]), name
        if note is not None:
            assert mount.read(f"agents/{name}/memory/n") == note
