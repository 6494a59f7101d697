r"""Every name Linux allows (any bytes but "/" and NUL) is served, indexed and answered,
and printed escaped wherever fs9 writes a path into a line-oriented file (issue 20,
item 7). Real mounts; the operator with shell tools and Python's bytes paths, a real
confined agent through its view.

  operator  creates, lists, reads, renames (both ends), links, symlinks (a bytes
            target), mknods, sets extended attributes on and removes such names, and
            the backing directory holds exactly those bytes;
  agent     the same from inside a confined agent (python, owning vault/x with the
            vault unveiled read-only, so its requests come through fs9), and through
            the operator's agents/NAME/view/; a refusal naming such a path is one line
            of its err;
  search    a file named with a newline and one not UTF-8 are answered escaped: no
            EIO, no forged line; their vault_changed events name them escaped, and no
            line of `events` is forged;
  remount   the log replays, the index loads, the names are still served and found.
"""
import errno
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import Events, errno_of
from fs9.drivers import confine

NAMES = {  # name on disk -> as fs9 prints it (kernel/names.py shown_path)
    b"\xff\xfe": r"\xff\xfe",  # not UTF-8
    b"\xed\xb3\xbf": r"\xed\xb3\xbf",  # a surrogate's UTF-8: three surrogate escapes
    b"caf\xe9": r"caf\xe9",  # Latin-1
    b"nl\nline": r"nl\nline",
    b"tab\there": r"tab\there",
    b"back\\slash": r"back\\slash",
    b"cr\rand\x1besc": r"cr\rand\x1besc",
    b"-dash": "-dash",
    b" spaced : out ": " spaced : out ",
    "zo\u00eb \u00fcn\u00efcode".encode(): "zo\u00eb \u00fcn\u00efcode",  # UTF-8: as it is
    b"sep\xe2\x80\xa8\xc2\x85": r"sep\u2028\u0085",  # line separators
    b"L" * 255: "L" * 255,  # the longest name
}
HIT = re.compile(r"\d+\.\d{3} vault/\S")  # every line of a search answer


def short(name: bytes, prefix: bytes) -> bytes:
    """prefix + name, within 255 bytes."""
    return prefix + name[:255 - len(prefix)]


def search(mount, query: str, root: str = "") -> bytes:
    with open(mount.path / root / "search" / query, "rb") as f:
        return f.read()


def events_of(mount) -> list[dict]:
    """The whole log (log/audit), each line parsed: a line that is no JSON object fails."""
    raw = (mount.path / "log" / "audit").read_bytes()
    lines = raw.decode("utf-8").split("\n")  # the log is UTF-8, whatever the names
    assert lines[-1] == "", lines[-1]
    events = [json.loads(line) for line in lines[:-1]]
    assert all(isinstance(e, dict) and "seq" in e for e in events)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # none forged
    return events


def changed(mount, kind="vault_changed") -> set[tuple]:
    return {(e["op"], e["path"], e.get("dest")) for e in events_of(mount) if e["kind"] == kind}


# --- the operator -------------------------------------------------------------------------

def test_the_operator_serves_every_name(mount):
    v = os.fsencode(mount.path / "vault")
    disk = os.fsencode(mount.vault)
    os.mkdir(v + b"/in\n\xff")  # a folder no text could name either
    for name in NAMES:
        p = v + b"/" + name
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"data of " + name.hex().encode() + b"\n")
        os.close(fd)
        assert os.stat(p).st_size == len(b"data of \n") + 2 * len(name)
        with open(p, "rb") as f:
            assert f.read() == b"data of " + name.hex().encode() + b"\n"
        # both ends of a rename, a hard link, a symlink whose target is such a name
        moved = v + b"/in\n\xff/" + name
        os.rename(p, moved)
        os.link(moved, v + b"/" + short(name, b"h"))
        os.symlink(b"in\n\xff/" + name, v + b"/" + short(name, b"s"))
        assert os.readlink(v + b"/" + short(name, b"s")) == b"in\n\xff/" + name
        os.mkdir(v + b"/" + short(name, b"d"))
        os.mkfifo(v + b"/" + short(name, b"f"))
        os.setxattr(v + b"/" + short(name, b"h"), b"user.n\xff\n", name)
        assert os.getxattr(v + b"/" + short(name, b"h"), b"user.n\xff\n") == name
        assert os.fsdecode(b"user.n\xff\n") in os.listxattr(v + b"/" + short(name, b"h"))
        # reached through the symlink, as a client resolves it
        with open(v + b"/" + short(name, b"s"), "rb") as f:
            assert f.read().startswith(b"data of ")
    expected = {short(n, p) for n in NAMES for p in (b"h", b"s", b"d", b"f")} | {b"in\n\xff"}
    assert set(os.listdir(v)) == expected  # the same bytes back from readdir
    assert set(os.listdir(disk)) == expected  # and on disk
    assert set(os.listdir(v + b"/in\n\xff")) == set(NAMES)
    assert os.getxattr(disk + b"/" + short(b"\xff\xfe", b"h"), b"user.n\xff\n") == b"\xff\xfe"
    assert errno_of(os.stat, v + b"/" + b"y" * 256) == errno.ENAMETOOLONG
    assert errno_of(os.stat, v + b"/absent\xff") == errno.ENOENT
    # the rest of the namespace: names are text, so such a name is no object there
    # (ENOENT, not EIO); a search query is text too, its bytes that are not UTF-8 U+FFFD
    mnt = os.fsencode(mount.path)
    for folder in (b"agents", b"topics", b"mail", b"mail/dead", b"log/trace", b"models",
                   b"registry", b"registry/by-capability"):
        for name in NAMES:
            assert errno_of(os.stat, mnt + b"/" + folder + b"/" + name) in \
                (errno.ENOENT, errno.ENAMETOOLONG), (folder, name)
    with open(v + b"/in\n\xff/q\xff", "wb") as f:
        f.write(b"a quokka\n")

    def quokka():
        with open(mnt + b"/search/\xff quokka", "rb") as f:
            answer = f.read()
        return answer if HIT.match(answer.decode("utf-8")) else None
    hit = mount.wait_for(quokka, what="the quokka indexed").decode("utf-8")
    assert hit.split(" ", 1)[1] == r"vault/in\n\xff/q\xff:1 a quokka" + "\n", hit
    os.unlink(v + b"/in\n\xff/q\xff")
    for name in NAMES:
        os.unlink(v + b"/in\n\xff/" + name)
        for prefix in (b"h", b"s", b"f"):
            os.unlink(v + b"/" + short(name, prefix))
        os.rmdir(v + b"/" + short(name, b"d"))
    os.rmdir(v + b"/in\n\xff")
    assert os.listdir(v) == [] and os.listdir(disk) == []


SHELL = r"""
set -e
cd vault
printf 'shell ocelot\n' > $'sh\nnl'
printf 'dash\n' > -dash
cat -- -dash
mv -- $'sh\nnl' $'sh\xff'
cp -- $'sh\xff' $'copy\t\\'
ln -s -- $'sh\xff' $'ln\xfe'
cat -- $'ln\xfe'
ls -1b
rm -- -dash $'copy\t\\'
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash missing: $'...' names")
def test_the_operator_uses_such_names_with_shell_tools(mount):
    r = subprocess.run(["bash", "-c", SHELL], cwd=mount.path, capture_output=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split(b"\n")
    assert lines[:2] == [b"dash", b"shell ocelot"]
    # ls -b: GNU ls prints each name escaped (octal), one per line
    assert set(lines[2:-1]) == {b"-dash", b"copy\\t\\\\", b"ln\\376", b"sh\\377"}, lines
    assert set(os.listdir(os.fsencode(mount.vault))) == {b"sh\xff", b"ln\xfe"}
    assert os.readlink(os.fsencode(mount.vault) + b"/ln\xfe") == b"sh\xff"


# --- an agent through its view ------------------------------------------------------------

AGENT_PY = r"""
import json, os, sys, time
names = [bytes.fromhex(h) for h in json.load(sys.stdin)]
mnt = os.fsencode(os.environ["FS9_MNT"])
x = mnt + b"/vault/x"
failed = []


def short(name, prefix):
    return prefix + name[:255 - len(prefix)]


def attempt(what, fn, *args):
    try:
        return fn(*args)
    except OSError as e:
        failed.append(f"{what}: {e!r}")


def make(p, data):
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read(p):
    with open(p, "rb") as f:
        return f.read()


# (within one folder: the sandbox's Landlock layers refuse a move across folders)
for n in names:
    p, r, d, h, s = (x + b"/" + short(n, c) for c in (b"", b"r", b"d", b"h", b"s"))
    data = b"agent ocelot " + n.hex().encode() + b"\n"
    attempt(f"create {n!r}", make, p, data)
    if attempt(f"read {n!r}", read, p) != data:
        failed.append(f"read {n!r}: not what was written")
    if n not in (attempt(f"list {n!r}", os.listdir, x) or []):
        failed.append(f"list {n!r}: not listed")
    attempt(f"rename {n!r}", os.rename, p, r)
    attempt(f"link {n!r}", os.link, r, h)
    attempt(f"symlink {n!r}", os.symlink, short(n, b"r"), s)
    if attempt(f"readlink {n!r}", os.readlink, s) != short(n, b"r"):
        failed.append(f"readlink {n!r}: not the target")
    if attempt(f"read through symlink {n!r}", read, s) != data:
        failed.append(f"read through symlink {n!r}: not the file")
    attempt(f"setxattr {n!r}", os.setxattr, h, b"user.n\xff", n)
    if attempt(f"getxattr {n!r}", os.getxattr, h, b"user.n\xff") != n:
        failed.append(f"getxattr {n!r}: not the value")
    attempt(f"mkdir {n!r}", os.mkdir, d)
    attempt(f"create inside {n!r}", make, d + b"/" + n, data)
    if attempt(f"read inside {n!r}", read, d + b"/" + n) != data:
        failed.append(f"read inside {n!r}: not what was written")
    attempt(f"unlink inside {n!r}", os.unlink, d + b"/" + n)
    attempt(f"rmdir {n!r}", os.rmdir, d)
    attempt(f"mkfifo {n!r}", os.mkfifo, x + b"/" + short(n, b"f"))
    attempt(f"unlink fifo {n!r}", os.unlink, x + b"/" + short(n, b"f"))
    attempt(f"unlink symlink {n!r}", os.unlink, s)
    attempt(f"unlink {n!r}", os.unlink, r)
# a refusal naming a path with a newline: one line of err
try:
    make(mnt + b"/vault/forged\nfs9: all clear", b"no\n")
    failed.append("a read-only folder took a file")
except PermissionError:
    pass
deadline, answer = time.monotonic() + 30, b""
while time.monotonic() < deadline:
    answer = read(mnt + b"/search/ocelot")
    if answer.count(b"\n") >= len(names):
        break
    time.sleep(0.1)
print(json.dumps({"failed": failed, "search": answer.hex(),
                  "listing": sorted(n.hex() for n in os.listdir(x))}))
"""

AGENT = """\
cmd = ["/usr/bin/python3", "names.py"]
pledge = ["read", "write"]
timeout_s = 120
owns = ["vault/x"]
[unveil]
"vault" = "r"
"vault/x" = "rw"
"search" = "r"
"""


@pytest.mark.skipif(confine.unavailable() is not None,
                    reason=f"cannot confine here: {confine.unavailable()}")
def test_an_agent_serves_every_name_through_its_view(mount):
    (mount.vault / "x").mkdir()
    mount.define("namer", AGENT, {"names.py": AGENT_PY})
    mount.write("ctl", "spawn namer\n")
    mount.write("agents/namer/in", json.dumps([n.hex() for n in NAMES]))
    st = mount.wait_for(lambda: (s := mount.status("namer"))["latest_state"] in
                        ("done", "failed") and s, timeout=120, what="namer's task")
    out = mount.read(f"agents/namer/tasks/{st['latest']}/out")
    assert st["latest_state"] == "done", (out, mount.read(f"agents/namer/tasks/{st['latest']}/err"))
    got = json.loads(out.strip().splitlines()[-1])
    assert got["failed"] == []
    kept = {short(n, b"h") for n in NAMES}
    assert {bytes.fromhex(h) for h in got["listing"]} == kept
    disk = os.fsencode(mount.vault / "x")
    assert set(os.listdir(disk)) == kept
    for n in NAMES:
        with open(disk + b"/" + short(n, b"h"), "rb") as f:
            assert f.read() == b"agent ocelot " + n.hex().encode() + b"\n"
        assert os.getxattr(disk + b"/" + short(n, b"h"), b"user.n\xff") == n
    # its search answer lists each kept name once, escaped, one hit per line
    lines = bytes.fromhex(got["search"]).decode("utf-8").splitlines()
    assert len(lines) == len(NAMES) and all(HIT.match(line) for line in lines), lines
    shown = {line.split(" ", 1)[1].split(":1 ", 1)[0] for line in lines}
    assert shown == {"vault/x/h" + NAMES[n][:254] for n in NAMES}  # (all ASCII past 254)
    # the refusal is one line of its err, the path escaped; and a `refused` event
    err = mount.read("agents/namer/err").splitlines()
    refusal = [line for line in err if "is read-only in the view of namer" in line]
    assert refusal == [r"fs9: vault/forged\nfs9: all clear is read-only in the view of namer "
                       "(unveil it with mode w or rw)"], err
    assert not any(line.startswith("fs9: all clear") for line in err), err
    assert any(e["kind"] == "refused" and e.get("file") == r"vault/forged\nfs9: all clear"
               for e in events_of(mount))
    # a name that is no agent's, refused at outbox/: said in one line too, no bug
    outbox = os.fsencode(mount.path / "agents/namer/outbox")
    assert errno_of(os.open, outbox + b"/nobody\n\xff", os.O_WRONLY | os.O_CREAT) == errno.ENOENT
    err = mount.read("agents/namer/err").splitlines()
    assert err[-1] == r"fs9: no such agent: nobody\n\xff", err
    assert [e["reason"] for e in events_of(mount)
            if e["kind"] == "refused" and e.get("file") == "outbox"] == [err[-1][5:]]
    # the operator, through the agent's view: the same names, made and moved there
    view = os.fsencode(mount.path / "agents/namer/view/vault/x")
    assert set(os.listdir(view)) == kept
    for n in NAMES:
        os.rename(view + b"/" + short(n, b"h"), view + b"/" + short(n, b"v"))
        with open(view + b"/" + short(n, b"v"), "rb") as f:
            assert f.read().startswith(b"agent ocelot ")
        os.unlink(view + b"/" + short(n, b"v"))
    assert os.listdir(disk) == []


# --- search, events, remount --------------------------------------------------------------

FORGERS = {  # made through the mount, made on disk (the watcher sees it): as printed
    b"a\n9.999 forged.md:1 pwned": r"a\n9.999 forged.md:1 pwned",
    b'w\n{"seq":1,"kind":"bug"}\xff': r'w\n{"seq":1,"kind":"bug"}\xff',
}


def test_search_and_events_print_every_name_escaped_and_a_remount_keeps_them(mount):
    events = Events(mount)
    try:
        through, on_disk = FORGERS
        with open(os.fsencode(mount.path / "vault") + b"/" + through, "wb") as f:
            f.write(b"first\nan ocelot here\n")
        with open(os.fsencode(mount.vault) + b"/" + on_disk, "wb") as f:
            f.write(b"an ocelot there\n")
        want = {f"vault/{shown}" for shown in FORGERS.values()}
        seen = events.until(lambda seen: want <= {e.get("path") for e in seen
                                                  if e["kind"] == "vault_changed"},
                            what="both names' vault_changed events")
        assert not [e for e in seen if e["kind"] == "bug"]
    finally:
        events.close()

    def answered():
        raw = search(mount, "ocelot")
        return raw if raw.count(b"\n") == 2 else None
    raw = mount.wait_for(answered, what="both names indexed")
    lines = raw.decode("utf-8").splitlines()  # UTF-8, no EIO
    assert all(HIT.match(line) for line in lines) and len(lines) == 2, lines
    assert any(line.split(" ", 1)[1].startswith(r"vault/a\n9.999 forged.md:1 pwned:2 ")
               for line in lines), lines
    assert any(line.split(" ", 1)[1].startswith(r'vault/w\n{"seq":1,"kind":"bug"}\xff:1 ')
               for line in lines), lines
    assert not any(line.startswith("9.999") for line in lines)
    # in the log: the paths escaped; no forged line (events_of), no bug
    paths = {path for _, path, _ in changed(mount)}
    assert want <= paths, paths
    assert not [e for e in events_of(mount) if e["kind"] == "bug"]

    mount.umount()
    mount.mount()  # replays the log, loads the index
    assert want <= {path for _, path, _ in changed(mount)}
    v = os.fsencode(mount.path / "vault")
    assert set(os.listdir(v)) == set(FORGERS)
    with open(v + b"/" + on_disk, "rb") as f:
        assert f.read() == b"an ocelot there\n"
    assert mount.wait_for(answered, what="the names found after a remount") == raw
    os.rename(v + b"/" + through, v + b"/" + on_disk + b"2")
    move = ("moved", f"vault/{FORGERS[through]}", f"vault/{FORGERS[on_disk]}2")
    mount.wait_for(lambda: move in changed(mount), what="the rename's event")
