"""A file manager works: GIO (the library under GNOME's and Xfce's file managers)
browses the whole mount promptly and never hangs on a stream or a ctl file.

GIO sniffs a file's content type by reading its first bytes, but never reads a regular
file whose size is 0 (it answers text/plain without opening it, because of /proc and
/sys). fs9's streams (`events`, `out`, `err`, `topics/*`, `mail/next`) block on read
like pipes, so they must report size 0; files that report a size (ctl, status, ...)
must answer a read at once. These tests run the real `gio` on every path.
"""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not shutil.which("gio"),
    reason="gio missing (apt-get install libglib2.0-bin; scripts/system-deps.sh --test)")

PER_CALL = 2.0    # seconds one gio call may take
HANG = 15.0       # a call still running after this is a hang: killed, reported
TOTAL = 90.0      # the whole walk

# Only the local file backend: measure fs9, not a D-Bus session (gvfs) that may be absent.
ENV = {**os.environ, "GIO_USE_VFS": "local", "GIO_USE_VOLUME_MONITOR": "unix"}

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489")


def gio(*args: str) -> tuple[subprocess.CompletedProcess | None, float]:
    """Run gio; (result, seconds). The result is None when gio hung and was killed."""
    start = time.monotonic()
    try:
        r = subprocess.run(["gio", *args], capture_output=True, text=True, env=ENV,
                           timeout=HANG, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        r = None
    return r, time.monotonic() - start


def attrs(info: str) -> dict[str, str]:
    """`gio info` output: the `  key: value` lines under `attributes:`."""
    out = {}
    for line in info.split("attributes:", 1)[-1].splitlines():
        key, sep, value = line.strip().partition(": ")
        if sep:
            out[key] = value
    return out


def populate(mount) -> None:
    """Agents in every state a stream can be in, mail, a topic, a vault with notes."""
    mount.sh("echo 'spawn echo' > ctl && echo 'spawn counter' > ctl"
             " && echo 'spawn ticker' > ctl && echo 'run hello' > agents/echo/ctl"
             " && echo 600 > agents/counter/in && echo queued > agents/counter/in"
             " && echo 'first news' > topics/news && touch topics/quiet"
             " && printf 'type: notice\\n\\nplease read\\n' > agents/echo/mail/new", check=True)
    mount.wait_for(lambda: mount.status("echo")["done"] == "1", what="echo's task")
    mount.wait_for(lambda: mount.status("counter")["state"] == "running", what="counter runs")
    vault = mount.vault  # the backing directory: the vault is served as it is on disk
    (vault / "notes" / "projects").mkdir(parents=True)
    (vault / "notes" / "welcome.md").write_text("# Welcome\n\nThe vault is plain files.\n")
    (vault / "notes" / "todo.txt").write_text("- try gio\n")
    (vault / "notes" / "projects" / "fs9.md").write_text("# fs9\n\n* a file manager works\n")
    (vault / "notes" / "empty.md").write_text("")
    (vault / "journal").write_text("No extension: sniffed from its bytes.\n")   # text/plain
    (vault / "picture").write_bytes(PNG)                                      # image/png
    (vault / "latest.md").symlink_to("notes/welcome.md")


def walk(mount) -> tuple[dict[str, dict[str, str]], list[str]]:
    """`gio list` every directory (from the root down, with the content types it
    reports) and `gio info` (every attribute, content sniffing included) every path.
    Returns {relative path: gio info attributes}, and the problems found."""
    root = mount.path
    problems, seen, infos = [], {}, {}
    start = time.monotonic()

    def check(what: str, rel: str, r, took: float) -> bool:
        if r is None:
            problems.append(f"{what} {rel or '.'}: hung (killed after {HANG:.0f} s)")
            return False
        if took > PER_CALL:
            problems.append(f"{what} {rel or '.'}: took {took:.2f} s")
        if r.returncode != 0 and os.path.lexists(root / rel):  # vanished meanwhile: fine
            problems.append(f"{what} {rel or '.'}: exit {r.returncode}: {r.stderr.strip()}")
        return r.returncode == 0

    todo = [""]
    while todo:
        rel = todo.pop()
        r, took = gio("list", "-h", "-l", "-a", "standard::content-type", str(root / rel))
        if not check("gio list", rel, r, took):
            continue
        for line in r.stdout.splitlines():
            name, size, kind, *rest = line.split("\t")
            child = f"{rel}/{name}".lstrip("/")
            seen[child] = {"size": size, "type": kind.strip("()"),
                           **dict(a.split("=", 1) for a in rest)}
            if kind == "(directory)":
                todo.append(child)
    for rel in ["", *sorted(seen)]:
        r, took = gio("info", str(root / rel))
        if check("gio info", rel, r, took):
            infos[rel] = attrs(r.stdout)
    elapsed = time.monotonic() - start
    if elapsed > TOTAL:
        problems.append(f"the whole walk took {elapsed:.1f} s")
    return infos, problems


STREAMS = ["events", "mail/next", "topics/news", "topics/quiet",
           "agents/echo/out", "agents/echo/err", "agents/echo/mail/next",
           "agents/counter/out", "agents/counter/err", "agents/counter/mail/next",
           "agents/ticker/out", "agents/ticker/err"]


def test_gio_browses_the_whole_mount_promptly_and_never_hangs(mount):
    populate(mount)
    infos, problems = walk(mount)
    assert not problems, "\n".join(problems)

    # it really went everywhere: root files, every agent, tasks, views, log, registry
    tasks = mount.sh("ls agents/counter/tasks", check=True).stdout.split()
    expected = ["", "ctl", "status", "events", "log/audit", "mail/next", "topics/news",
                "registry/echo", "registry/by-capability/echo", "vault/notes/welcome.md",
                "agents/echo/view/agents/echo/out", "agents/echo/manifest", "agents/echo/in",
                *(f"agents/counter/tasks/{t}/{f}" for t in tasks for f in ("out", "input"))]
    assert not [p for p in expected if p not in infos], sorted(infos)
    assert any(p.startswith("log/trace/") for p in infos)
    assert any(p.startswith("agents/echo/mail/") and p[-1].isdigit() for p in infos)

    # streams report size 0, so GIO types them without reading (a read would block)
    for path in STREAMS + [p for p in infos if p.endswith(("/out", "/err"))]:
        assert infos[path]["standard::size"] == "0", (path, infos[path])
        assert infos[path]["standard::content-type"] == "text/plain", (path, infos[path])
    # files with contents were sniffed: they answered a read at once
    for path in ["ctl", "status", "agents/echo/status", "agents/echo/manifest", "registry/echo"]:
        assert int(infos[path]["standard::size"]) > 0, path
        assert infos[path]["standard::content-type"] == "text/plain", (path, infos[path])

    # nothing was consumed: the streams still work, fs9 still answers
    mount.write("topics/news", "second news")
    assert "counter running" in mount.read("status")
    assert mount.read("agents/echo/out") == "hello\n"
    assert mount.alive()


@pytest.mark.skipif(not Path("/usr/share/mime/mime.cache").exists(),
                    reason="no MIME database (apt-get install shared-mime-info)")
def test_gio_types_vault_files_by_name_and_by_content(mount):
    populate(mount)
    infos, problems = walk(mount)
    assert not problems, "\n".join(problems)
    types = {p[len("vault/"):]: a["standard::content-type"]
             for p, a in infos.items() if p.startswith("vault/")}
    assert types == {
        "notes": "inode/directory",
        "notes/projects": "inode/directory",
        "notes/welcome.md": "text/markdown",
        "notes/projects/fs9.md": "text/markdown",
        "notes/todo.txt": "text/plain",
        "notes/empty.md": "text/plain",    # size 0: never read, whatever its name
        "journal": "text/plain",       # no extension: sniffed from its bytes
        "picture": "image/png",        # no extension: sniffed from its bytes
        "latest.md": "text/markdown",  # a symlink: gio info follows it
    }
    assert infos["vault"]["standard::content-type"] == "inode/directory"
    assert infos["vault/picture"]["standard::fast-content-type"] != "image/png"  # so it read
