"""The vault shared with other local users (fs9 mount --share-vault): they reach vault/
and nothing else, under the kernel's own permission rules, checked by fs9 (root).

Other users are throwaway uids: each command runs in a child that drops to them
(setgroups, setresgid, setresuid) before exec; no account is needed. What they did is
asserted on the backing directory, as root sees it.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import Mount, shared_vault

ALICE, BOB, CAROL = 61001, 61002, 61003
TEAM = 61100  # a group alice and bob are in (supplementary), carol not


@pytest.fixture
def shared(tmp_path):
    with shared_vault(tmp_path, 0o1777) as m:  # a /tmp-like top: anyone makes, sticky
        yield m


def as_user(mount: Mount, uid: int, cmd: str, groups=(), gid=None) -> subprocess.CompletedProcess:
    """sh -c cmd in the mount, as uid (primary group gid, default uid; groups: its
    supplementary groups), with umask 022."""
    gid = uid if gid is None else gid

    def drop():
        os.setgroups(list(groups))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        os.umask(0o022)
    return subprocess.run(["sh", "-c", cmd], cwd=mount.path, capture_output=True, text=True,
                          timeout=60, preexec_fn=drop, env={"PATH": os.environ["PATH"]})


def ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"


def denied(r: subprocess.CompletedProcess, why: str = "Permission denied") -> None:
    assert r.returncode != 0 and why in r.stderr, f"exit {r.returncode}: {r.stderr}"


def test_other_users_are_refused_unless_shared(mount):
    if os.geteuid() != 0:
        pytest.skip("other users reach a FUSE mount only through allow_other (root)")
    (mount.vault / "note.md").write_text("the operator's\n")
    os.chmod(mount.vault, 0o755)
    os.chmod(mount.vault / "note.md", 0o644)
    denied(as_user(mount, ALICE, "cat vault/note.md"))
    denied(as_user(mount, ALICE, "echo x > vault/new.md"))
    assert not (mount.vault / "new.md").exists()


def test_only_vault_is_shared(shared):
    denied(as_user(shared, ALICE, "ls ."))  # the root is passed through, not listed
    for name in ("ctl", "events", "agents", "status"):
        denied(as_user(shared, ALICE, f"cat {name} || ls {name}"))
    ok(as_user(shared, ALICE, "ls vault && stat vault"))


def test_create_chmod_chown(shared):
    ok(as_user(shared, ALICE, "echo hi > vault/a.md && chmod 640 vault/a.md"))
    st = (shared.vault / "a.md").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (ALICE, ALICE, 0o640)
    assert (shared.vault / "a.md").read_text() == "hi\n"
    denied(as_user(shared, BOB, "chmod 666 vault/a.md"), "not permitted")
    denied(as_user(shared, ALICE, f"chown {BOB} vault/a.md"), "not permitted")
    denied(as_user(shared, ALICE, f"chgrp {TEAM} vault/a.md"), "not permitted")
    os.chown(shared.path / "vault/a.md", BOB, TEAM)  # root gives it away
    st = (shared.vault / "a.md").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (BOB, TEAM, 0o640)


def test_mode_bits_and_groups(shared):
    ok(as_user(shared, ALICE, "echo secret > vault/mine && chmod 600 vault/mine"))
    denied(as_user(shared, BOB, "cat vault/mine"))
    denied(as_user(shared, BOB, "echo x >> vault/mine"))
    assert (shared.vault / "mine").read_text() == "secret\n"
    # the group: read by a supplementary member, not by others
    ok(as_user(shared, ALICE, f"echo team > vault/t && chgrp {TEAM} vault/t || true"))
    os.chown(shared.path / "vault/t", ALICE, TEAM)
    os.chmod(shared.path / "vault/t", 0o640)
    r = as_user(shared, BOB, "cat vault/t", groups=(TEAM,))
    ok(r)
    assert r.stdout == "team\n"
    denied(as_user(shared, CAROL, "cat vault/t"))
    denied(as_user(shared, BOB, "echo x > vault/t", groups=(TEAM,)))
    assert (shared.vault / "t").read_text() == "team\n"


def test_search_permission_on_the_way(shared):
    ok(as_user(shared, ALICE, "mkdir vault/private && echo x > vault/private/f && "
                              "chmod 644 vault/private/f && chmod 700 vault/private"))
    # alice's own walk caches nothing another user could use
    ok(as_user(shared, ALICE, "cat vault/private/f"))
    denied(as_user(shared, BOB, "stat vault/private/f"))
    denied(as_user(shared, BOB, "cat vault/private/f"))
    denied(as_user(shared, BOB, "ls vault/private"))
    ok(as_user(shared, ALICE, "chmod 711 vault/private"))
    ok(as_user(shared, BOB, "cat vault/private/f"))  # search, not list
    denied(as_user(shared, BOB, "ls vault/private"))


def test_sticky_directory(shared):
    ok(as_user(shared, ALICE, "echo a > vault/alices && chmod 666 vault/alices"))
    denied(as_user(shared, BOB, "rm -f vault/alices"), "not permitted")
    denied(as_user(shared, BOB, "mv vault/alices vault/bobs"), "not permitted")
    ok(as_user(shared, BOB, "echo b > vault/bobs && echo more >> vault/alices"))
    denied(as_user(shared, BOB, "mv -f vault/bobs vault/alices"), "not permitted")
    assert (shared.vault / "alices").read_text() == "a\nmore\n"
    ok(as_user(shared, ALICE, "mv vault/alices vault/renamed && rm vault/renamed"))
    assert not (shared.vault / "renamed").exists()
    ok(as_user(shared, BOB, "rm vault/bobs"))
    assert not (shared.vault / "bobs").exists()
    # without the sticky bit, write permission on the directory is enough
    ok(as_user(shared, ALICE, "mkdir vault/open && chmod 777 vault/open && "
                              "echo a > vault/open/f"))
    ok(as_user(shared, BOB, "rm -f vault/open/f"))
    assert not (shared.vault / "open/f").exists()
    # and without write permission, nobody but root makes or removes names
    ok(as_user(shared, ALICE, "mkdir vault/ro && echo a > vault/ro/f && chmod 755 vault/ro"))
    denied(as_user(shared, BOB, "rm -f vault/ro/f"))
    denied(as_user(shared, BOB, "echo b > vault/ro/g"))
    assert sorted(os.listdir(shared.vault / "ro")) == ["f"]


def test_setgid_directory(shared):
    os.mkdir(shared.path / "vault/team")
    os.chown(shared.path / "vault/team", 0, TEAM)
    os.chmod(shared.path / "vault/team", 0o2775)
    ok(as_user(shared, ALICE, "echo a > vault/team/f && mkdir vault/team/d", groups=(TEAM,)))
    f, d = (shared.vault / "team/f").stat(), (shared.vault / "team/d").stat()
    assert (f.st_uid, f.st_gid) == (ALICE, TEAM)
    assert (d.st_uid, d.st_gid) == (ALICE, TEAM) and d.st_mode & 0o2000
    denied(as_user(shared, CAROL, "echo c > vault/team/g"))  # not in the group
    # a new file keeps a setgid bit only for a group of its maker's
    os.chmod(shared.path / "vault/team", 0o3777)
    make = "import os; os.close(os.open('vault/team/{}', os.O_CREAT | os.O_WRONLY, 0o2755))"
    ok(as_user(shared, CAROL, f"python3 -c \"{make.format('s')}\""))
    ok(as_user(shared, ALICE, f"python3 -c \"{make.format('t')}\"", groups=(TEAM,)))
    assert (shared.vault / "team/s").stat().st_mode & 0o7777 == 0o755
    assert (shared.vault / "team/t").stat().st_mode & 0o7777 == 0o2755
    # an owner outside the file's group cannot make it setgid (the kernel clears it)
    ok(as_user(shared, CAROL, "echo c > vault/c && chmod 2755 vault/c"))
    os.chown(shared.path / "vault/c", CAROL, TEAM)
    ok(as_user(shared, CAROL, "chmod 2755 vault/c"))
    assert (shared.vault / "c").stat().st_mode & 0o7777 == 0o755
    os.mkdir(shared.path / "vault/cd")
    os.chown(shared.path / "vault/cd", CAROL, TEAM)
    ok(as_user(shared, CAROL, "chmod 2775 vault/cd"))
    assert (shared.vault / "cd").stat().st_mode & 0o7777 == 0o775
    ok(as_user(shared, CAROL, "chmod 2775 vault/cd", groups=(TEAM,)))
    assert (shared.vault / "cd").stat().st_mode & 0o7777 == 0o2775


def test_times(shared):
    ok(as_user(shared, ALICE, "echo a > vault/f && chmod 644 vault/f"))
    denied(as_user(shared, BOB, "touch vault/f"))
    denied(as_user(shared, BOB, "truncate -s 0 vault/f"))
    assert (shared.vault / "f").read_text() == "a\n"
    ok(as_user(shared, ALICE, "touch -d 2001-01-01 vault/f"))
    assert (shared.vault / "f").stat().st_mtime < 1e9 + 1e8


def test_hard_links_count(shared):
    ok(as_user(shared, ALICE, "echo a > vault/one && ln vault/one vault/two"))
    backing = shared.vault / "one"
    assert backing.stat().st_nlink == 2 and os.path.samefile(backing, shared.vault / "two")
    ok(as_user(shared, ALICE, "test $(stat -c %h vault/one) = 2"))
    # protected_hardlinks: no second name for a file one may not read and write
    ok(as_user(shared, ALICE, "chmod 600 vault/one"))
    denied(as_user(shared, BOB, "ln vault/one vault/bobs"), "not permitted")
    assert not (shared.vault / "bobs").exists()


def test_hard_links_are_one_inode(mount):
    """Every name of a file is one inode through the mount, as on disk: made through the
    mount or on disk, after either name was looked up, renamed or removed."""
    v = mount.path / "vault"
    (v / "one").write_text("a\n")
    before = os.stat(v / "one").st_ino
    os.link(v / "one", v / "two")  # one was looked up (one name) before the link
    one, two = os.stat(v / "one"), os.stat(v / "two")
    assert one.st_ino == two.st_ino == before and one.st_nlink == two.st_nlink == 2
    with open(v / "two", "a") as f:
        f.write("b\n")
    assert (v / "one").read_text() == "a\nb\n"
    inodes = {e.name: e.inode() for e in os.scandir(v)}
    assert inodes["one"] == inodes["two"] == before
    os.rename(v / "two", v / "three")
    assert os.stat(v / "three").st_ino == before
    os.unlink(v / "one")
    three = os.stat(v / "three")
    assert three.st_ino == before and three.st_nlink == 1
    assert (v / "three").read_text() == "a\nb\n"
    # names made on disk, behind the mount's back
    (mount.vault / "x").write_text("x\n")
    os.link(mount.vault / "x", mount.vault / "y")
    x, y = os.stat(v / "x"), os.stat(v / "y")
    assert x.st_ino == y.st_ino != before and x.st_nlink == y.st_nlink == 2
    # a new file does not take the number of one removed (its inode is the kernel's)
    os.unlink(v / "x")
    os.unlink(v / "y")
    (v / "x").write_text("new\n")
    assert os.stat(v / "x").st_ino != x.st_ino and (v / "x").read_text() == "new\n"


def gio_trash(mount: Mount, home: Path, rel: str, uid: int | None = None):
    """`gio trash` of rel in the mount (the local backend only, as a file manager's
    Delete), as uid (None: the operator, root), with its own HOME (another device: so
    the trash is the one at the mount's top)."""
    home.mkdir(exist_ok=True)
    env = f"HOME={home} GIO_USE_VFS=local GIO_USE_VOLUME_MONITOR=unix "
    cmd = env + f"gio trash {rel}"
    if uid is None:
        return subprocess.run(["sh", "-c", cmd], cwd=mount.path, capture_output=True,
                              text=True, timeout=60)
    os.chown(home, uid, uid)
    return as_user(mount, uid, cmd)


def trashed(vault: Path, uid: int, name: str) -> str:
    """The trashed file's text, after checking its trash info names where it was."""
    info = (vault / f".Trash-{uid}/info/{name}.trashinfo").read_text()
    assert "[Trash Info]" in info and f"Path=vault/{name}" in info, info
    return (vault / f".Trash-{uid}/files/{name}").read_text()


@pytest.mark.skipif(not shutil.which("gio"), reason="gio missing (apt-get install "
                    "libglib2.0-bin; scripts/system-deps.sh --test)")
def test_gio_trash(mount, tmp_path):
    (mount.path / "vault/doc.md").write_text("keep me\n")
    ok(gio_trash(mount, tmp_path / "home", "vault/doc.md"))
    assert not (mount.vault / "doc.md").exists()
    assert trashed(mount.vault, 0, "doc.md") == "keep me\n"
    assert (mount.vault / ".Trash-0").stat().st_mode & 0o777 == 0o700
    assert "doc.md" in os.listdir(mount.path / ".Trash-0/files")  # the same directory


@pytest.mark.skipif(not shutil.which("gio"), reason="gio missing (apt-get install "
                    "libglib2.0-bin; scripts/system-deps.sh --test)")
def test_gio_trash_as_another_user(shared, tmp_path):
    ok(as_user(shared, ALICE, "echo mine > vault/notes.md"))
    ok(as_user(shared, ALICE, "echo hers > vault/hers.md && chmod 666 vault/hers.md"))
    ok(gio_trash(shared, tmp_path / "alice", "vault/notes.md", ALICE))
    assert trashed(shared.vault, ALICE, "notes.md") == "mine\n"
    st = (shared.vault / f".Trash-{ALICE}").stat()
    assert (st.st_uid, st.st_mode & 0o777) == (ALICE, 0o700)
    # the sticky top: bob moves no file of alice's to his trash
    assert gio_trash(shared, tmp_path / "bob", "vault/hers.md", BOB).returncode != 0
    assert (shared.vault / "hers.md").read_text() == "hers\n"
