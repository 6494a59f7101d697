"""L2 memory: agents/NAME/memory/, notes kept in the log across remounts, pruned by
the manifest's stated policy with events; on a real mount."""
import errno
import json
import os

import pytest

from conftest import errno_of


def test_notes_survive_a_remount_and_are_pruned_by_policy(mount):
    mount.define("keeper", 'cmd = ["cat"]\n[memory]\nmax_notes = 3\nmax_bytes = 100\n')
    mount.write("ctl", "spawn keeper\n")
    mem = "agents/keeper/view/agents/keeper/memory"  # as the agent itself
    for i in range(3):
        mount.write(f"{mem}/n{i}", f"note {i}\n")
    mount.write(f"{mem}/n0", "note 0, rewritten\n")  # now the newest
    assert sorted(os.listdir(mount.path / mem)) == ["n0", "n1", "n2"]
    mount.write(f"{mem}/n3", "note 3\n")  # a fourth: the oldest (n1) goes
    assert sorted(os.listdir(mount.path / "agents/keeper/memory")) == ["n0", "n2", "n3"]
    pruned = [json.loads(x) for x in mount.read("log/audit").splitlines()
              if '"memory_pruned"' in x]
    assert [(p["agent"], p["key"]) for p in pruned] == [("keeper", "n1")]
    assert "max_notes = 3" in pruned[0]["reason"]
    mount.write(f"{mem}/big", "x" * 95)  # over max_bytes: the oldest go until it fits
    assert sorted(os.listdir(mount.path / mem)) == ["big"]
    os.unlink(mount.path / mem / "big")
    mount.write(f"{mem}/kept", "across restarts\n")
    mount.umount()
    mount.mount()
    assert mount.read("agents/keeper/memory/kept") == "across restarts\n"
    assert errno_of(mount.write, f"{mem}/bad name", "x") == errno.EINVAL
    assert errno_of(os.unlink, mount.path / mem / "nosuch") == errno.ENOENT


def test_another_agents_memory_is_not_there(mount):
    for name in ("a1", "a2"):
        mount.define(name, 'cmd = ["cat"]\n')
        mount.write("ctl", f"spawn {name}\n")
    mount.write("agents/a1/memory/secret", "mine\n")
    assert errno_of(os.listdir, mount.path / "agents/a2/view/agents/a1/memory") == errno.ENOENT
    with pytest.raises(OSError):
        mount.read("agents/a2/view/agents/a1/memory/secret")
