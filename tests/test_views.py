"""Views: what an agent's manifest unveils and pledges, seen through the operator's
`agents/NAME/view/` and from inside a real confined agent; the registry."""
import errno
import json
import os

import pytest

from conftest import errno_of
from fs9.drivers import confine, uidslots

needs_confinement = pytest.mark.skipif(
    confine.unavailable() is not None, reason=f"cannot confine here: {confine.unavailable()}")

SCOUT = """
cmd = ["sh", "probe.sh"]
provides = ["scouting", "maps"]
accepts = ["work_request"]
clearance = "internal"
sla = "answers within 5 s"
pledge = ["read", "send", "publish"]
[unveil]
"topics/news" = "rw"
"topics/feed" = "r"
"agents/echo/mail" = "rw"
"""


def spawn(mount, line: str) -> None:
    mount.sh(f"echo {line!r} > ctl", check=True)


@pytest.fixture
def scout(mount):
    mount.define("scout", SCOUT, {"probe.sh": "cat\n"})
    mount.write("topics/news", "first\n")
    mount.write("topics/feed", "one\n")
    mount.write("topics/secret", "hidden\n")
    spawn(mount, "spawn echo")
    spawn(mount, "spawn scout")
    return mount


def test_view_tree_shows_only_what_is_unveiled(scout):
    v = scout.path / "agents/scout/view"
    assert sorted(os.listdir(v)) == ["agents", "topics"]
    assert sorted(os.listdir(v / "agents")) == ["echo", "scout"]
    assert os.listdir(v / "agents/echo") == ["mail"]
    assert sorted(os.listdir(v / "topics")) == ["feed", "news"]
    assert "view" not in os.listdir(v / "agents/scout")  # no view inside a view
    for hidden in ("ctl", "err", "status", "events", "log", "log/audit", "topics/secret", "mail",
                   "agents/echo/ctl", "agents/echo/in", "agents/scout/view",
                   "agents/echo/view", "registry"):
        for op in (os.stat, os.listdir, lambda p: open(p).close(), os.unlink):
            assert errno_of(op, v / hidden) == errno.ENOENT, (hidden, op)
    assert errno_of(os.rename, v / "topics/secret", v / "topics/x") == errno.ENOENT
    assert errno_of(os.link, v / "topics/secret", v / "agents/scout/x") == errno.ENOENT
    audit = scout.read("log/audit")
    assert '"kind":"unveil_denied","agent":"scout","path":"topics/secret"' in audit


def test_read_only_unveil_and_pledges_refuse_writes_with_reasons(scout):
    v = scout.path / "agents/scout/view"
    assert errno_of(scout.write, "agents/scout/view/topics/feed", "x\n") == errno.EACCES
    assert not os.stat(v / "topics/feed").st_mode & 0o222  # shown read-only
    for op in (lambda p: os.truncate(p, 0), lambda p: os.utime(p), lambda p: os.chmod(p, 0o666)):
        assert errno_of(op, v / "topics/feed") == errno.EACCES
    scout.write("agents/scout/view/topics/news", "from scout\n")  # rw + publish pledge
    assert '"kind":"published","topic":"news","sender":"scout"' in scout.read("log/audit")
    assert errno_of(scout.write, "agents/scout/view/topics/brandnew", "x\n") == errno.ENOENT
    # mail: rw unveil and the send pledge; the message is from scout, not the operator
    scout.write("agents/scout/view/agents/echo/mail/new", "hello from scout\n")
    msgs = [n for n in os.listdir(scout.path / "agents/echo/mail") if n[0].isdigit()]
    assert "from: scout" in scout.read(f"agents/echo/mail/{msgs[0]}")
    refused = [json.loads(line) for line in scout.read("log/audit").splitlines()
               if '"refused"' in line]
    assert any(e["agent"] == "scout" and "read-only in the view" in e["reason"] for e in refused)
    assert "read-only in the view of scout" in scout.read("agents/scout/err")


def test_missing_pledge_is_eacces_with_the_promise_named(mount):
    mount.define("mute", 'cmd = ["cat"]\npledge = ["read"]\n[unveil]\n"topics/t" = "rw"\n')
    mount.write("topics/t", "x\n")
    spawn(mount, "spawn mute")
    assert errno_of(mount.write, "agents/mute/view/topics/t", "y\n") == errno.EACCES
    assert errno_of(mount.write, "agents/mute/view/agents/mute/outbox/mute", "y\n") == errno.EACCES
    assert "did not pledge 'publish'" in mount.read("agents/mute/err")
    assert "did not pledge 'send'" in mount.read("agents/mute/err")
    assert 'pledge = ["read"]' in mount.read("agents/mute/manifest")


@pytest.mark.parametrize("bad, words", [
    ('pledge = ["fly"]', "unknown promise"),
    ('[unveil]\n"../etc" = "r"', "not a path of the namespace"),
    ('[unveil]\n"topics/x" = "rwx"', "expected r, w or rw"),
    ('[unveil]\n"agents/echo/view" = "r"', "view cannot be unveiled"),
    ('provides = ["a/b"]', "cannot be a file name"),
    ('unconfined = "yes"', "true or false"),
])
def test_bad_views_in_manifests_are_refused(mount, bad, words):
    mount.define("bad", f'cmd = ["cat"]\n{bad}\n')
    r = mount.sh("echo 'spawn bad' > ctl")
    assert r.returncode != 0 and "agents/bad" not in os.listdir(mount.path / "agents")
    assert words in mount.read("log/audit").splitlines()[-1]


def test_registry_lists_providers_and_capabilities(scout):
    entry = scout.read("registry/scout")
    assert "provides=scouting\nprovides=maps\n" in entry
    assert "accepts=work_request" in entry and "clearance=internal" in entry
    assert "sla=answers within 5 s" in entry
    assert sorted(os.listdir(scout.path / "registry/by-capability")) == ["echo", "maps", "scouting"]
    assert scout.read("registry/by-capability/maps") == "scout\n"
    assert errno_of(os.stat, scout.path / "registry/by-capability/flying") == errno.ENOENT
    # discovery from inside a view needs the pledge
    scout.define("finder", 'cmd = ["cat"]\npledge = ["read", "discover"]\n')
    spawn(scout, "spawn finder")
    assert scout.read("agents/finder/view/registry/by-capability/scouting") == "scout\n"
    assert errno_of(os.stat, scout.path / "agents/scout/view/registry") == errno.ENOENT


@needs_confinement
def test_a_confined_agent_sees_its_view_at_the_real_mount_path(scout):
    probe = r"""
set +e
echo "uid=$(id -u)"
echo "root: $(ls $FS9_MNT | tr '\n' ' ')"
echo "topics: $(ls $FS9_MNT/topics | tr '\n' ' ')"
cat $FS9_MNT/ctl 2>/dev/null || echo "ctl: absent"
cat $FS9_MNT/topics/secret 2>/dev/null || echo "secret: absent"
echo published > $FS9_MNT/topics/news && echo "news: ok"
echo nope > $FS9_MNT/topics/feed 2>/dev/null || echo "feed: refused"
ls "$STATE" 2>/dev/null || echo "state: unreachable"
echo hi > "$FS9_MNT/agents/echo/mail/new" && echo "mail: sent"
"""
    scout.define("scout", SCOUT.replace('cmd = ["sh", "probe.sh"]',
                                        f'cmd = ["sh", "probe.sh"]\nenv = {{ STATE = "{scout.state}" }}'),
                 {"probe.sh": probe})
    scout.sh("echo 'kill scout' > ctl; echo 'spawn scout' > ctl", check=True)
    scout.write("agents/scout/in", "go\n")
    scout.wait_for(lambda: scout.status("scout")["done"] == "1", what="the probe")
    out = dict(line.split(": ", 1) if ": " in line else line.split("=", 1)
               for line in scout.read("agents/scout/out").splitlines())
    assert int(out["uid"]) >= uidslots.UID_BASE
    assert out["root"].split() == ["agents", "topics"]
    assert out["topics"].split() == ["feed", "news"]
    assert out["ctl"] == "absent" and out["secret"] == "absent"
    assert out["news"] == "ok" and out["feed"] == "refused" and out["mail"] == "sent"
    assert out["state"] == "unreachable"
    msgs = [n for n in os.listdir(scout.path / "agents/echo/mail") if n[0].isdigit()]
    assert any("from: scout" in scout.read(f"agents/echo/mail/{m}") for m in msgs)


def test_unconfined_is_an_explicit_logged_choice(mount):
    mount.define("free", 'cmd = ["sh", "-c", "id -u"]\nunconfined = true\n')
    spawn(mount, "spawn free")
    mount.write("agents/free/in", "x")
    mount.wait_for(lambda: mount.status("free")["done"] == "1", what="the task")
    assert mount.read("agents/free/out") == f"{os.getuid()}\n"
    assert '"kind":"agent_unconfined","agent":"free"' in mount.read("log/audit")


CODER = """
cmd = ["sh", "work.sh"]
owns = ["vault/code"]
pledge = ["read", "write"]
[unveil]
"vault/docs" = "r"
"""
HELPER = """
cmd = ["cat"]
pledge = ["read", "write"]
[unveil]
"vault/code" = "rw"
"""


@pytest.fixture
def vault(mount):
    (mount.vault / "code").mkdir()
    (mount.vault / "docs").mkdir()
    (mount.vault / "private").mkdir()
    (mount.vault / "docs/guide.md").write_text("the guide\n")
    (mount.vault / "private/plans.md").write_text("secret plans\n")
    return mount


def test_the_operator_uses_the_vault_like_a_directory(vault):
    r = vault.sh("cat vault/docs/guide.md && echo new > vault/notes.md && mkdir vault/tmp && "
                 "mv vault/notes.md vault/tmp/ && ln -s ../docs/guide.md vault/tmp/link && "
                 "cat vault/tmp/link && ls vault/tmp && rm vault/tmp/notes.md vault/tmp/link && "
                 "rmdir vault/tmp && ls vault", check=True)
    assert r.stdout == "the guide\nthe guide\nlink\nnotes.md\ncode\ndocs\nprivate\n"
    assert sorted(os.listdir(vault.vault)) == ["code", "docs", "private"]


def test_each_vault_subtree_has_one_owner_and_others_ask_by_mail(vault):
    vault.define("coder", CODER, {"work.sh": "cat > $FS9_MNT/vault/code/fix.py\n"})
    vault.define("helper", HELPER)
    spawn(vault, "spawn coder")
    spawn(vault, "spawn helper")
    # the owner writes its subtree (here from inside its sandbox when confinement is here)
    vault.write("agents/coder/in", "print('fixed')\n")
    vault.wait_for(lambda: vault.status("coder")["done"] == "1", what="the owner's task")
    assert (vault.vault / "code/fix.py").read_text() == "print('fixed')\n"
    # others may read what they unveil, but their writes are refused and logged
    helper = vault.path / "agents/helper/view/vault"
    assert (helper / "code/fix.py").read_text() == "print('fixed')\n"
    for op in (lambda: (helper / "code/fix.py").write_text("x"),
               lambda: (helper / "code/new.py").write_text("x"),
               lambda: os.unlink(helper / "code/fix.py"),
               lambda: os.mkdir(helper / "code/sub")):
        assert errno_of(op) == errno.EACCES
    assert "owned by agent coder: ask it by mail" in vault.read("agents/helper/err")
    # what nobody owns only the operator changes; what is not unveiled does not exist
    coder = vault.path / "agents/coder/view/vault"
    assert sorted(os.listdir(coder)) == ["code", "docs"]
    assert errno_of(os.stat, coder / "private/plans.md") == errno.ENOENT
    assert errno_of(lambda: (coder / "docs/guide.md").write_text("x")) == errno.EACCES
    # exactly one owner: a second claim on the same subtree is refused
    vault.define("rival", 'cmd = ["cat"]\nowns = ["vault/code"]\n')
    r = vault.sh("echo 'spawn rival' > ctl")
    assert r.returncode != 0
    # (the refusal, not the last event: the watcher may log the coder's write late)
    assert any('"kind":"refused"' in line and "overlaps vault/code, owned by agent coder" in line
               for line in vault.read("log/audit").splitlines())
    vault.define("nested", 'cmd = ["cat"]\nowns = ["vault/code/lib"]\n')
    assert vault.sh("echo 'spawn nested' > ctl").returncode != 0  # nor inside it
    assert "owns=vault/code" in vault.read("registry/coder")
    assert vault.read("registry/owners") == "vault/code coder internal\n"
    assert vault.sh("echo 'spawn owners cmd=cat' > ctl").returncode != 0  # a reserved name


def test_an_agent_cannot_widen_its_powers_or_act_for_another(mount):
    mount.define("boss", 'cmd = ["cat"]\npledge = ["read", "spawn", "send"]\n'
                 'spawns = ["echo", "free"]\n[unveil]\n"ctl" = "w"\n"agents/echo" = "rw"\n')
    mount.define("free", 'cmd = ["cat"]\nunconfined = true\n')
    spawn(mount, "spawn echo")
    spawn(mount, "spawn boss")
    ctl = "agents/boss/view/ctl"
    mount.write(ctl, "spawn e2 def=echo priority=background")  # a defined agent: fine
    assert "e2" in os.listdir(mount.path / "agents")
    for line in ("spawn e3 def=echo unconfined=true", "spawn e4 cmd=sh",
                 "spawn e5 def=echo pledge=['spawn']", "spawn free"):
        assert errno_of(mount.write, ctl, line) == errno.EPERM, line
    assert "may not start the unconfined agent free" in mount.read("agents/boss/err")
    # another agent's mail: boss may send to echo, not acknowledge echo's messages
    mount.write("agents/echo/mail/new", "for echo\n")
    (msg,) = [n for n in os.listdir(mount.path / "agents/echo/mail") if n[0].isdigit()]
    assert errno_of(os.unlink, mount.path / f"agents/boss/view/agents/echo/mail/{msg}") == errno.EACCES
    assert errno_of(mount.write, "agents/boss/view/agents/echo/outbox/boss", "x") == errno.EACCES
    mount.write("agents/echo/in", "x\n")
    mount.wait_for(lambda: mount.status("echo")["done"] == "1", what="echo's task")
    (tid,) = os.listdir(mount.path / "agents/echo/tasks")
    assert errno_of(mount.write, f"agents/boss/view/agents/echo/tasks/{tid}/progress",
                    "50%") == errno.EACCES
    assert "only agent echo acknowledges its mail" in mount.read("agents/boss/err")
    # any new name in mail/ is a message from whoever writes it, never from the operator
    mount.write("agents/boss/view/agents/echo/mail/hello", "hi\n")
    assert any("from: boss" in mount.read(f"agents/echo/mail/{n}")
               for n in os.listdir(mount.path / "agents/echo/mail") if n[0].isdigit())


@needs_confinement
def test_a_mount_point_closed_to_other_users_is_a_clear_error(mount):
    spawn(mount, "spawn echo")
    mount.root.chmod(0o700)  # the agent's uid can no longer walk to the mount point
    try:
        mount.write("agents/echo/in", "x\n")
        mount.wait_for(lambda: mount.status("echo")["failed"] == "1", what="the refusal")
    finally:
        mount.root.chmod(0o711)
    assert f"{mount.root} is closed to other users (chmod o+x" in mount.read("agents/echo/err")


@needs_confinement
def test_an_ad_hoc_confined_agent_works_in_its_scratch_folder(mount):
    mount.write("ctl", "spawn rev cmd=rev")
    mount.write("agents/rev/in", "olleh\n")
    mount.wait_for(lambda: mount.status("rev")["done"] == "1", what="the task")
    assert mount.read("agents/rev/out") == "hello\n"


@needs_confinement
def test_read_only_vault_subtrees_are_bound_from_disk_in_the_sandbox(vault):
    probe = ("stat -f -c %T $FS9_MNT/vault/docs; stat -f -c %T $FS9_MNT/vault/code; "
             "cat $FS9_MNT/vault/docs/guide.md; "
             "echo x > $FS9_MNT/vault/docs/new.md 2>/dev/null || echo refused; "
             "echo y > $FS9_MNT/vault/code/mine.py && echo written\n")
    vault.define("reader", 'cmd = ["sh", "probe.sh"]\nowns = ["vault/code"]\n'
                 '[unveil]\n"vault/docs" = "r"\n', {"probe.sh": probe})
    spawn(vault, "spawn reader")
    vault.write("agents/reader/in", "go\n")
    vault.wait_for(lambda: vault.status("reader")["done"] == "1", what="the probe")
    docs_fs, code_fs, *rest = vault.read("agents/reader/out").splitlines()
    native = os.popen(f"stat -f -c %T {vault.vault}").read().strip()
    assert docs_fs == code_fs == native != "fuseblk"  # both from disk: docs ro, code rw
    assert rest == ["the guide", "refused", "written"]
    mine = vault.vault / "code/mine.py"  # written through an idmapped mount: the subtree
    assert (mine.stat().st_uid, mine.stat().st_gid) == (  # owner's file on disk
        (vault.vault / "code").stat().st_uid, (vault.vault / "code").stat().st_gid)
    assert (vault.vault / "code/mine.py").read_text() == "y\n"
    assert not (vault.vault / "docs/new.md").exists()


@needs_confinement
def test_a_folder_swapped_for_a_symlink_is_never_bound(vault, tmp_path):
    """The sandbox binds vault folders from fds resolved with no symlink followed (on
    disk, and in the view where they are bound): a folder that is a symlink binds
    nothing. It stays with fs9, which shows the link and follows nothing. A relative
    link is the sharp case: by path, `../agents/swapper` resolves beside the vault's
    folder on disk (the agent's definition folder, say) and to the agent's own folder
    in the view, so the one was bound over the other, inside what Landlock allows."""
    host = tmp_path / "host"
    (host / "code").mkdir(parents=True)
    (host / "canary").write_text("HOST-CANARY\n")
    for p in (host, host / "code"):
        p.chmod(0o777)
    (host / "canary").chmod(0o666)
    (vault.vault / "pub").symlink_to(host)
    (vault.vault / "proj").symlink_to(host)
    (vault.vault / "rel").symlink_to("../agents/swapper")
    probe = ("cat $FS9_MNT/vault/pub/canary $FS9_MNT/agents/swapper/canary; "
             "ls $FS9_MNT/vault/proj/code; "
             "echo planted > $FS9_MNT/vault/proj/code/planted; "
             "echo planted >> $FS9_MNT/vault/pub/canary; echo probed\n")
    vault.define("swapper", 'cmd = ["sh", "probe.sh"]\nowns = ["vault/proj/code"]\n'
                 '[unveil]\n"vault/pub" = "r"\n"vault/rel" = "r"\n',
                 {"probe.sh": probe, "canary": "DEFINITION-CANARY\n"})
    (vault.agents / "swapper/canary").chmod(0o644)
    spawn(vault, "spawn swapper")
    vault.write("agents/swapper/in", "go\n")
    vault.wait_for(lambda: vault.status("swapper")["done"] == "1"
                   or vault.status("swapper")["failed"] == "1", what="the probe")
    out = vault.read("agents/swapper/out")
    assert "probed" in out, vault.read("agents/swapper/err")
    assert "HOST-CANARY" not in out and "DEFINITION-CANARY" not in out
    assert (host / "canary").read_text() == "HOST-CANARY\n"
    assert not (host / "code/planted").exists()


@needs_confinement
def test_an_agent_moves_and_links_files_between_its_own_folders(vault):
    """Landlock's network-and-scopes layer grants the one filesystem right every layer
    must grant (moving or linking a file to another folder), so the agent's own subtree,
    bound from disk and through fs9, works as a folder does."""
    probe = ("cd $FS9_MNT/vault/code && mkdir -p a b && echo x > a/f && mv a/f b/f && "
             "ln b/f a/g && echo moved; cat b/f a/g\n")
    vault.define("mover", 'cmd = ["sh", "probe.sh"]\nowns = ["vault/code"]\n', {"probe.sh": probe})
    spawn(vault, "spawn mover")
    vault.write("agents/mover/in", "go\n")
    vault.wait_for(lambda: vault.status("mover")["done"] == "1"
                   or vault.status("mover")["failed"] == "1", what="the probe")
    assert vault.read("agents/mover/out").split() == ["moved", "x", "x"], \
        vault.read("agents/mover/err")
    assert (vault.vault / "code/b/f").read_text() == "x\n"


@needs_confinement
def test_an_owned_subtree_bound_from_disk_takes_no_setuid_file(vault):
    probe = ("f=$FS9_MNT/vault/code/tool; echo '#!/bin/sh' > $f; "
             "chmod 4755 $f 2>/dev/null || echo chmod-refused; "
             "/usr/bin/python3 -c \"import os; os.open('$FS9_MNT/vault/code/t2', os.O_CREAT|os.O_WRONLY, 0o4755)\" "
             "2>/dev/null || echo create-refused; chmod 755 $f && echo plain-ok\n")
    vault.define("maker", 'cmd = ["sh", "probe.sh"]\nowns = ["vault/code"]\n', {"probe.sh": probe})
    spawn(vault, "spawn maker")
    vault.write("agents/maker/in", "go\n")
    vault.wait_for(lambda: vault.status("maker")["done"] == "1", what="the probe")
    assert vault.read("agents/maker/out").split() == ["chmod-refused", "create-refused", "plain-ok"]
    assert not (vault.vault / "code/tool").stat().st_mode & 0o6000
    assert '"kind":"escape_attempt","agent":"maker"' in vault.read("log/audit")
