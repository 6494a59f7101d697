"""Labels on the namespace, checked at spawn and at every read (issue 20, item 3): a
vault subtree carries its owner's clearance, another agent's directory that agent's,
a topic its label (kernel/labels.py). A public agent cannot unveil what is labelled
above it, nor read it through fs9 (a read, a listing, a walk, a search) or natively
through the subtrees its sandbox binds from disk, however the owner and the reader
came in order. Each test asserts on what the reader got (its out, its reads, the
refusals logged), with real confined agents where the sandbox matters."""
import errno
import json
import os

import pytest

from conftest import errno_of
from fs9.drivers import confine

needs_confinement = pytest.mark.skipif(
    confine.unavailable() is not None, reason=f"cannot confine here: {confine.unavailable()}")

SECRET = "zanzibar-launch-codes"
OWNER = 'cmd = ["cat"]\nunconfined = true\nclearance = "confidential"\nowns = ["vault/c"]\n'
PROBE = ('set +e\ncat "$FS9_MNT/vault/c/secret.md"\ncat "$FS9_MNT/vault/docs/open.md"\n'
         'ls "$FS9_MNT/vault/c"\necho "listing: $(ls "$FS9_MNT/vault" | tr "\\n" " ")"\n'
         'echo probed\n')


def reader(unveil: str = '"vault" = "r"\n', confined: bool = True) -> str:
    return ('cmd = ["sh", "probe.sh"]\nclearance = "public"\n'
            + ("" if confined else "unconfined = true\n") + f"[unveil]\n{unveil}")


@pytest.fixture
def vault(mount):
    (mount.vault / "c").mkdir()
    (mount.vault / "c/secret.md").write_text(f"the {SECRET}\n")
    (mount.vault / "docs").mkdir()
    (mount.vault / "docs/open.md").write_text("open to all\n")
    mount.define("conf", OWNER)
    return mount


def refusals(mount) -> list[dict]:
    return [e for e in map(json.loads, mount.read("log/audit").splitlines())
            if e["kind"] == "refused"]


def spawn_errno(mount, line: str) -> int | None:
    return errno_of(mount.write, "ctl", line + "\n")


def probe(mount, name: str) -> str:
    """Run the probe as agent name's task: its out."""
    done = int(mount.status(name)["done"])
    mount.write(f"agents/{name}/in", "go\n")
    mount.wait_for(lambda: int(mount.status(name)["done"]) > done, what=f"{name}'s probe")
    out = mount.read(f"agents/{name}/out")
    assert "probed" in out
    return out


def test_spawn_refuses_unveiling_what_is_labelled_above_the_agent(vault):
    vault.write("ctl", "spawn conf\n")
    vault.sh("touch topics/plans", check=True)
    vault.define("confpub", 'cmd = ["cat"]\nunconfined = true\nclearance = "confidential"\n'
                 'pledge = ["publish"]\n[unveil]\n"topics/plans" = "w"\n')
    vault.write("ctl", "spawn confpub\n")
    vault.write("agents/confpub/view/topics/plans", "the plan\n")  # the topic: confidential
    refused = {
        "vault/c": "vault/c is confidential (vault/c is owned by agent conf)",
        "vault/c/inner": "vault/c/inner is confidential",
        "agents/conf/memory": "agents/conf/memory is confidential (agent conf's)",
        "agents/conf": "agents/conf is confidential",
        "topics/plans": "topic plans is confidential",
    }
    for i, (path, reason) in enumerate(refused.items()):
        for mode in ("r", "rw"):
            vault.define(f"p{i}{mode}", reader(f'"{path}" = "{mode}"\n', confined=False))
            assert spawn_errno(vault, f"spawn p{i}{mode}") == errno.EACCES, (path, mode)
            [last] = refusals(vault)[-1:]
            assert reason in last["reason"] and "p%d%s is cleared for public" % (i, mode) \
                in last["reason"], last
    assert not {n for n in os.listdir(vault.path / "agents") if n.startswith("p")}
    # ancestors, write-only and what carries no label are fine: filtered at each read
    for i, unveil in enumerate(['"vault" = "r"', '"agents" = "r"', '"topics" = "rw"',
                                '"agents/conf/mail" = "w"', '"topics/plans" = "w"',
                                '"vault/docs" = "r"', '"log" = "r"']):
        vault.define(f"ok{i}", reader(unveil + "\n", confined=False))
        assert spawn_errno(vault, f"spawn ok{i}") is None, unveil
    # an internal agent is below confidential too; a confidential one may
    vault.define("int", reader('"vault/c" = "r"\n', confined=False).replace("public",
                                                                              "internal"))
    assert spawn_errno(vault, "spawn int") == errno.EACCES
    vault.define("peer", reader('"vault/c" = "r"\n', confined=False).replace(
        "public", "confidential"))
    assert spawn_errno(vault, "spawn peer") is None


def test_reads_through_the_mount_are_filtered_by_label(vault):
    """Through the view (as an unconfined agent, or a confined one's fs9-served paths):
    reading, listing and walking into the confidential subtree are refused; the rest
    of the vault reads; the refusals are logged with the reason."""
    vault.write("ctl", "spawn conf\n")
    vault.define("pub", reader(confined=False))
    vault.write("ctl", "spawn pub\n")
    v = vault.path / "agents/pub/view/vault"
    assert (v / "docs/open.md").read_text() == "open to all\n"
    assert sorted(os.listdir(v)) == ["c", "docs"]  # the subtree's name is the operator's
    assert os.path.isdir(v / "c")
    for op in (lambda: (v / "c/secret.md").read_text(), lambda: os.listdir(v / "c"),
               lambda: os.stat(v / "c/secret.md"), lambda: os.stat(v / "c/nothing"),
               lambda: os.getxattr(v / "c/secret.md", "user.fs9.owner")):
        assert errno_of(op) == errno.EACCES
    reasons = [e["reason"] for e in refusals(vault) if e["agent"] == "pub"]
    assert any("vault/c is confidential (vault/c is owned by agent conf); pub is cleared "
               "for public" in r for r in reasons), reasons
    assert "pub is cleared for public" in vault.read("agents/pub/err")
    # the labels as extended attributes: the subtree is conf's, the rest nobody's
    assert os.getxattr(v / "c", "user.fs9.classification") == b"confidential"
    assert os.getxattr(v / "docs/open.md", "user.fs9.classification") == b""
    # the owner reads its own, and the operator everything
    assert SECRET in (vault.path / "agents/conf/view/vault/c/secret.md").read_text()
    assert SECRET in vault.read("vault/c/secret.md")


def test_an_owner_claimed_after_the_reader_is_filtered_too(vault):
    vault.define("pub", reader(confined=False))
    vault.write("ctl", "spawn pub\n")
    v = vault.path / "agents/pub/view/vault"
    assert SECRET in (v / "c/secret.md").read_text()  # nobody's yet: the operator unveiled it
    vault.write("ctl", "spawn conf\n")
    assert errno_of(lambda: (v / "c/secret.md").read_text()) == errno.EACCES
    vault.write("ctl", "kill conf\n")  # unclaimed again: the operator's once more
    assert SECRET in (v / "c/secret.md").read_text()


def test_another_agents_directory_carries_its_clearance(vault):
    vault.write("ctl", "spawn conf\n")
    vault.write("agents/conf/memory/plan", f"the {SECRET}\n")
    vault.define("pub", reader('"agents" = "rw"\n', confined=False).replace(
        'cmd = ["sh", "probe.sh"]', 'cmd = ["cat"]\npledge = ["read", "send"]'))
    vault.write("ctl", "spawn pub\n")
    a = vault.path / "agents/pub/view/agents"
    for op in (lambda: (a / "conf/memory/plan").read_text(), lambda: os.listdir(a / "conf"),
               lambda: (a / "conf/status").read_text(), lambda: os.listdir(a / "conf/memory")):
        assert errno_of(op) == errno.EACCES
    (a / "conf/mail/new").write_text("a note up to you\n")  # writing up is fine
    assert any("a note up to you" in vault.read(f"agents/conf/mail/{n}")
               for n in os.listdir(vault.path / "agents/conf/mail") if n[0].isdigit())
    assert (a / "pub/status").read_text()  # its own, always


def test_search_shows_nothing_above_the_readers_clearance(vault):
    vault.write("ctl", "spawn conf\n")
    vault.define("pub", reader('"vault" = "r"\n"search" = "r"\n', confined=False))
    vault.write("ctl", "spawn pub\n")
    vault.wait_for(lambda: "vault/c/secret.md" in vault.read(f"search/{SECRET}"),
                   what="the secret indexed")
    answer = vault.read(f"agents/pub/view/search/{SECRET} open")
    assert SECRET not in answer and "vault/c" not in answer
    assert "vault/docs/open.md" in vault.read("agents/pub/view/search/open")


@needs_confinement
def test_a_confined_public_reader_gets_nothing_of_a_confidential_subtree(vault):
    """`"vault" = "r"` would be bound from disk, past fs9: with a confidential owner
    inside, it is served by fs9 instead, which filters. The unowned files still read."""
    vault.write("ctl", "spawn conf\n")
    vault.define("pub", reader(), {"probe.sh": PROBE})
    vault.write("ctl", "spawn pub\n")
    out = probe(vault, "pub")
    assert SECRET not in out and "open to all" in out
    assert "listing: c docs" in out
    assert "vault/c is confidential" in vault.read("agents/pub/err")


@needs_confinement
def test_an_owner_may_not_claim_what_a_lower_sandbox_reads_from_disk(vault):
    """pub's sandbox bound the whole vault from disk (nobody owned anything in it): a
    confidential owner of vault/c now would label what pub's programs read natively.
    The spawn is refused, saying why; once pub is gone it goes ahead, and a new pub
    reads nothing of it."""
    vault.define("pub", reader(), {"probe.sh": PROBE})
    vault.write("ctl", "spawn pub\n")
    assert SECRET in probe(vault, "pub")  # unowned: the operator let it read the vault
    assert spawn_errno(vault, "spawn conf") == errno.EBUSY
    [last] = refusals(vault)[-1:]
    assert "agent pub, cleared for public, reads vault from disk" in last["reason"]
    assert "conf" not in os.listdir(vault.path / "agents")
    assert SECRET in probe(vault, "pub")  # (nothing changed for it meanwhile)
    vault.write("ctl", "kill pub\n")  # (its sandbox ends a moment later: then the claim)
    vault.wait_for(lambda: spawn_errno(vault, "spawn conf") is None, timeout=90,
                   what="conf's claim")  # (once pub's sandbox, its control group, is gone)
    vault.write("ctl", "spawn pub\n")
    out = probe(vault, "pub")
    assert SECRET not in out and "open to all" in out


@needs_confinement
def test_an_owner_claimed_before_the_readers_first_task_is_filtered(vault):
    """The sandbox is made at the first task, with the owners of that moment."""
    vault.define("pub", reader(), {"probe.sh": PROBE})
    vault.write("ctl", "spawn pub\n")
    vault.write("ctl", "spawn conf\n")  # pub has no sandbox yet: nothing read natively
    out = probe(vault, "pub")
    assert SECRET not in out and "open to all" in out
