"""Red team 8: holes found by attacking fs9 as a confined agent would, each proved on a
real mount (the view is the identity: requests through `agents/NAME/view/...` are that
agent's, exactly the directory its sandbox binds over the mount; a shared vault's other
users are throwaway uids, as in tests/test_shared_vault.py).

  flood      a lookup of a hidden name that exists is an `unveil_denied` event: a loop
             of them wrote one row of the log each, without bound (the refusals beside
             them are counted past 50 a second)
  trusted    extended attributes outside user.* are read by fs9 as root: `trusted.*`
             (root's own, CAP_SYS_ADMIN's on Linux) reached agents and a shared vault's
             users
"""
import errno
import json
import os
import subprocess
import time

import pytest

from conftest import Mount, errno_of, fuse_unavailable

SPY = ('cmd = ["cat"]\nunconfined = true\npledge = ["read", "write", "send"]\n'
       '[unveil]\n"ctl" = "w"\n"vault" = "r"\n')
VICTIM = 'cmd = ["cat"]\nunconfined = true\n'


def audit(mount: Mount, kind: str, agent: str) -> list[dict]:
    return [e for e in map(json.loads, mount.read("log/audit").splitlines())
            if e["kind"] == kind and e.get("agent") == agent]


def test_lookups_of_a_hidden_name_cannot_flood_the_log(mount):
    """An agent stat-ing a hidden agent's directory in a loop: each lookup is refused
    (ENOENT) and audited, but past 50 a second the events are counted, not logged one
    by one (the next one says how many: `coalesced`), as for every other refusal."""
    mount.define("spy", SPY)
    mount.define("victim", VICTIM)
    mount.sh("echo 'spawn victim' > ctl; echo 'spawn spy' > ctl", check=True)
    hidden = mount.path / "agents/spy/view/agents/victim"
    probes = 2000
    started = time.monotonic()
    codes = {errno_of(os.stat, hidden) for _ in range(probes)}
    elapsed = time.monotonic() - started
    assert codes == {errno.ENOENT}
    logged = audit(mount, "unveil_denied", "spy")
    assert logged, "a hidden lookup is still audited"
    assert len(logged) <= 50 * (int(elapsed) + 2), \
        f"{len(logged)} unveil_denied rows for {probes} lookups in {elapsed:.1f} s"
    # in a later second, the next row logged says how many were not
    said = mount.wait_for(lambda: errno_of(os.stat, hidden) == errno.ENOENT and [
        e["coalesced"] for e in audit(mount, "unveil_denied", "spy") if "coalesced" in e],
        what="an unveil_denied event with the count of those not logged")
    assert len(logged) + said[0] >= probes


# --- trusted.* extended attributes ---------------------------------------------------

SECRET = b"root-only-f3a9"


def planted(mount: Mount) -> str:
    """vault/note.md (0644) with a user.* and a trusted.* attribute, set on disk by root."""
    note = mount.vault / "note.md"
    note.write_text("hello\n")
    os.chmod(note, 0o644)
    os.setxattr(note, "user.tag", b"visible")
    os.setxattr(note, "trusted.secret", SECRET)
    return "vault/note.md"


@pytest.mark.xfail(strict=True, reason="fs9 reads trusted.* as root for an agent")
def test_an_agent_reads_no_trusted_attribute(mount):
    """Linux shows trusted.* only to CAP_SYS_ADMIN: through an agent's view, fs9 (root)
    neither reads one (ENODATA, as the kernel answers an unprivileged reader) nor lists
    its name; user.* stays readable."""
    rel = planted(mount)
    mount.define("spy", SPY)
    mount.sh("echo 'spawn spy' > ctl", check=True)
    seen = mount.path / "agents/spy/view" / rel
    assert os.getxattr(seen, "user.tag") == b"visible"
    assert errno_of(os.getxattr, seen, "trusted.secret") == errno.ENODATA
    assert "trusted.secret" not in os.listxattr(seen)
    assert "user.tag" in os.listxattr(seen)
    assert os.getxattr(mount.path / rel, "trusted.secret") == SECRET  # the operator's


@pytest.fixture
def shared(tmp_path):
    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"cannot mount FUSE here: {reason}")
    if os.geteuid() != 0:
        pytest.skip("other users reach a FUSE mount only through allow_other (root)")
    m = Mount(tmp_path)
    m.mount("--share-vault")
    try:
        os.chmod(m.vault, 0o755)
        yield m
    finally:
        m.umount()
    assert not m.bugs()


@pytest.mark.xfail(strict=True, reason="fs9 reads trusted.* as root for a shared user")
def test_a_shared_vault_user_reads_no_trusted_attribute(shared):
    rel = planted(shared)

    def drop():
        os.setgroups([])
        os.setresgid(61001, 61001, 61001)
        os.setresuid(61001, 61001, 61001)
    probe = ("import os, sys; p = sys.argv[1]; print(os.listxattr(p));"
             "print(os.getxattr(p, 'user.tag'));"
             "\ntry: print(os.getxattr(p, 'trusted.secret'))\nexcept OSError as e: print(e.errno)")
    r = subprocess.run(["python3", "-c", probe, str(shared.path / rel)], capture_output=True,
                       text=True, timeout=60, preexec_fn=drop)
    assert r.returncode == 0, r.stderr
    names, tag, secret = r.stdout.splitlines()
    assert "user.tag" in names and "trusted.secret" not in names
    assert tag == "b'visible'"
    assert secret == str(errno.ENODATA), "a shared vault's user read root's trusted.* attribute"
