"""Changes made to the vault's backing directory directly (an editor, git, another
program) show up in the mount and are `vault_changed` events; changes made through
the mount are logged once, with their actor."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import WAIT_S, Events, wait_for

OPS_SOURCE = (Path(__file__).resolve().parent.parent / "fs9" / "face" / "ops.py").read_text()


def changes(events, done, timeout: float = WAIT_S) -> list[dict]:
    """The vault_changed events seen until done(them) holds, or timeout passed (the
    test's assertions then say what is missing)."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done(seen):
        seen += [e for e in map(json.loads, events.lines(0.1)) if e["kind"] == "vault_changed"]
    return seen


def saw(*changes):
    """A `done` for changes(): every (op, path) of changes was seen."""
    return lambda seen: set(changes) <= {(e["op"], e["path"]) for e in seen}


def test_direct_changes_show_up_and_are_events(mount, events):
    doc = mount.vault / "a.md"
    doc.write_text("one\n")
    t0 = time.monotonic()
    mount.wait_for(lambda: os.path.exists(mount.path / "vault" / "a.md"))
    assert mount.read("vault/a.md") == "one\n"
    with open(doc, "a") as f:
        f.write("two\n")
    assert mount.read("vault/a.md") == "one\ntwo\n"  # no stale cache: served from disk
    assert time.monotonic() - t0 < 10  # (seen without a remount or a rescan's wait)
    (mount.vault / "d").mkdir()
    # inotify watches a new directory once it saw it made
    seen = changes(events, saw(("created", "vault/a.md"), ("created", "vault/d")))
    os.rename(doc, mount.vault / "d" / "b.md")
    (mount.vault / "d" / "b.md").unlink()
    (mount.vault / ".swp").write_text("editor noise\n")  # dot names are not watched
    seen += changes(events, saw(("moved", "vault/a.md"), ("deleted", "vault/d/b.md")))
    got = [(e["op"], e["path"], e.get("dest")) for e in seen]
    assert got[0] == ("created", "vault/a.md", None)
    assert ("created", "vault/d", None) in got
    assert ("moved", "vault/a.md", "vault/d/b.md") in got
    assert got[-1] == ("deleted", "vault/d/b.md", None)
    assert set(o for o, _, _ in got) <= {"created", "modified", "moved", "deleted"}
    assert all("actor" not in e and ".swp" not in e["path"] for e in seen)  # nobody known
    assert not os.path.exists(mount.path / "vault" / "d" / "b.md")


@pytest.mark.skipif("vault_changed" not in OPS_SOURCE,
                    reason="face/ops.py does not report its vault changes yet")
def test_changes_through_the_mount_are_logged_once_with_their_actor(mount, events):
    mount.write("vault/m.md", "through the mount\n")
    os.rename(mount.path / "vault" / "m.md", mount.path / "vault" / "n.md")
    os.unlink(mount.path / "vault" / "n.md")
    seen = changes(events, saw(("created", "vault/m.md"), ("moved", "vault/m.md"),
                               ("deleted", "vault/n.md")))
    # then everything else, late duplicates included (a check that none comes: the
    # watcher's would come within ms; 3 s is also past fs9's memory of its own changes)
    seen += changes(events, lambda seen: False, timeout=3)
    got = [(e["op"], e["path"], e.get("dest"), e["actor"]) for e in seen]
    me = f"uid {os.getuid()}"
    assert ("created", "vault/m.md", None, me) in got
    assert ("moved", "vault/m.md", "vault/n.md", me) in got
    assert ("deleted", "vault/n.md", None, me) in got
    assert all(actor == me for *_, actor in got)  # the watcher added nothing
    assert len(got) == len(set(got))  # each change once


def audit(mount) -> list[dict]:
    return [json.loads(line) for line in mount.read("log/audit").splitlines()]


def test_a_deep_tree_moved_in_leaves_the_watcher_watching(mount, tmp_path):
    """1,200 nested folders made with `mkdir -p` outside and moved in (this once killed
    the watcher's thread: no later change was seen, and search failed after a remount):
    later changes, deep ones too, are still events and searchable, across a remount."""
    outside = tmp_path / "outside"
    outside.mkdir()
    try:
        _deep_tree_moved_in(mount, outside)
    finally:  # (rm: pytest's own clean-up of old temp dirs recurses: RecursionError)
        subprocess.run(["rm", "-rf", str(outside), str(mount.vault / "n")])


def _deep_tree_moved_in(mount, outside) -> None:
    from test_search import hits, ready
    ready(mount)
    events = Events(mount)
    subprocess.run(["mkdir", "-p", str(outside / "n") + "/d" * 1199], check=True)
    subprocess.run(["mv", str(outside / "n"), str(mount.vault / "n")], check=True)
    (mount.vault / "late.md").write_text("zebracorn\n")
    seen = changes(events, saw(("created", "vault/n"), ("created", "vault/late.md")))
    # (a folder that appears is one event; what it holds then comes with it: a file
    # made in it once it is watched is an event of its own)
    deep = ("n",) + ("d",) * 1199
    (mount.vault.joinpath(*deep) / "deep.md").write_text("okapi\n")
    deep_path = "/".join(("vault",) + deep + ("deep.md",))
    seen += changes(events, saw(("created", deep_path)))
    got = {(e["op"], e["path"]) for e in seen}
    assert {("created", "vault/n"), ("created", "vault/late.md"), ("created", deep_path)} <= got
    mount.wait_for(lambda: hits(mount, "zebracorn") and hits(mount, "okapi"),
                   what="the new files found by search")
    assert hits(mount, "okapi")[0].split()[1] == deep_path + ":1"
    assert not [e for e in audit(mount) if e["kind"] == "watch_unavailable"]
    events.close()
    mount.umount()
    mount.mount()
    ready(mount)
    assert hits(mount, "zebracorn")[0].split()[1] == "vault/late.md:1"
    assert hits(mount, "okapi")


def test_a_watcher_that_loses_changes_restarts_and_rescans(overflowing_mount):
    """The kernel's inotify queue overflows (8 events: the fixture): changes were lost,
    so the watcher says so (`watch_unavailable`), starts again, says so
    (`watch_restored`), and the index rescans: files written meanwhile are found, and
    changes after it are events one by one again."""
    from test_search import hits, ready
    mount = overflowing_mount
    ready(mount)
    ev = Events(mount)
    try:
        (mount.vault / "burst").mkdir()
        n = 600
        for i in range(n):
            (mount.vault / "burst" / f"f{i}.md").write_text(f"pelican note {i}\n")
        seen = ev.wait_kind("watch_unavailable")
        # (most likely still down: the first restart waits half a second)
        (mount.vault / "burst" / "meanwhile.md").write_text("cormorant\n")
        seen += ev.until(lambda s: any(e["kind"] == "watch_restored" for e in seen + s),
                         what="watch_restored")
        lost = next(e for e in seen if e["kind"] == "watch_unavailable")
        assert "overflowed" in lost["reason"]
        restored = next(e for e in seen if e["kind"] == "watch_restored")
        assert restored["after"] == lost["reason"] and restored["folders"] >= 2
        status = lambda: dict(line.split("=", 1) for line in  # noqa: E731
                              mount.read("search/status").splitlines())
        mount.wait_for(lambda: status()["docs"] == str(n + 1), what="every file indexed")
        assert int(status()["rescans"]) >= 1
        assert hits(mount, "cormorant")[0].split()[1] == "vault/burst/meanwhile.md:1"
        # the watches were rebuilt: later changes are seen one by one again
        (mount.vault / "burst" / "late.md").write_text("albatross\n")
        ev.until(lambda s: any(e["kind"] == "vault_changed" and e["path"] ==
                               "vault/burst/late.md" for e in s), what="the later change")
        mount.wait_for(lambda: hits(mount, "albatross"), what="a later change found")
    finally:
        ev.close()
    mount.umount()
    mount.mount()
    ready(mount)
    assert hits(mount, "cormorant") and hits(mount, "albatross")


RACER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
folder, host, seconds = sys.argv[1], sys.argv[2].encode(), float(sys.argv[3])
end, i = time.monotonic() + seconds, 0
while time.monotonic() < end and i < 1000:
    d, link = f"{folder}/d{i}".encode(), f"{folder}/l{i}".encode()
    os.mkdir(d)
    os.symlink(host, link)
    for _ in range(3):  # RENAME_EXCHANGE: the folder and the symlink swap names
        libc.renameat2(-100, d, -100, link, 2)
    i += 1
    time.sleep(0.002)  # (faster, it overflows the watcher's queue on a busy machine)
"""
SECRETS = r"""
import os, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
end, i = time.monotonic() + seconds, 0
while time.monotonic() < end:
    for where in (host, host + "/sub", host + "/sub/inner"):
        with open(f"{where}/secret-{i}", "w") as f:
            f.write("x")
    i += 1
    time.sleep(0.001)
"""


def test_a_folder_swapped_for_a_symlink_is_never_watched(mount, events, tmp_path):
    """A folder made in the vault and at once swapped (renameat2 RENAME_EXCHANGE) with a
    symlink to a host directory, a thousand times while files appear in that
    directory: the watcher adds its watches beneath the vault root only, so no change
    outside the vault is ever reported as a vault change."""
    host = tmp_path / "host"
    (host / "sub" / "inner").mkdir(parents=True)
    (mount.vault / "r").mkdir()
    changes(events, saw(("created", "vault/r")))
    secrets = subprocess.Popen([sys.executable, "-c", SECRETS, str(host), "6"])
    racer = subprocess.run([sys.executable, "-c", RACER, str(mount.vault / "r"), str(host), "4"],
                           timeout=60)
    assert racer.returncode == 0 and secrets.wait(timeout=60) == 0
    assert len(list(host.iterdir())) > 100  # the host directory did change meanwhile
    (mount.vault / "sentinel.md").write_text("after the race\n")  # reported after the rest
    changes(events, saw(("created", "vault/sentinel.md")))
    reported = [e for e in audit(mount) if e["kind"] == "vault_changed"]
    assert any(e["path"].startswith("vault/r/l") for e in reported)  # the race was watched
    assert not [e for e in reported if "secret" in e["path"] + e.get("dest", "")]


class Watching:
    """kernel/vault/watches.py over a plain directory (no mount): its changes, as lists."""

    def __init__(self, root, **kw) -> None:
        import threading
        from fs9.kernel.vault.beneath import VaultRoot
        from fs9.kernel.vault.watches import Watches
        self.root = VaultRoot(str(root))
        self.got: list = []
        self.watches = Watches(self.root, self.got.extend, **kw)
        ready = threading.Event()
        self.thread = threading.Thread(target=self.watches.run, args=(ready.set,), daemon=True)
        self.thread.start()
        assert ready.wait(WAIT_S)

    def wait(self, change) -> None:
        from conftest import wait_for
        wait_for(lambda: change in self.got, what=f"{change} among {self.got}")

    def close(self) -> None:
        self.watches.stop()
        self.thread.join(WAIT_S)
        self.root.close()


def test_watches_follow_exchanges_and_drop_what_leaves_the_vault(tmp_path):
    import ctypes
    vault, outside = tmp_path / "vault", tmp_path / "outside"
    (vault / "a" / "sub").mkdir(parents=True)
    (vault / "b").mkdir()
    outside.mkdir()
    w = Watching(vault)
    try:
        assert w.watches.watched == 4
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.renameat2(-100, bytes(vault / "a"), -100, bytes(vault / "b"), 2) == 0
        (vault / "b" / "sub" / "f").write_text("x")  # sub moved with its folder
        w.wait(("created", ("b", "sub", "f"), None, False))
        assert ("moved", ("a",), ("b",), True) in w.got
        os.rename(vault / "a", outside / "x")  # out of the vault: its watch goes
        w.wait(("deleted", ("a",), None, True))
        (outside / "x" / "g").write_text("x")
        (vault / ".git" / "objects").mkdir(parents=True)  # hidden: never watched
        (vault / ".git" / "objects" / "o").write_text("x")
        (vault / "b" / "late").write_text("x")
        w.wait(("created", ("b", "late"), None, False))
        assert not [c for c in w.got if "g" in c[1] or ".git" in c[1]]
        assert w.watches.watched == 3  # the root, b, b/sub
    finally:
        w.close()


def test_an_agent_making_folders_without_end_gets_its_share_of_the_watches(mount, events):
    """A confined agent owning vault/x (bound read-write from disk: fs9 sees its folders
    only through the watcher) makes more folders than its share of the watches
    (PER_OWNER): past it, its folders are not watched and a `watch_capped` event names
    it, while the watcher stays up for everyone: the operator's and another owner's
    changes are still events, and the operator's `cat status` answers at once."""
    from fs9.drivers import confine
    from fs9.kernel.vault.watches import PER_OWNER
    if confine.unavailable():
        pytest.skip(f"cannot confine here: {confine.unavailable()}")
    for d in ("x", "y", "docs"):
        (mount.vault / d).mkdir()
    n = PER_OWNER + 200
    maker = ("import os\nx = os.environ['FS9_MNT'] + '/vault/x'\n"
             f"for i in range({n}):\n    os.mkdir(f'{{x}}/d{{i}}')\n"
             "print('made', len(os.listdir(x)), flush=True)\n")
    mount.define("hoarder", 'cmd = ["python3", "make.py"]\nowns = ["vault/x"]\n'
                            '[unveil]\n"vault/x" = "rw"\n', {"make.py": maker})
    mount.define("other", 'cmd = ["sh", "-c", "echo note > $FS9_MNT/vault/y/note.md"]\n'
                          'owns = ["vault/y"]\n[unveil]\n"vault/y" = "rw"\n')
    mount.sh("echo 'spawn hoarder' > ctl; echo 'spawn other' > ctl", check=True)
    mount.write("agents/hoarder/in", "go\n")
    from conftest import wait_task
    out, err = wait_task(mount, "hoarder", 180)
    assert out == f"made {n}\n", err
    capped = [e for e in events.wait_kind("watch_capped") if e["kind"] == "watch_capped"][0]
    assert capped["agent"] == "hoarder" and capped["path"].startswith("vault/x/d")
    (mount.vault / "docs" / "after.md").write_text("the operator's\n")
    mount.write("agents/other/in", "go\n")
    seen = changes(events, saw(("created", "vault/docs/after.md"),
                               ("created", "vault/y/note.md")))
    assert {("created", "vault/docs/after.md"), ("created", "vault/y/note.md")} <= \
        {(e["op"], e["path"]) for e in seen}
    t = time.monotonic()
    mount.read("status")
    assert time.monotonic() - t < 10  # the operator not held up by the hoarder
    kinds = [e["kind"] for e in audit(mount)]
    assert "watch_unavailable" not in kinds and kinds.count("watch_capped") == 1


def test_owners_together_get_at_most_their_share_of_the_watches(tmp_path, monkeypatch):
    """The shares at work on a plain directory: each owner at most PER_OWNER folders,
    all owners together at most OWNED_SHARE; the operator's folders are always watched,
    and a folder removed gives its owner room again."""
    from fs9.kernel.vault import watches
    monkeypatch.setattr(watches, "PER_OWNER", 3)
    monkeypatch.setattr(watches, "OWNED_SHARE", 5)
    vault = tmp_path / "vault"
    for top in ("a", "b", "op"):
        for i in range(4):
            (vault / top / f"d{i}").mkdir(parents=True)
    owners = {"a": "agent-a", "b": "agent-b"}
    told: list = []
    w = Watching(vault, owner=lambda rel: owners.get(rel[0]),
                 capped=lambda who, rel: told.append((who, rel)))
    try:
        # the root, op and its 4 folders; a and 2 of its own (3); b and 1 (the share, 5)
        assert w.watches.watched == 1 + 5 + 5
        assert sorted(who for who, _ in told) == ["agent-a", "agent-b"]
        (vault / "op" / "late").mkdir()  # the operator's: watched
        wait_for(lambda: w.watches.watched == 1 + 5 + 6, what="op/late watched")
        (vault / "op" / "late" / "f").write_text("x")
        w.wait(("created", ("op", "late", "f"), None, False))
        os.rmdir(vault / "a" / "d0")  # room for one more of a's
        w.wait(("deleted", ("a", "d0"), None, True))
        wait_for(lambda: w.watches.watched == 1 + 6 + 4, what="a's watch on d0 gone")
        (vault / "a" / "new").mkdir()
        wait_for(lambda: w.watches.watched == 1 + 5 + 6, what="a/new watched")
        (vault / "a" / "new" / "g").write_text("x")
        w.wait(("created", ("a", "new", "g"), None, False))
        assert len(told) == 2  # each owner told once
    finally:
        w.close()
