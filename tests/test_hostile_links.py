"""A hostile agent and second names: a hard link grants nothing its first name did not,
and fs9 gives a caller only what it just made for it (issue 20, items 5 and 7).

Real confined agents on a real mount. Each owns `vault/c` and unveils `"vault" = "r"`,
so its vault requests come through fs9, which serves them as root. The canary is
`vault/shared/canary`, the operator's (root's), read-only to agents.

  settle race  a C program makes names under vault/c/d through the mount (create,
               mkdir, mkfifo, symlink, in turn) while its other thread exchanges d with
               vault/c/e, where the operator planted x, a second name of the canary: fs9
               (root) must not give the canary to the agent when it gives it the name
               it just made.
  links        a link of a file it may only read (the canary; another agent's file) to
               a name it may write is refused; of its own files, made; no rename or
               exchange moves a name across an owner's border. (In its sandbox Landlock
               refuses links and renames across directories of the mount anyway, EXDEV:
               fs9's own answer is asked beside the canary, and through the agent's view.)
  planted      a second name of the canary planted in its subtree by the operator: the
               agent reads it, removes its name, but never writes the file through it.
  ancestor     `"vault" = "r"` with `owns = ["vault/c"]`, nothing else: the owner writes
               vault/c, not the rest. (The other tests also unveil `"vault/c" = "rw"`, as
               was needed before, so that each one judges its own fix.)

Each test judges what the other side got: the canary's bytes, mode, owner and mtime, the
files on disk, the refusals logged; never the attacker's exit status alone.
"""
import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import (cannot_confine_c, compile_c, errno_of, racer_counts, racer_manifest,
                      wait_task)

RACE_S = 8  # seconds of racing
CANARY = b"CANARY: the operator's, read-only to every agent\n"

_SKIP = cannot_confine_c("the racing program is C")
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))


def plant_canary(vault: Path) -> Path:
    """vault/shared/canary: root's (or the operator's), 0644, and vault/c."""
    (vault / "shared").mkdir()
    canary = vault / "shared/canary"
    canary.write_bytes(CANARY)
    os.chmod(canary, 0o644)
    (vault / "c").mkdir()
    return canary


def state(path: Path) -> tuple:
    """What must not change of a file: kind and mode, owner, mtime, bytes."""
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, path.read_bytes()


# --- the settle race -------------------------------------------------------------------

RACER_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE 2
#endif

static char D[4096], E[4096], X[4200];
static double deadline;
/* the maker removes what it made only while d is d: never the planted name */
static pthread_mutex_t names = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *swapper(void *arg) {
    long ok = 0, fail = 0;
    while (now() < deadline) {
        pthread_mutex_lock(&names);
        for (int i = 0; i < 2; i++)  /* d and e swapped, then back */
            if (syscall(SYS_renameat2, AT_FDCWD, D, AT_FDCWD, E, RENAME_EXCHANGE) == 0) ok++;
            else fail++;
        pthread_mutex_unlock(&names);
        usleep(100);  /* let the maker take the lock */
    }
    printf("STAT swap ok=%ld fail=%ld\n", ok, fail);
    return arg;
}

int main(void) {
    const char *mnt = getenv("FS9_MNT");
    snprintf(D, sizeof D, "%s/vault/c/d", mnt);
    snprintf(E, sizeof E, "%s/vault/c/e", mnt);
    snprintf(X, sizeof X, "%s/x", D);
    if (mkdir(D, 0755) != 0) perror(D);
    deadline = now() + atof(getenv("RACE_S"));
    pthread_t t;
    pthread_create(&t, NULL, swapper, NULL);
    long ok[4] = {0}, fail[4] = {0};
    for (long i = 0; now() < deadline; i++) {
        int kind = i % 4, made;
        if (kind == 0) {
            int fd = open(X, O_WRONLY | O_CREAT | O_EXCL, 0644);
            made = fd >= 0;
            if (made) close(fd);
        } else if (kind == 1) made = mkdir(X, 0755) == 0;
        else if (kind == 2) made = mkfifo(X, 0644) == 0;
        else made = symlink("nowhere", X) == 0;
        if (made) ok[kind]++; else fail[kind]++;
        pthread_mutex_lock(&names);
        if (rmdir(X) != 0) unlink(X);  /* d is d again: what is there is ours */
        pthread_mutex_unlock(&names);
    }
    pthread_join(t, NULL);
    const char *kinds[] = {"create", "mkdir", "mkfifo", "symlink"};
    for (int k = 0; k < 4; k++) printf("STAT %s ok=%ld fail=%ld\n", kinds[k], ok[k], fail[k]);
    printf("DONE\n");
    return 0;
}
"""

@pytest.fixture(scope="module")
def racer_binary(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("links-racer-bin")
    return compile_c(folder, "racer", RACER_C, "-pthread")


@pytest.mark.timeout(180)
def test_a_name_swapped_before_fs9_settles_it_gives_nothing_away(mount, racer_binary):
    """fs9 makes a name as root, then gives it to its maker. The agent swaps the
    directory for one where the operator planted a second name of the canary, hoping
    that fs9 gives it the canary (owner, mode) instead of what it made."""
    canary = plant_canary(mount.vault)
    (mount.vault / "c/e").mkdir()
    os.link(canary, mount.vault / "c/e/x")  # the operator's second name, in its subtree
    before = state(canary)
    mount.define("racer", racer_manifest(RACE_S=RACE_S))
    shutil.copy(racer_binary, mount.agents / "racer" / "racer")
    mount.write("ctl", "spawn racer\n")
    mount.write("agents/racer/in", "go\n")
    out, err = wait_task(mount, "racer", timeout=RACE_S + 90)
    got = racer_counts(out)
    print(f"racer: {got}; canary now {state(canary)[:3]}, before {before[:3]}")
    assert "DONE" in out, out + err
    assert got["swap"][0] > 100, got  # the attack ran: swaps, and names made meanwhile
    assert sum(got[k][0] for k in ("create", "mkdir", "mkfifo", "symlink")) > 40, got
    assert state(canary) == before, "fs9 gave the canary away"
    assert os.stat(canary).st_nlink == 2  # the planted name is still there
    assert mount.alive()


# --- links and renames through the mount -----------------------------------------------

# the agent's program: each step's errno name ("ok": done), as JSON
PROBE_PY = r"""
import ctypes, errno, json, os, sys
V = os.path.join(os.environ["FS9_MNT"], "vault")
libc = ctypes.CDLL(None, use_errno=True)


def p(rel):
    return os.path.join(V, rel)


def attempt(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def put(rel, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC):
    fd = os.open(p(rel), flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def opened(rel, flags):
    os.close(os.open(p(rel), flags))


def exchange(a, b):
    if libc.renameat2(-100, p(a).encode(), -100, p(b).encode(), 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


def read(rel):
    with open(p(rel), "rb") as f:
        return f.read()
"""

OWNER = """\
cmd = ["/usr/bin/python3", "probe.py"]
pledge = ["read", "write"]
timeout_s = 60
owns = ["vault/c"]
[unveil]
"vault" = "r"
"vault/c" = "rw"
"""


def run_python(mount, name: str, program: str, toml: str = "") -> dict:
    """Spawn agent name (OWNER, or toml) running program (NAME.py) once: the JSON it
    printed last."""
    toml = toml or OWNER.replace("probe.py", f"{name}.py")
    mount.define(name, toml, {f"{name}.py": program})
    mount.sh(f"echo 'spawn {name}' > ctl", check=True)
    mount.write(f"agents/{name}/in", "go\n")
    out, err = wait_task(mount, name, timeout=60)
    assert out.strip(), err
    return json.loads(out.strip().splitlines()[-1])


LINKS_PY = PROBE_PY + r"""
put("c/a", b"mine\n")
r = {
    "ln-beside": attempt(os.link, p("shared/canary"), p("shared/mine")),
    "ln-own": attempt(os.link, p("c/a"), p("c/a2")),
    "write-own-second-name": attempt(put, "c/a2", b"mine, through a2\n", os.O_WRONLY | os.O_APPEND),
    # across directories: Landlock's refer rule answers before fs9 (EXDEV), or fs9 does
    "ln-canary": attempt(os.link, p("shared/canary"), p("c/x")),
    "ln-others": attempt(os.link, p("b/secret"), p("c/y")),
    "mv-in": attempt(os.rename, p("shared/canary"), p("c/z")),
    "mv-out": attempt(os.rename, p("c/a"), p("shared/a")),
    "exchange": attempt(exchange, "c/a", "shared/canary"),
}
print(json.dumps(r))
"""

LINKER = """\
cmd = ["/usr/bin/python3", "linker.py"]
pledge = ["read", "write"]
timeout_s = 60
owns = ["vault/c", "vault/shared/mine"]
[unveil]
"vault" = "r"
"vault/c" = "rw"
"vault/shared/mine" = "rw"
"""


def exchanged(a: Path, b: Path) -> None:
    """renameat2(a, b, RENAME_EXCHANGE)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, bytes(a), -100, bytes(b), 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


def test_an_agent_links_only_what_it_may_write(mount):
    """A second name for the canary (read-only to the agent) or for another agent's file,
    where the agent may write, would let it write that file, or read it under its own
    owner and label: refused (EPERM), logged; a link of its own file is made and works.
    No rename or exchange moves a name across an owner's border either. As the agent
    (confined: beside the canary, in a name it owns; across directories Landlock
    refuses first) and through its view (fs9's own answer, across directories)."""
    canary = plant_canary(mount.vault)
    (mount.vault / "b").mkdir()
    (mount.vault / "b/secret").write_bytes(b"the keeper's\n")
    mount.define("keeper", 'cmd = ["cat"]\nowns = ["vault/b"]\n')
    mount.sh("echo 'spawn keeper' > ctl", check=True)
    before, others = state(canary), state(mount.vault / "b/secret")
    got = run_python(mount, "linker", LINKS_PY, LINKER)
    print(got)
    crossing = {k: got.pop(k) for k in ("ln-canary", "ln-others", "mv-in", "mv-out",
                                        "exchange")}
    assert got == {"ln-beside": "EPERM", "ln-own": "ok", "write-own-second-name": "ok"}, got
    assert all(e in ("EXDEV", "EPERM", "EACCES") for e in crossing.values()), crossing
    view = mount.path / "agents/linker/view/vault"
    seen = {what: errno_of(fn, *args) for what, fn, args in (
        ("ln-canary", os.link, (view / "shared/canary", view / "c/x")),
        ("ln-others", os.link, (view / "b/secret", view / "c/y")),
        ("ln-out", os.link, (view / "c/a", view / "shared/a")),
        ("mv-in", os.rename, (view / "shared/canary", view / "c/z")),
        ("mv-out", os.rename, (view / "c/a", view / "shared/a")),
        ("exchange", exchanged, (view / "c/a", view / "shared/canary")),
        ("exchange-others", exchanged, (view / "c/a", view / "b/secret")))}
    E = errno
    assert seen == {"ln-canary": E.EPERM, "ln-others": E.EPERM, "ln-out": E.EACCES,
                    "mv-in": E.EACCES, "mv-out": E.EACCES, "exchange": E.EACCES,
                    "exchange-others": E.EACCES}, seen
    # what the other side has: no new name, nothing changed, the refusal said why
    assert state(canary) == before and os.stat(canary).st_nlink == 1
    assert state(mount.vault / "b/secret") == others
    assert sorted(os.listdir(mount.vault / "c")) == ["a", "a2"]
    assert sorted(os.listdir(mount.vault / "shared")) == ["canary"]
    assert os.lstat(mount.vault / "c/a").st_ino == os.lstat(mount.vault / "c/a2").st_ino
    assert (mount.vault / "c/a").read_bytes() == b"mine\nmine, through a2\n"
    err = mount.read("agents/linker/err")
    assert "no second name for vault/shared/canary, which agent linker may not write" in err
    assert "no second name for vault/b/secret" in err, err


PLANTED_PY = PROBE_PY + r"""
r = {"read": read("c/planted").decode()}
for what, fn, args in (
        ("write", opened, ("c/planted", os.O_WRONLY)),
        ("append", put, ("c/planted", b"agent was here\n", os.O_WRONLY | os.O_APPEND)),
        ("rdwr", opened, ("c/planted", os.O_RDWR)),
        ("trunc", opened, ("c/planted", os.O_RDONLY | os.O_TRUNC)),
        ("truncate", os.truncate, (p("c/planted"), 0)),
        ("chmod", os.chmod, (p("c/planted"), 0o666)),
        ("utime", os.utime, (p("c/planted"), (0, 0))),
        ("setxattr", os.setxattr, (p("c/planted"), "user.agent", b"1")),
        ("mv-own", os.rename, (p("c/planted"), p("c/moved"))),
        ("write-moved", put, ("c/moved", b"agent was here\n")),
        ("write-operators-one-name", put, ("c/single", b"the agent's now\n")),
        ("rm", os.unlink, (p("c/moved"),))):
    r[what] = attempt(fn, *args)
print(json.dumps(r))
"""


def test_a_second_name_planted_by_the_operator_is_read_only_to_the_agent(mount):
    """The operator linked the canary into the agent's subtree (on the host): the agent
    reads it and may remove its name, but never changes the file through it, however
    it asks (open to write, O_TRUNC, truncate, chmod, utime, xattrs, after a rename)."""
    canary = plant_canary(mount.vault)
    os.link(canary, mount.vault / "c/planted")
    (mount.vault / "c/single").write_bytes(b"the operator's, one name\n")
    before = state(canary)
    got = run_python(mount, "holder", PLANTED_PY)
    print(got)
    assert got.pop("read") == CANARY.decode()
    assert got == {"write": "EACCES", "append": "EACCES", "rdwr": "EACCES", "trunc": "EACCES",
                   "truncate": "EACCES", "chmod": "EPERM", "utime": "EACCES",
                   "setxattr": "EACCES", "mv-own": "ok", "write-moved": "EACCES",
                   "write-operators-one-name": "ok", "rm": "ok"}, got
    assert state(canary) == before and os.listxattr(canary) == []
    assert os.stat(canary).st_nlink == 1  # its name in vault/c is gone, the file is not
    assert (mount.vault / "c/single").read_bytes() == b"the agent's now\n"  # one name: its
    assert "has 2 names and is not this agent's own" in mount.read("agents/holder/err")


# --- an owned subtree under a read-only unveil ------------------------------------------

ANCESTOR_SH = """\
cd $FS9_MNT/vault
echo hi > c/f && echo written
mkdir c/sub && echo hi > c/sub/g && echo made
echo x >> other 2>/dev/null || echo refused-other
echo x > new 2>/dev/null || echo refused-new
id -u
"""


def test_an_owner_writes_its_subtree_under_a_read_only_ancestor(mount):
    """`"vault" = "r"` and `owns = ["vault/c"]`, nothing else: the longest prefix wins,
    so vault/c is the owner's to write, the rest of the vault read-only."""
    (mount.vault / "c").mkdir()
    (mount.vault / "other").write_text("the operator's\n")
    mount.define("owner", 'cmd = ["sh", "probe.sh"]\nowns = ["vault/c"]\n'
                 '[unveil]\n"vault" = "r"\n', {"probe.sh": ANCESTOR_SH})
    mount.sh("echo 'spawn owner' > ctl", check=True)
    mount.write("agents/owner/in", "go\n")
    out, err = wait_task(mount, "owner", timeout=60)
    *said, uid = out.split()
    assert said == ["written", "made", "refused-other", "refused-new"], out + err
    assert (mount.vault / "c/f").read_text() == "hi\n"
    assert (mount.vault / "c/sub/g").read_text() == "hi\n"
    assert (mount.vault / "c/f").stat().st_uid == int(uid) != 0  # given to the agent
    assert (mount.vault / "other").read_text() == "the operator's\n"
    assert not (mount.vault / "new").exists()
