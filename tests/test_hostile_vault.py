"""A hostile agent against the vault: fs9 (root) never follows a symlink on the way to a
vault file, whatever an agent swaps in, and whenever (issue 20, item 1).

Real confined agents on a real mount. Each owns `vault/c` (or `vault/p`) with the
commonest manifest (`owns`, `"vault" = "r"`, the subtree `rw`), so its vault requests
come through fs9, which serves them as root.

  race     a C program (compiled here with gcc) swaps a directory vault/c/d with a
           symlink vault/c/l to a host folder (root 0700, a root 0600 secret inside) by
           renameat2(RENAME_EXCHANGE) in a loop, while its other processes read, append
           to and create files under vault/c/d/ through the mount, for RACE_S seconds.
  swapped  no race: a directory the client holds is swapped for a symlink on disk
           behind fs9's back; every request under it (stat, open, create, mkdir, unlink,
           rename, setxattr) is refused (ELOOP, or ENOENT), as the operator and as an
           agent.
  fifo     a FIFO swapped in under a name the client knows as a regular file: fs9
           refuses the open rather than block in it as root (which hung the mount).

The tests judge what the other side got, never the attacker's exit status: the canary's
secret appears nowhere the agent can read it back (its out and err, the vault), the
canary's files are unchanged (content, mode, owner, mtime) and no name appeared beside
them.
"""
import errno
import inspect
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import cannot_confine_c, compile_c, racer_counts, racer_manifest, wait_task

RACE_S = 8  # seconds of racing (the base commit leaked within about a second)
CANARY = b"CANARY-SECRET-5f3e9a\n"
MARK = "CANARY"  # any part of the secret that reaches the agent: the kernel may cut a
# read short at the size it knows of the file fs9 opened in its place
CANARY_LOG = b"canary log: nobody appends here\n"


_SKIP = cannot_confine_c("the racing program is C")
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))


def make_canary(root: Path) -> Path:
    """root/canary: root 0700, with secret and log (root 0600), outside everything."""
    canary = root / "canary"
    canary.mkdir(mode=0o700)
    os.chmod(canary, 0o700)
    for name, data in (("secret", CANARY), ("log", CANARY_LOG)):
        (canary / name).write_bytes(data)
        os.chmod(canary / name, 0o600)
    return canary


def canary_state(canary: Path) -> dict:
    """Everything that must not change: names, contents, modes, owners, mtimes."""
    st = canary.stat()
    out = {".": (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns, sorted(os.listdir(canary)))}
    for name in os.listdir(canary):
        s = os.lstat(canary / name)
        out[name] = (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_uid, s.st_mtime_ns,
                     (canary / name).read_bytes() if stat.S_ISREG(s.st_mode) else None)
    return out


def leaked_into(folder: Path) -> list[str]:
    """Files under folder (on disk) holding (a part of) the canary's secret."""
    found = []
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                if not os.path.islink(p) and MARK.encode() in Path(p).read_bytes():
                    found.append(p)
            except OSError:
                pass
    return found


# --- the race ------------------------------------------------------------------------------

RACER_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE 2
#endif
#define BENIGN "benign\n"

static char C[4096], D[4200], L[4200], SECRET[4300], LOG[4300], LOOT[4300];
static double deadline;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void put(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
        if (write(fd, text, strlen(text)) < 0) perror(path);
        close(fd);
    }
}

/* what came back that is not ours: to stdout and into the vault (vault/c/loot) */
static void loot(const char *what, const char *buf, ssize_t n) {
    char line[700];
    int k = snprintf(line, sizeof line, "LEAK %s: %.*s\n", what, (int)(n > 400 ? 400 : n), buf);
    if (write(1, line, k) < 0) return;
    int fd = open(LOOT, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
        if (write(fd, line, k) < 0) perror(LOOT);
        close(fd);
    }
}

static void report(const char *kind, long ok, long fail) {
    char line[200];
    int k = snprintf(line, sizeof line, "STAT %s ok=%ld fail=%ld\n", kind, ok, fail);
    if (write(1, line, k) < 0) _exit(1);
}

static void swapper(void) {
    long ok = 0, fail = 0;
    while (now() < deadline) {
        if (syscall(SYS_renameat2, AT_FDCWD, D, AT_FDCWD, L, RENAME_EXCHANGE) == 0) ok++;
        else fail++;
    }
    report("swap", ok, fail);
}

static void reader(void) {
    long ok = 0, fail = 0;
    char buf[512];
    while (now() < deadline) {
        int fd = open(SECRET, O_RDONLY);
        if (fd < 0) { fail++; continue; }
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n < 0) { fail++; continue; }
        ok++;
        if (n != (ssize_t)strlen(BENIGN) || memcmp(buf, BENIGN, n) != 0) loot("read", buf, n);
    }
    report("read", ok, fail);
}

static void appender(void) {
    long ok = 0, fail = 0;
    while (now() < deadline) {
        int fd = open(LOG, O_WRONLY | O_APPEND);
        if (fd < 0) { fail++; continue; }
        if (write(fd, "racer was here\n", 15) == 15) ok++; else fail++;
        close(fd);
    }
    report("append", ok, fail);
}

static void creator(void) {
    long ok = 0, fail = 0, i = 0;
    char path[4400];
    while (now() < deadline) {
        snprintf(path, sizeof path, "%s/new-%d-%ld", D, getpid(), i++);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) { fail++; continue; }
        if (write(fd, "racer made this\n", 16) == 16) ok++; else fail++;
        close(fd);
        unlink(path);
    }
    report("create", ok, fail);
}

int main(void) {
    const char *mnt = getenv("FS9_MNT"), *canary = getenv("CANARY");
    double seconds = atof(getenv("RACE_S"));
    snprintf(C, sizeof C, "%s/vault/c", mnt);
    snprintf(D, sizeof D, "%s/d", C);
    snprintf(L, sizeof L, "%s/l", C);
    snprintf(SECRET, sizeof SECRET, "%s/secret", D);
    snprintf(LOG, sizeof LOG, "%s/log", D);
    snprintf(LOOT, sizeof LOOT, "%s/loot", C);
    /* through the mount: a directory of its own, and a symlink of its own to the canary */
    if (mkdir(D, 0755) != 0) perror(D);
    put(SECRET, BENIGN);
    put(LOG, "");
    if (symlink(canary, L) != 0) perror(L);
    deadline = now() + seconds;
    void (*roles[])(void) = {swapper, swapper, reader, reader, appender, creator};
    int n = sizeof roles / sizeof roles[0];
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0) { roles[i](); _exit(0); }
        if (pid < 0) perror("fork");
    }
    while (wait(NULL) > 0) ;
    printf("DONE\n");
    return 0;
}
"""

@pytest.fixture(scope="module")
def racer_binary(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("racer-bin")
    return compile_c(folder, "racer", RACER_C)


@pytest.mark.timeout(180)
def test_swapping_a_directory_for_a_symlink_reaches_nothing_outside(mount, racer_binary):
    canary = make_canary(mount.root)
    before = canary_state(canary)
    (mount.vault / "c").mkdir()
    mount.define("racer", racer_manifest(CANARY=canary, RACE_S=RACE_S))
    shutil.copy(racer_binary, mount.agents / "racer" / "racer")
    mount.write("ctl", "spawn racer\n")
    mount.write("agents/racer/in", "go\n")
    out, err = wait_task(mount, "racer", timeout=RACE_S + 90)
    got = racer_counts(out)
    leaks = [line for line in out.splitlines() if line.startswith("LEAK")]
    print(f"racer: {got}; LEAK lines: {len(leaks)} {leaks[:3]}; canary now: "
          f"{sorted(os.listdir(canary))}")
    # the attack ran: the swaps went through, and so did many requests under vault/c/d
    assert "DONE" in out, out + err
    assert got.get("swap", (0, 0))[0] > 100, got
    assert got.get("read", (0, 0))[0] + got.get("create", (0, 0))[0] > 100, got
    # what the other side received: only its own file's bytes, nothing of the canary
    assert not leaks and MARK not in out + err, out[:3000]
    assert not leaked_into(mount.vault)
    assert canary_state(canary) == before, "the canary folder changed"
    assert mount.alive()


# --- a directory swapped for a symlink behind fs9's back -----------------------------------

def errno_name(fn, *args, **kw) -> str:
    """The errno name fn(*args, **kw) fails with; "ok" if it succeeds."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def steps(held: int, v: str) -> dict:
    """Every kind of request under the held directory (a symlink on disk by now):
    operation -> errno name ("ok": it went through). Runs in the test as the operator,
    and (its source) in the agent's program."""
    def read(name):
        fd = os.open(name, os.O_RDONLY, dir_fd=held)
        try:
            return os.read(fd, 200)
        finally:
            os.close(fd)
    return {
        "stat": errno_name(os.stat, "secret", dir_fd=held, follow_symlinks=False),
        "open": errno_name(read, "secret"),
        "create": errno_name(lambda: os.close(os.open(
            "made", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=held))),
        "mkdir": errno_name(os.mkdir, "madedir", dir_fd=held),
        "unlink": errno_name(os.unlink, "secret", dir_fd=held),
        "rename_out": errno_name(os.rename, "secret", os.path.join(v, "stolen"), src_dir_fd=held),
        "rename_in": errno_name(os.rename, os.path.join(v, "mine"), "planted", dst_dir_fd=held),
        "setxattr": errno_name(os.setxattr, f"/proc/self/fd/{held}/secret", "user.t", b"1"),
    }


# the agent's program: hold vault/p/q, say so, wait until the test swapped it, try all
SWAPPED_PY = """\
import errno, json, os, time
v = os.path.join(os.environ["FS9_MNT"], "vault", "p")
held = os.open(os.path.join(v, "q"), os.O_RDONLY | os.O_DIRECTORY)
with open(os.path.join(v, "ready"), "w") as f:
    f.write("ready\\n")
deadline = time.monotonic() + 30
while not os.path.exists(os.path.join(v, "go")) and time.monotonic() < deadline:
    time.sleep(0.05)
"""

SWAPPER = """\
cmd = ["/usr/bin/python3", "swapped.py"]
pledge = ["read", "write"]
timeout_s = 60
owns = ["vault/p"]
[unveil]
"vault" = "r"
"vault/p" = "rw"
"""


def seed(vault: Path) -> None:
    (vault / "p/q").mkdir(parents=True)
    (vault / "p/q/kept").write_text("the real q\n")
    (vault / "p/mine").write_text("mine\n")


def swap_behind_fs9s_back(vault: Path, canary: Path) -> None:
    """vault/p/q (a directory the client holds) becomes a symlink to the canary, on disk."""
    os.rename(vault / "p/q", vault / "p/q.moved")
    os.symlink(canary, vault / "p/q")


def refused_everywhere(results: dict, canary: Path, before: dict, vault: Path) -> None:
    assert set(results) == {"stat", "open", "create", "mkdir", "unlink", "rename_out",
                            "rename_in", "setxattr"}, results
    wrong = {op: e for op, e in results.items() if e not in ("ELOOP", "ENOENT")}
    assert not wrong, f"not refused with ELOOP/ENOENT: {wrong} (all: {results})"
    assert canary_state(canary) == before, "the canary folder changed"
    assert os.listdir(vault / "p/q.moved") == ["kept"]
    assert (vault / "p/mine").read_text() == "mine\n"


def test_a_parent_swapped_for_a_symlink_is_refused_to_the_operator(mount):
    canary = make_canary(mount.root)
    seed(mount.vault)
    before = canary_state(canary)
    held = os.open(mount.path / "vault/p/q", os.O_RDONLY | os.O_DIRECTORY)
    try:
        swap_behind_fs9s_back(mount.vault, canary)
        results = steps(held, str(mount.path / "vault/p"))
    finally:
        os.close(held)
    print(results)
    refused_everywhere(results, canary, before, mount.vault)


def test_a_parent_swapped_for_a_symlink_is_refused_to_an_agent(mount):
    canary = make_canary(mount.root)
    seed(mount.vault)
    before = canary_state(canary)
    program = (SWAPPED_PY + "\n\n" + inspect.getsource(errno_name) + "\n\n"
               + inspect.getsource(steps) + "\n\nprint(json.dumps(steps(held, v)))\n")
    mount.define("swapper", SWAPPER, {"swapped.py": program})
    mount.write("ctl", "spawn swapper\n")
    mount.write("agents/swapper/in", "go\n")
    mount.wait_for(lambda: (mount.vault / "p/ready").exists(), timeout=30,
                   what="the agent holding vault/p/q")
    swap_behind_fs9s_back(mount.vault, canary)
    (mount.vault / "p/go").write_text("go\n")
    out, err = wait_task(mount, "swapper", timeout=60)
    assert out.strip(), err
    results = json.loads(out.strip().splitlines()[-1])
    print(results)
    refused_everywhere(results, canary, before, mount.vault)
    assert MARK not in out + err


def test_a_fifo_swapped_in_under_a_file_hangs_nothing(mount):
    """A FIFO renamed over a file the client knows as a regular one (an agent can, in
    its own subtree): the client's open reaches fs9, which must not open a FIFO as root
    (the open would block, and with it every request of the mount). Refused at once."""
    f = mount.path / "vault/x"
    f.write_text("a file\n")
    os.stat(f)  # the kernel knows x as a regular file for a second
    os.mkfifo(mount.vault / "fifo")
    os.rename(mount.vault / "fifo", mount.vault / "x")
    # (a process waiting for fs9's answer cannot be killed: run them beside the test)
    reader = subprocess.Popen(["cat", str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    status = None
    try:
        try:
            reader.wait(5)
            status = subprocess.Popen(["cat", str(mount.path / "status")],
                                      stdout=subprocess.DEVNULL)
            status.wait(5)
        except subprocess.TimeoutExpired:
            pass
    finally:  # a reader fs9 may have left blocked in the FIFO: let it go
        try:
            os.close(os.open(mount.vault / "x", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        for p in (reader, status):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    assert status is not None and status.returncode == 0, "the mount hung"
    err = reader.stderr.read()
    assert reader.returncode == 1 and b"No such file" in err, (reader.returncode, err)


def test_an_agent_cannot_fill_the_vaults_disk(tmp_path):
    """The vault's disk (here a 64 MiB tmpfs) keeps a twentieth (at most 1 GiB) for the
    operator: an agent writing through fs9 without end gets ENOSPC there, and the
    operator still writes."""
    from conftest import Mount, fuse_unavailable
    from fs9.face.vaultfile import RESERVE_SHARE
    if fuse_unavailable():
        pytest.skip(fuse_unavailable())
    m = Mount(tmp_path)
    m.vault.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=755", "tmpfs",
                        str(m.vault)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        m.mount()
        try:
            (m.vault / "f").mkdir()
            m.define("filler", 'cmd = ["cat"]\nunconfined = true\nowns = ["vault/f"]\n'
                               '[unveil]\n"vault/f" = "rw"\n')
            m.write("ctl", "spawn filler\n")
            chunk = b"x" * (1 << 20)
            got = None
            with open(m.path / "agents/filler/view/vault/f/big", "wb", buffering=0) as f:
                for _ in range(80):  # more than the disk holds
                    try:
                        f.write(chunk)
                    except OSError as e:
                        got = e.errno
                        break
            assert got == errno.ENOSPC
            fs = os.statvfs(m.vault)
            reserve = fs.f_blocks * fs.f_frsize // RESERVE_SHARE
            assert fs.f_bavail * fs.f_frsize >= reserve
            m.write("vault/operators", b"y" * (2 << 20))  # the operator's room
            assert (m.vault / "operators").stat().st_size == 2 << 20
        finally:
            m.umount()
        assert not m.bugs()
    finally:
        subprocess.run(["umount", str(m.vault)], capture_output=True)
