"""vault/ through the mount behaves as the disk does (POSIX, extended attributes),
plus fs9's ownership attributes; all on a real mount.

The differential test runs random sequences of file operations twice, inside the
mounted vault and in a plain directory of the native filesystem, and wants the
same result or the same errno at every step, and the same tree at the end.
FS9_LONG=1 runs it long (scripts/vault-stress.sh).
"""
import ctypes
import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import wait_for
from test_robustness import STRESSORS

LONG = os.environ.get("FS9_LONG") == "1"
FS9_XATTRS = ("user.fs9.owner", "user.fs9.classification")

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), ctypes.c_uint(flags)):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# --- the differential test ---------------------------------------------------------------

NAMES = ["f", "g", "a", "b", "a/f", "a/g", "a/c", "a/c/f", "b/f", "b/a", "l", "a/l"]
TARGETS = ["f", "a", "a/f", "../f", "../a", "c/f", "l", "nowhere", "a/c"]
XNAMES = ["user.x", "user.y", "user.fs9.owner"]
MODES = [0o644, 0o600, 0o755, 0o700, 0o444, 0o000, 0o4755, 0o2755, 0o1777, 0o666]

path_ = st.sampled_from(NAMES)
OPS = st.one_of(
    st.tuples(st.just("create"), path_, st.sampled_from(MODES),
              st.sampled_from([0, os.O_EXCL, os.O_TRUNC])),
    st.tuples(st.just("write"), path_, st.sampled_from([0, 1, 4095, 4096, 70000, 1 << 20]),
              st.binary(max_size=5000)),
    st.tuples(st.just("append"), path_, st.binary(min_size=1, max_size=100)),
    st.tuples(st.just("truncate"), path_, st.sampled_from([0, 1, 100, 4096, 100000])),
    st.tuples(st.just("read"), path_),
    st.tuples(st.just("rename"), path_, path_,
              st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])),
    st.tuples(st.just("mkdir"), path_, st.sampled_from([0o755, 0o700, 0o2775])),
    st.tuples(st.just("rmdir"), path_),
    st.tuples(st.just("unlink"), path_),
    st.tuples(st.just("symlink"), st.sampled_from(TARGETS), path_),
    st.tuples(st.just("readlink"), path_),
    st.tuples(st.just("link"), path_, path_),
    st.tuples(st.just("chmod"), path_, st.sampled_from(MODES)),
    st.tuples(st.just("utime"), path_, st.integers(0, 2**40), st.integers(0, 2**40)),
    st.tuples(st.just("setxattr"), path_, st.sampled_from(XNAMES), st.binary(max_size=64),
              st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE])),
    st.tuples(st.just("getxattr"), path_, st.sampled_from(XNAMES)),
    st.tuples(st.just("removexattr"), path_, st.sampled_from(XNAMES)),
    st.tuples(st.just("listxattr"), path_),
    st.tuples(st.just("stat"), path_, st.booleans()),
    st.tuples(st.just("listdir"), path_),
)


def lstat_of(st_: os.stat_result) -> tuple:
    kind = stat.S_IFMT(st_.st_mode)
    return (kind, stat.S_IMODE(st_.st_mode), None if kind == stat.S_IFDIR else st_.st_size,
            st_.st_nlink, st_.st_uid, st_.st_gid)


def apply(root: str, op: tuple, on_mount: bool):
    """One operation under root: ("ok", value) or ("err", errno)."""
    name, *args = op
    p = lambda rel: os.path.join(root, rel)  # noqa: E731
    try:
        if name == "create":
            rel, mode, flags = args
            os.close(os.open(p(rel), os.O_WRONLY | os.O_CREAT | flags, mode))
            return "ok", lstat_of(os.lstat(p(rel)))
        if name in ("write", "append"):
            rel = args[0]
            fd = os.open(p(rel), os.O_WRONLY | (os.O_APPEND if name == "append" else 0))
            try:
                n = os.write(fd, args[1]) if name == "append" else os.pwrite(fd, args[2], args[1])
            finally:
                os.close(fd)
            return "ok", n
        if name == "truncate":
            return "ok", os.truncate(p(args[0]), args[1])
        if name == "read":
            with open(p(args[0]), "rb") as f:
                return "ok", f.read()
        if name == "rename":
            return "ok", renameat2(p(args[0]), p(args[1]), args[2])
        if name == "mkdir":
            os.mkdir(p(args[0]), args[1])
            return "ok", lstat_of(os.lstat(p(args[0])))
        if name == "rmdir":
            return "ok", os.rmdir(p(args[0]))
        if name == "unlink":
            return "ok", os.unlink(p(args[0]))
        if name == "symlink":
            return "ok", os.symlink(args[0], p(args[1]))
        if name == "readlink":
            return "ok", os.readlink(p(args[0]))
        if name == "link":
            return "ok", os.link(p(args[0]), p(args[1]), follow_symlinks=False)
        if name == "chmod":
            return "ok", os.chmod(p(args[0]), args[1])
        if name == "utime":
            os.utime(p(args[0]), ns=(args[1], args[2]))
            s = os.stat(p(args[0]))
            return "ok", s.st_mtime_ns  # (atime: the backing directory's relatime)
        if name == "setxattr":
            rel, xname, value, flags = args
            if on_mount or xname not in FS9_XATTRS:
                return "ok", os.setxattr(p(rel), xname, value, flags)
            os.stat(p(rel))  # ENOENT first, as the mount
            # what fs9 answers for its read-only attributes (pyfuse3 checks XATTR_CREATE)
            return "err", "EEXIST" if flags == os.XATTR_CREATE else "EPERM"
        if name == "getxattr":
            rel, xname = args
            if xname in FS9_XATTRS:  # present on every vault file: compare existence only
                if on_mount:
                    os.getxattr(p(rel), xname)
                else:
                    os.stat(p(rel))
                return "ok", "fs9"
            return "ok", os.getxattr(p(rel), xname)
        if name == "removexattr":
            rel, xname = args
            if on_mount or xname not in FS9_XATTRS:
                return "ok", os.removexattr(p(rel), xname)
            os.stat(p(rel))
            return "err", "EPERM"
        if name == "listxattr":
            return "ok", sorted(n for n in os.listxattr(p(args[0])) if n not in FS9_XATTRS)
        if name == "stat":
            rel, follow = args
            return "ok", lstat_of(os.stat(p(rel)) if follow else os.lstat(p(rel)))
        if name == "listdir":
            return "ok", sorted(os.listdir(p(args[0])))
    except OSError as e:
        return "err", errno.errorcode.get(e.errno, e.errno)
    raise AssertionError(f"unknown op {op}")


def snapshot(root: str) -> dict:
    """Everything a walk of root shows: kinds, modes, sizes, links, contents, xattrs."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        for n in dirs + files:
            full = os.path.join(folder, n)
            s = os.lstat(full)
            entry = lstat_of(s)
            if stat.S_ISLNK(s.st_mode):
                entry += (os.readlink(full),)
            else:
                if stat.S_ISREG(s.st_mode):
                    entry += (Path(full).read_bytes(),)
                entry += (sorted((x, os.getxattr(full, x, follow_symlinks=False))
                                 for x in os.listxattr(full, follow_symlinks=False)
                                 if x not in FS9_XATTRS),)
            tree[os.path.relpath(full, root)] = entry
    return tree


def seed_tree(root: str) -> None:
    os.makedirs(os.path.join(root, "a/c"))
    os.mkdir(os.path.join(root, "b"))
    Path(root, "f").write_bytes(b"hello\n")
    Path(root, "a/f").write_bytes(b"x" * 5000)


def test_vault_behaves_as_the_native_filesystem(mount, tmp_path):
    native_base = tmp_path / "native"
    native_base.mkdir()
    counter = iter(range(10**9))

    @settings(max_examples=1500 if LONG else 100, deadline=None,
              derandomize=not LONG, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(OPS, min_size=1, max_size=40))
    def run(ops):
        n = next(counter)
        on_mount = str(mount.path / "vault" / f"ex{n}")
        backing, native = str(mount.vault / f"ex{n}"), str(native_base / f"ex{n}")
        seed_tree(backing)
        seed_tree(native)
        try:
            for i, op in enumerate(ops):
                got, want = apply(on_mount, op, True), apply(native, op, False)
                assert got == want, f"step {i} {op}: mount {got}, native {want}"
            assert snapshot(on_mount) == snapshot(native)
        finally:
            shutil.rmtree(backing)
            shutil.rmtree(native)

    run()
    assert mount.alive()


# --- ownership attributes, large and sparse files, big directories -----------------------

CODER = '''cmd = ["cat"]
owns = ["vault/code"]
clearance = "confidential"
'''


def test_ownership_shows_as_extended_attributes(mount):
    (mount.vault / "code").mkdir()
    (mount.vault / "code/x.py").write_text("x\n")
    (mount.vault / "docs").mkdir()
    mount.define("coder", CODER)
    mount.write("ctl", "spawn coder\n")
    v = mount.path / "vault"
    for rel in ("code", "code/x.py"):
        assert os.getxattr(v / rel, "user.fs9.owner") == b"coder"
        assert os.getxattr(v / rel, "user.fs9.classification") == b"confidential"
        assert {"user.fs9.owner", "user.fs9.classification"} <= set(os.listxattr(v / rel))
    assert os.getxattr(v / "docs", "user.fs9.owner") == b""
    assert os.getxattr(v / "docs", "user.fs9.classification") == b""  # no label: the operator's
    # an agent's view shows the same; nobody sets them
    assert os.getxattr(mount.path / "agents/coder/view/vault/code/x.py", "user.fs9.owner") == b"coder"
    for target in (v / "code/x.py", mount.path / "agents/coder/view/vault/code/x.py"):
        for name in ("user.fs9.owner", "user.fs9.classification"):
            with pytest.raises(PermissionError):
                os.setxattr(target, name, b"me")
            with pytest.raises(PermissionError):
                os.removexattr(target, name)
    # real attributes sit beside them, and reach the disk
    os.setxattr(v / "code/x.py", "user.note", b"hi")
    assert os.getxattr(mount.vault / "code/x.py", "user.note") == b"hi"
    assert "user.note" in os.listxattr(v / "code/x.py")
    # the namespace outside the vault has none, and says so at once
    with pytest.raises(OSError) as e:
        os.getxattr(mount.path / "status", "user.fs9.owner")
    assert e.value.errno == errno.ENODATA
    assert os.listxattr(mount.path / "status") == []
    with pytest.raises(OSError) as e:
        os.setxattr(mount.path / "status", "user.x", b"1")
    assert e.value.errno == errno.ENOTSUP


def test_agents_set_only_user_attributes(mount):
    (mount.vault / "code").mkdir()
    (mount.vault / "code/x.py").write_text("x\n")
    mount.define("coder", CODER)
    mount.write("ctl", "spawn coder\n")
    f = mount.path / "agents/coder/view/vault/code/x.py"
    os.setxattr(f, "user.ok", b"1")
    for name in ("trusted.x", "security.capability"):
        with pytest.raises(PermissionError):
            os.setxattr(f, name, b"\x01\x00\x00\x02" + b"\x00" * 16)
    os.setxattr(mount.path / "vault/code/x.py", "trusted.root", b"1")  # root, the operator
    assert os.getxattr(mount.vault / "code/x.py", "trusted.root") == b"1"


def test_large_and_sparse_files(mount):
    f = mount.path / "vault/big"
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with open(f, "wb") as out:
        for _ in range(64):
            out.write(chunk)
    assert os.stat(f).st_size == 64 << 20
    with open(f, "rb") as inp:
        inp.seek(63 << 20)
        assert inp.read() == chunk
    assert os.stat(f).st_blocks == os.stat(mount.vault / "big").st_blocks
    sparse = mount.path / "vault/sparse"
    fd = os.open(sparse, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"end", (1 << 34) - 3)  # 16 GiB, three bytes on disk
        assert os.fstat(fd).st_size == 1 << 34
        assert os.pread(fd, 4, 1 << 30) == b"\0" * 4
        assert os.pread(fd, 10, (1 << 34) - 3) == b"end"
        # the kernel answers SEEK_DATA/SEEK_HOLE for a FUSE file itself: the whole
        # file is data, the hole is at its end
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 1 << 34
    finally:
        os.close(fd)
    st_ = os.stat(sparse)
    assert st_.st_blocks < 64 and st_.st_blocks == os.stat(mount.vault / "sparse").st_blocks
    os.truncate(sparse, 1 << 20)
    assert os.stat(sparse).st_size == 1 << 20


def test_cold_reads_come_in_big_requests(mount):
    """The mount reads ahead 1 MiB (FUSE's default, 128 KiB, made cold reads 0.3x native)."""
    if os.geteuid() != 0:
        pytest.skip("only root sets a mount's read-ahead")
    dev = os.stat(mount.path).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert bdi.read_text().strip() == "1024"
    f = mount.path / "vault/cold"
    f.write_bytes(os.urandom(4 << 20))
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
    assert f.read_bytes() == (mount.vault / "cold").read_bytes()


def test_two_thousand_files_in_one_directory(mount):
    d = mount.path / "vault/many"
    d.mkdir()
    for i in range(2000):
        (d / f"file-{i:05d}").write_text(str(i))
    names = os.listdir(d)
    assert sorted(names) == [f"file-{i:05d}" for i in range(2000)]
    assert sorted(os.listdir(mount.vault / "many")) == sorted(names)
    assert (d / "file-01999").read_text() == "1999"
    for i in range(0, 2000, 2):
        os.unlink(d / f"file-{i:05d}")
    assert len(os.listdir(d)) == 1000


def test_what_an_agent_uid_makes_is_its_own(mount):
    """A non-root caller (here the agent's own uid, through its view, as its sandbox
    would) gets files owned by its uid and gid, whatever it makes."""
    (mount.vault / "code").mkdir()
    mount.define("coder", CODER.replace('["cat"]', '["sh", "work.sh"]'),
                 {"work.sh": "cat >/dev/null; id -u > $FS9_MNT/vault/code/whoami\n"})
    mount.write("ctl", "spawn coder\n")
    mount.write("agents/coder/in", "go\n")
    mount.wait_for(lambda: mount.status("coder")["done"] == "1", what="the agent's task")
    uid = int((mount.vault / "code/whoami").read_text())
    # in its sandbox the owned subtree is bound idmapped: what it makes there is stored
    # as the subtree owner's on disk (root's here), not as the agent uid's
    assert uid >= 10_000_000
    assert os.stat(mount.vault / "code/whoami").st_uid == os.stat(mount.vault / "code").st_uid
    # through fs9 (its view in the operator's tree), what the agent's uid makes is its own
    v = mount.path / "agents/coder/view/vault/code"
    script = ("set -e; cd " + str(v) + "; echo hi > file; mkdir dir; ln -s file link; "
              "mkfifo fifo; ln file hard; mv file moved; chmod 600 moved; "
              "touch -d @5 moved; echo ok")
    r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                        "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    for name in ("moved", "dir", "link", "fifo", "hard"):
        s = os.lstat(mount.vault / "code" / name)
        assert (s.st_uid, s.st_gid) == (uid, uid), name
    assert stat.S_ISFIFO(os.lstat(mount.vault / "code/fifo").st_mode)
    assert stat.S_IMODE(os.lstat(mount.vault / "code/moved").st_mode) == 0o600
    assert os.lstat(mount.vault / "code/moved").st_mtime == 5
    # an agent gives nothing away, makes no setuid file, and no device
    for cmd in (f"chown 0 {v}/moved", f"chmod u+s {v}/moved", f"mknod {v}/null c 1 3"):
        r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                            "sh", "-c", cmd], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, cmd
    fd = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                         "/usr/bin/python3", "-c", f"import os; os.close(os.open('{v}/suid', "
                         "os.O_CREAT | os.O_WRONLY, 0o4755))"], capture_output=True, text=True)
    assert fd.returncode == 0, fd.stderr
    assert not os.stat(mount.vault / "code/suid").st_mode & (stat.S_ISUID | stat.S_ISGID)


def test_rename_flags(mount):
    v = str(mount.path / "vault")
    Path(v, "x").write_text("x")
    Path(v, "y").write_text("y")
    with pytest.raises(FileExistsError):
        renameat2(f"{v}/x", f"{v}/y", RENAME_NOREPLACE)
    renameat2(f"{v}/x", f"{v}/y", RENAME_EXCHANGE)
    assert Path(v, "x").read_text() == "y" and Path(v, "y").read_text() == "x"
    renameat2(f"{v}/x", f"{v}/z", RENAME_NOREPLACE)
    assert sorted(os.listdir(v)) == ["y", "z"]
    with pytest.raises(OSError) as e:
        renameat2(f"{v}/z", f"{v}/y", RENAME_NOREPLACE | RENAME_EXCHANGE)
    assert e.value.errno == errno.EINVAL


# --- stress-ng against the vault -----------------------------------------------------------

# not chown (stress-ng's chown gives files away, refused here by design) nor fsize
# (RLIMIT_FSIZE binds the writing process; through FUSE fs9 writes, and fallocate is not
# checked against the caller's limit at all)
VAULT_STRESSORS = [s for s in STRESSORS if s not in ("chown", "fsize")]


def walk(root: Path) -> dict:
    out = {}
    for folder, dirs, files in os.walk(root):
        for n in dirs + files:
            full = os.path.join(folder, n)
            s = os.lstat(full)
            out[os.path.relpath(full, root)] = (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode),
                                                 None if stat.S_ISDIR(s.st_mode) else s.st_size)
    return out


def started(text: str) -> dict[int, str] | None:
    """The stressors stress-ng has started (`-v` logs `NAME: started [PID]`): pid -> name;
    None until all it dispatched have."""
    hogs = re.search(r"dispatching hogs: (.*)", text)
    pids = {int(pid): name for name, pid in re.findall(r"\] (\S+): started \[(\d+)\]", text)}
    if not hogs or len(pids) < sum(int(h.split()[0]) for h in hogs.group(1).split(", ")):
        return None
    return pids


def setting_up(pid: int) -> bool:
    """stress-ng's title for the process says it is still setting up (start, init)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return re.search(rb"\[(start|init)\]", f.read()) is not None
    except OSError:
        return False


def failed(text: str) -> set[str]:
    """The stressors that reported a failure (` fail: ` lines) in stress-ng's output."""
    return {line.split("]", 1)[1].split(":")[0].strip()
            for line in text.splitlines() if " fail: " in line and "]" in line}


def stress_ng(argv: list[str], seconds: int, log: Path):
    """Run stress-ng for `seconds` once all its stressors have started, and end it as its
    --timeout would: SIGALRM to each stressor. Returns the run, its output up to the
    deadline, and the stressors still setting up at the deadline: on a loaded machine a
    setup through FUSE can outlast the run, and a stressor cut short there may then check
    what it left half-made (file-ioctl: fs9 has no fallocate(2), so stress-ng writes the
    1 MiB file instead, and stops writing at the deadline)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv[:1] + ["-v", "--timeout", f"{seconds + 300}s"] + argv[1:],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or started(log.read_text(errors="replace")),
                 what="stress-ng to start its stressors")
        pids = started(log.read_text(errors="replace")) or {}
        time.sleep(seconds)  # the stress itself (its length, not a wait for something)
        at_deadline = log.read_text(errors="replace")
        cut = {name for pid, name in pids.items() if setting_up(pid)}
        for pid in pids:
            try:
                os.kill(pid, signal.SIGALRM)
            except ProcessLookupError:
                pass
        proc.wait(timeout=seconds + 300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run = subprocess.CompletedProcess(argv, proc.returncode, log.read_text(errors="replace"), "")
    return run, at_deadline, cut


@pytest.mark.timeout(300)
def test_stress_ng_against_the_vault(mount):
    if not shutil.which("stress-ng"):
        pytest.skip("stress-ng is not installed (apt-get install stress-ng)")
    have = set(subprocess.run(["stress-ng", "--stressors"], capture_output=True, text=True,
                              timeout=30).stdout.split())
    stressors = sorted({s for s in VAULT_STRESSORS if s in have})
    seconds = int(os.environ.get("FS9_STRESS_S", "60" if LONG else "6"))
    argv = ["stress-ng", "--temp-path", str(mount.path / "vault"),
            "--metrics-brief", "--hdd-bytes", "16M", "--verify"]
    for s in stressors:
        argv += [f"--{s}", "1"]
    r, at_deadline, cut = stress_ng(argv, seconds, mount.root / "stress-ng.log")
    out = r.stdout + r.stderr
    # what a stressor still setting up at the deadline reports afterwards is about its
    # own cut-short setup, not about fs9
    fails = sorted(failed(at_deadline) | (failed(out[len(at_deadline):]) - cut))
    print(f"stress-ng on vault/: exit {r.returncode}; failed: {fails}; still setting up at "
          f"the deadline: {sorted(cut)} (failed afterwards: {sorted(failed(out) & cut)})")
    print("\n".join(line for line in out.splitlines() if "metrc" in line or "fail" in line))
    assert mount.alive(), "the daemon died under stress"
    assert not fails, out[-5000:]
    assert r.returncode == 0, out[-5000:]
    # the kernel's entry cache (ops.CACHE_S) may show stress-ng's deleted names for a moment
    def same():
        try:
            return walk(mount.path / "vault") == walk(mount.vault)
        except FileNotFoundError:  # a name listed a moment ago is gone
            return False
    mount.wait_for(same, what="the mount to show the vault as it is on disk")
    assert walk(mount.path / "vault") == walk(mount.vault)
    mount.sh("ls vault && cat status", check=True)

