"""Authority that cannot be borrowed (issue 20, item 5): an agent lowers its priority,
never raises it; it ends only agents it sees or started; it starts only the
definitions its manifest lists. Requests come through the agent's view, the very
directory its sandbox binds over the mount; each test checks what happened to the
other agents, not only the errno."""
import errno
import os

import pytest

from conftest import errno_of

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
    from fs9.drivers import confine
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
        pytest.skip(f"uid ranges cannot be claimed here ({confine.CLAIMS})")
    assert b.uid_slot != a.uid_slot
    assert (tmp_path / "b" / "uid-slot").read_text() == str(b.uid_slot)  # remembered


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
