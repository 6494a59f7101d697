"""Escapes: real programs, run as confined agents, try to get out of their view.

Each attempt is one task of its own agent (`spawn x_RUNNER_NAME def=attacker`, or
def=vaulter for the vault attempts), so every audit event of the attempt names
that agent. An attempt prints `STEP` lines and one verdict: `DENIED NAME ...`
(every step failed) or `ESCAPED NAME step: what it got`. The test asserts, for
each attempt:
  (a) it failed: a DENIED line, no ESCAPED line, and the targets unharmed (the
      victim's daemon alive, untraced, not stopped; the fs9 server alive; no
      agent spawned; the canary file unchanged);
  (b) it left at least one audit event in `log/audit` after the audit length
      recorded before it: `unveil_denied`, `refused`, `escape_attempt` or
      `escape_denied`, carrying "agent": that agent's name (and no such event
      of the attempt names another agent).
Attempts in NOT_YET_AUDITED are still held to (a); where (b) does not hold for
them the test xfails with the reason, where it does they pass.

Runners: `sh` (attacks.sh below, /bin/sh and coreutils), `py` (attacks.py below,
/usr/bin/python3: the venv's python is not reachable for agent uids) and `c`
(tests/escapes/escape.c, compiled with gcc once per module, raw syscalls).

The world: one fs9 mount per module; ROOT holds mnt/ (the mount), state/,
vault/ (with secret.txt), agents/ (definitions) and canary/secret (root 0600,
outside everything). ROOT is 0755: only the sandbox, not file modes, keeps
agents from listing it. The victim is a second confined agent, a daemon
`sleep 1000`, target of the sibling attacks. The attacker pledges read and
publish (not send, spawn, write, discover) and unveils topics/ro (r),
topics/pub (rw) and agents/victim/ctl (rw); topics/secret exists, hidden.
The vaulter pledges read and write and unveils vault (rw).

Catalogue (runner name: what it tries):
  sh mnt_ctl            absolute paths to hidden files: $FS9_MNT/ctl, log/audit, events
  sh spawn_ctl          write `spawn` to the kernel's ctl (hidden)
  sh other_agent        $FS9_MNT/agents/victim/{status,mail,out} (hidden)
  sh other_outbox       forge mail through agents/victim/outbox/ (hidden)
  sh mail_no_send       own outbox/victim and mail/new without the send pledge
  sh ro_topic           write and append to a read-only unveiled topic
  sh hardlink_hidden    ln of topics/secret, of ctl, of the state db
  sh rename_hidden      mv a topic into agents/victim/mail/ (hidden), a file into the state dir
  sh state_dir          ls/cat the state directory (path from the manifest's env)
  sh vault_dir          ls/cat the vault's backing directory
  sh symlink_state      symlink in scratch to the state directory, then through it
  sh symlink_vault      symlink in scratch to the vault's backing directory, then through it
  sh dotdot             `..` from the mount point: ls, cd, the definitions beside it
  sh kill_daemon        kill -9 / -STOP the fs9 server
  sh write_outside      write /tmp, /dev/shm, /var/tmp outside the scratch folder
  py proc_daemon_root   /proc/DAEMON/root/MNT/ctl, /proc/DAEMON/root/STATE
  py proc_daemon_cwd    /proc/DAEMON/cwd: list it, chdir into it
  py proc_daemon_secrets /proc/DAEMON/environ, /proc/DAEMON/fd/
  py proc_victim        /proc/VICTIM/{fd,environ,root/}: a sibling agent's process
  py victim_ctl         write `kill` to agents/victim/ctl (unveiled rw) without the spawn pledge
  py other_program      read another agent's program folder (agents/victim/)
  py registry           list registry/ without the discover pledge
  py vault_hidden       read vault/secret.txt through the mount, vault not unveiled
  py rewrite_program    append to its own program (dispatch.sh), read-only to it
  c opath_parent        O_PATH fd of ROOT, then openat(fd, "mnt/ctl"), ".", "state/...", fchdir
  c opath_dotdot        O_PATH fd of the mount point, then openat(fd, ".."), "../state/..."
  c name_to_handle      name_to_handle_at of the state dir and another agent's definition
  c open_by_handle      open_by_handle_at with a forged handle (inode 2: "shocker")
  c mount               mount: bind the state dir, proc, the mount again; fsopen; open_tree
  c umount              umount2 of the mount point (the full tree would be below)
  c unshare             unshare(CLONE_NEWUSER|CLONE_NEWNS), then umount; unshare(CLONE_NEWUSER)
  c clone_newuser       raw clone(CLONE_NEWUSER|CLONE_NEWNS), clone(CLONE_NEWPID)
  c setns               setns into /proc/1/ns/mnt, the server's, its own
  c ptrace_victim       ptrace(PTRACE_ATTACH / PTRACE_SEIZE) of the victim's daemon
  c ptrace_daemon       ptrace(PTRACE_ATTACH / PTRACE_SEIZE) of the fs9 server
  c pivot_root          pivot_root into the scratch folder
  c chroot              chroot into scratch, then walk up (the classic breakout)
  c vm_readv_daemon     process_vm_readv of the fs9 server
  c vm_writev_victim    process_vm_writev into the victim's daemon
  c kill_victim         kill(SIGKILL), tgkill(SIGSTOP), kill(-pgrp) of the victim's daemon
  c proc_mem_daemon     open /proc/DAEMON/mem read-write and write it; read-only
  c proc_cwd_daemon     fchdir through an fd of /proc/DAEMON/cwd (plain and O_PATH)
  c zygote_fds          its sandbox's zygote (its parent, root): /proc/PPID/fd, fd/3, environ
  c doublefork_state    fork, setsid, fork: an orphan in its own session reads the state dir
  c bpf                 bpf(BPF_MAP_CREATE), perf_event_open
  c io_uring            IORING_OP_OPENAT of the state db, another agent's definition, ROOT
  c proc_self_root_state /proc/self/root/STATE and its db
  py vault_chown_setuid  (vaulter) chown a vault file to root, chmod 4755: a setuid-root file
  py vault_link_symlink  (vaulter) symlink in the vault to the canary, hard-link the symlink, read
  py vault_rename_stale  (vaulter) hold a vault dir, rename its parent, symlink the old name to ROOT
  c vault_chmod_symlink  (vaulter) fchmodat2(AT_SYMLINK_NOFOLLOW) of a vault symlink to the canary
"""
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import WAIT_S, Mount, cannot_confine_c

HERE = Path(__file__).resolve().parent
ESCAPE_KINDS = {"unveil_denied", "refused", "escape_attempt", "escape_denied"}
CANARY = b"CANARY-SECRET\n"

# (runner, name, definition): the catalogue above, in that order.
ATTEMPTS = [
    *[("sh", n, "attacker") for n in (
        "mnt_ctl", "spawn_ctl", "other_agent", "other_outbox", "mail_no_send", "ro_topic",
        "hardlink_hidden", "rename_hidden", "state_dir", "vault_dir", "symlink_state",
        "symlink_vault", "dotdot", "kill_daemon", "write_outside")],
    *[("py", n, "attacker") for n in (
        "proc_daemon_root", "proc_daemon_cwd", "proc_daemon_secrets", "proc_victim",
        "victim_ctl", "other_program", "registry", "vault_hidden", "rewrite_program")],
    *[("c", n, "attacker") for n in (
        "opath_parent", "opath_dotdot", "name_to_handle", "open_by_handle", "mount", "umount",
        "unshare", "clone_newuser", "setns", "ptrace_victim", "ptrace_daemon", "pivot_root",
        "chroot", "vm_readv_daemon", "vm_writev_victim", "kill_victim", "proc_mem_daemon",
        "proc_cwd_daemon", "zygote_fds", "doublefork_state", "bpf", "io_uring",
        "proc_self_root_state")],
    ("py", "vault_chown_setuid", "vaulter"),
    ("py", "vault_link_symlink", "vaulter"),
    ("py", "vault_rename_stale", "vaulter"),
    ("c", "vault_chmod_symlink", "vaulter"),
]

# Attempts refused without a witness so far: (runner, name) -> why no event comes.
# They must still fail; the event check xfails for them until it holds.
# Attempts on another process's /proc entries: a sandbox's /proc is mounted with
# hidepid=invisible, so the target does not exist for the agent (ENOENT), and there
# is no refusal to witness; hiding is the stronger outcome.
INVISIBLE = {"proc_daemon_root", "proc_daemon_cwd", "proc_daemon_secrets", "proc_victim",
             "proc_mem_daemon", "proc_cwd_daemon", "zygote_fds"}
NOT_YET_AUDITED: dict[tuple[str, str], str] = {
    ("py", "vault_rename_stale"):
        "nothing to witness: the held directory moved with its parent, so opening "
        "`secret` through it is an ordinary lookup of a missing name in the agent's own "
        "folder (ENOENT); the symlink it made is its own file",
}

DISPATCH = """\
read runner name
case $runner in
  sh) exec sh attacks.sh "$name" ;;
  py) exec /usr/bin/python3 attacks.py "$name" ;;
  c) exec ./escape "$name" ;;
esac
echo "ERROR $name: unknown runner $runner"
exit 2
"""

ATTACKS_SH = r"""
name=$1
denials=""
escaped=0
# try STEP 'shell code': the code must fail
try() {
    if out=$( (eval "$2") 2>&1 ); then
        echo "ESCAPED $name $1: $(printf '%s' "$out" | head -c 200 | tr '\n' ' ')"
        escaped=1
    else
        echo "STEP $name $1 -> $(printf '%s' "$out" | head -c 200 | tr '\n' ' ')"
        denials="$denials $1"
    fi
}
case $name in
  mnt_ctl)
    try cat_ctl 'cat "$FS9_MNT/ctl"'
    try cat_audit 'cat "$FS9_MNT/log/audit"'
    try stat_events 'stat "$FS9_MNT/events"' ;;
  spawn_ctl)
    try spawn 'echo "spawn evil cmd=\"sh -c id\"" > "$FS9_MNT/ctl"' ;;
  other_agent)
    try victim_status 'cat "$FS9_MNT/agents/victim/status"'
    try victim_mail 'ls "$FS9_MNT/agents/victim/mail"'
    try victim_out 'cat "$FS9_MNT/agents/victim/out"' ;;
  other_outbox)
    try forge 'printf "hi\n" > "$FS9_MNT/agents/victim/outbox/victim"' ;;
  mail_no_send)
    try outbox 'echo hi > "$FS9_AGENT_DIR/outbox/victim"'
    try mail_new 'echo hi > "$FS9_AGENT_DIR/mail/new"' ;;
  ro_topic)
    try write 'echo x > "$FS9_MNT/topics/ro"'
    try append 'echo x >> "$FS9_MNT/topics/ro"' ;;
  hardlink_hidden)
    try link_secret 'ln "$FS9_MNT/topics/secret" "$FS9_AGENT_DIR/secret"'
    try link_ctl 'ln "$FS9_MNT/ctl" "$HOME/ctl"'
    try link_state_db 'ln "$STATE/log.sqlite" "$HOME/db"' ;;
  rename_hidden)
    echo x > "$HOME/f"
    try mv_topic 'mv -T "$FS9_MNT/topics/pub" "$FS9_MNT/agents/victim/mail/x"'
    try mv_into_state 'mv -T "$HOME/f" "$STATE/f"' ;;
  state_dir)
    try ls 'ls "$STATE"'
    try cat_db 'cat "$STATE/log.sqlite"' ;;
  vault_dir)
    try ls 'ls "$VAULT"'
    try cat 'cat "$VAULT/secret.txt"' ;;
  symlink_state)
    ln -s "$STATE" "$HOME/s"
    try ls 'ls "$HOME/s/"'
    try cat 'cat "$HOME/s/log.sqlite"' ;;
  symlink_vault)
    ln -s "$VAULT" "$HOME/v"
    try ls 'ls "$HOME/v/"'
    try cat 'cat "$HOME/v/secret.txt"' ;;
  dotdot)
    try ls 'ls "$FS9_MNT/.."'
    try cd_ls 'cd "$FS9_MNT/.." && ls'
    try cat_def 'cat "$FS9_MNT/../agents/victim/agent.toml"' ;;
  kill_daemon)
    try kill9 'kill -9 "$DAEMON"'
    try stop 'kill -STOP "$DAEMON"' ;;
  write_outside)
    try tmp 'echo x > /tmp/fs9-escape-$$'
    try shm 'echo x > /dev/shm/fs9-escape-$$'
    try var_tmp 'echo x > /var/tmp/fs9-escape-$$' ;;
  *) echo "ERROR $name: unknown attempt"; exit 2 ;;
esac
[ $escaped = 0 ] && echo "DENIED $name$denials"
exit 0
"""

ATTACKS_PY = r'''
import errno, os, stat, sys
name = sys.argv[1]
E = os.environ
MNT, STATE, ROOT, D, V = E["FS9_MNT"], E["STATE"], E["FS9_ROOT"], E["DAEMON"], E["VICTIM"]
denials, escaped = [], False

def read(path):
    with open(path, "rb") as f:
        return f.read(200)

def write(path, data, mode="w"):
    with open(path, mode) as f:
        f.write(data)

def attempt(step, fn, *args):
    """fn(*args) must raise OSError; anything it returns is what leaked."""
    global escaped
    try:
        got = fn(*args)
    except OSError as e:
        print(f"STEP {name} {step} -> {errno.errorcode.get(e.errno, e.errno)} {e.strerror}")
        denials.append(f"{step}:{errno.errorcode.get(e.errno, e.errno)}")
        return
    print(f"ESCAPED {name} {step}: {str(got)[:200]!r}")
    escaped = True

def leak_if(step, ok, what):
    global escaped
    if ok:
        print(f"ESCAPED {name} {step}: {what}")
        escaped = True

def chdir_ls(path):
    os.chdir(path)
    return os.listdir(".")

if name == "proc_daemon_root":
    attempt("open_root_mnt_ctl", read, f"/proc/{D}/root{MNT}/ctl")
    attempt("list_root_state", os.listdir, f"/proc/{D}/root{STATE}")
elif name == "proc_daemon_cwd":
    attempt("list_cwd", os.listdir, f"/proc/{D}/cwd")
    attempt("chdir_cwd", chdir_ls, f"/proc/{D}/cwd")
elif name == "proc_daemon_secrets":
    attempt("environ", read, f"/proc/{D}/environ")
    attempt("list_fds", os.listdir, f"/proc/{D}/fd")
    attempt("fd0", read, f"/proc/{D}/fd/0")
elif name == "proc_victim":
    attempt("list_fds", os.listdir, f"/proc/{V}/fd")
    attempt("environ", read, f"/proc/{V}/environ")
    attempt("list_root", os.listdir, f"/proc/{V}/root/")
elif name == "victim_ctl":
    attempt("kill_victim", write, f"{MNT}/agents/victim/ctl", "kill\n")
    attempt("stop_victim", write, f"{MNT}/agents/victim/ctl", "stop\n")
elif name == "other_program":
    attempt("read_def", read, f"{E['AGENTS']}/victim/agent.toml")
    attempt("list_defs", os.listdir, E["AGENTS"])
elif name == "registry":
    attempt("list_registry", os.listdir, f"{MNT}/registry")
    attempt("read_victim", read, f"{MNT}/registry/victim")
elif name == "vault_hidden":
    attempt("read_secret", read, f"{MNT}/vault/secret.txt")
    attempt("list_vault", os.listdir, f"{MNT}/vault")
elif name == "rewrite_program":
    attempt("append_dispatch", write, "dispatch.sh", "echo owned\n", "a")
    attempt("create_beside", write, "evil.sh", "echo owned\n")
elif name == "vault_chown_setuid":
    f = f"{MNT}/vault/work/x-{os.getpid()}"
    with open(f, "wb") as out:  # a file of its own in the vault: allowed
        out.write(open("/bin/true", "rb").read())
    attempt("chown_root", os.chown, f, 0, 0)
    attempt("chmod_setuid", os.chmod, f, 0o4755)
    st = os.stat(f)
    leak_if("setuid_root_file", st.st_uid == 0 and st.st_mode & stat.S_ISUID,
            f"{f} is setuid root on disk: mode {oct(st.st_mode)}")
elif name == "vault_link_symlink":
    s, h = f"{MNT}/vault/work/s-{os.getpid()}", f"{MNT}/vault/work/h-{os.getpid()}"
    os.symlink(f"{ROOT}/canary/secret", s)  # a symlink of its own: allowed
    try:
        os.link(s, h, follow_symlinks=False)  # a hard link of the symlink itself: allowed
        print(f"STEP {name} link -> ok, a symlink: {stat.S_ISLNK(os.lstat(h).st_mode)}")
    except OSError as e:
        print(f"STEP {name} link -> {errno.errorcode.get(e.errno)}")
    attempt("read_through_link", read, h)
    attempt("read_through_symlink", read, s)
elif name == "vault_rename_stale":
    v = f"{MNT}/vault/work"
    os.makedirs(f"{v}/d/canary")
    held = os.open(f"{v}/d/canary", os.O_RDONLY | os.O_DIRECTORY)
    os.rename(f"{v}/d", f"{v}/e")
    try:
        os.symlink(ROOT, f"{v}/d")
    except OSError as e:
        print(f"STEP {name} symlink -> {errno.errorcode.get(e.errno)}")
    attempt("open_through_held_fd", lambda: os.read(os.open("secret", os.O_RDONLY, dir_fd=held), 200))
    listing = os.listdir(held)  # the held dir moved with its parent: it is e/canary now
    leak_if("list_held_fd", "secret" in listing or "canary" in listing, repr(listing))
else:
    print(f"ERROR {name}: unknown attempt")
    sys.exit(2)
if not escaped:
    print(f"DENIED {name} {' '.join(denials)}")
'''

ATTACKER = """\
cmd = ["sh", "dispatch.sh"]
pledge = ["read", "publish"]
env = {{ STATE = "{state}", VAULT = "{vault}", AGENTS = "{agents}", FS9_ROOT = "{root}", DAEMON = "{daemon}", VICTIM = "{victim}" }}
[unveil]
"topics/ro" = "r"
"topics/pub" = "rw"
"agents/victim/ctl" = "rw"
"""

VAULTER = """\
cmd = ["sh", "dispatch.sh"]
pledge = ["read", "write"]
env = {{ STATE = "{state}", VAULT = "{vault}", AGENTS = "{agents}", FS9_ROOT = "{root}", DAEMON = "{daemon}", VICTIM = "{victim}" }}
owns = ["vault/work"]
[unveil]
"vault" = "rw"
"""


_SKIP = cannot_confine_c("the raw-syscall attempts (tests/escapes/escape.c) need it")
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))


@pytest.fixture(scope="module")
def escape_binary(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("escape-bin") / "escape"
    r = subprocess.run(["gcc", "-O1", "-Wall", "-o", str(out), str(HERE / "escapes/escape.c")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"escape.c does not compile:\n{r.stderr}"
    return out


class Arena:
    """One mount with the victim running and the attack definitions in place."""

    def __init__(self, mount: Mount, binary: Path) -> None:
        self.m = mount
        self.root = mount.root
        mount.write("topics/ro", "read only\n")
        mount.write("topics/pub", "public\n")
        mount.write("topics/secret", "hidden\n")
        mount.write("vault/secret.txt", "vault secret\n")
        (mount.path / "vault/work").mkdir()  # owned by the vaulter (one at a time)
        canary = self.root / "canary"
        canary.mkdir(mode=0o700)
        (canary / "secret").write_bytes(CANARY)
        (canary / "secret").chmod(0o600)
        mount.define("victim", 'mode = "daemon"\ncmd = ["sleep", "1000"]\nrestart = "temporary"\n'
                               'pledge = ["read"]\n')
        mount.write("ctl", "spawn victim\n")
        self.victim = int(mount.wait_for(
            lambda: mount.status("victim").get("pid", "-").isdigit() and mount.status("victim")["pid"],
            what="the victim's daemon"))
        fields = dict(state=mount.state, vault=mount.vault, agents=mount.agents, root=self.root,
                      daemon=mount.pid, victim=self.victim)
        files = {"dispatch.sh": DISPATCH, "attacks.sh": ATTACKS_SH, "attacks.py": ATTACKS_PY}
        for name, toml in (("attacker", ATTACKER), ("vaulter", VAULTER)):
            mount.define(name, toml.format(**fields), files)
            shutil.copy(binary, mount.agents / name / "escape")
            for f in ("dispatch.sh", "attacks.sh", "attacks.py"):
                (mount.agents / name / f).chmod(0o644)  # its own program: read-only to it
        self.attackers: set[str] = set()

    def audit(self) -> list[dict]:
        return [json.loads(line) for line in self.m.read("log/audit").splitlines()]

    def run(self, runner: str, name: str, definition: str) -> dict:
        m = self.m
        agent = f"x_{runner}_{name}"
        m.write("ctl", f"spawn {agent} def={definition}\n")
        self.attackers.add(agent)
        mark = len(self.audit())  # the audit length before the attempt
        m.write(f"agents/{agent}/in", f"{runner} {name}\n")
        def ended_status():
            s = m.status(agent)
            return s if s["done"] != "0" or s["failed"] != "0" else None
        status = m.wait_for(ended_status, timeout=60, what=f"attempt {runner} {name}")
        task = status["latest"]
        out = m.read(f"agents/{agent}/tasks/{task}/out")
        err = m.read(f"agents/{agent}/tasks/{task}/err")
        ended = len(self.audit())

        def mine():
            return [e for e in self.audit()[mark:]
                    if e["kind"] in ESCAPE_KINDS and e.get("agent") == agent]
        expected = (runner, name) not in NOT_YET_AUDITED
        # an escape fails the test anyway: no need to wait for its witness. One not yet
        # audited may have none: 2 s to see one come (it would come within ms) before
        # calling it an xfail
        wait = 0.0 if "ESCAPED" in out else WAIT_S if expected else 2.0
        deadline = time.monotonic() + wait
        while not mine() and time.monotonic() < deadline:
            time.sleep(0.05)
        events = mine()
        window = [e for e in self.audit()[mark:ended] if e["kind"] in ESCAPE_KINDS]
        m.write("ctl", f"kill {agent}\n")
        return dict(agent=agent, out=out, err=err, exit=status.get("latest_exit"),
                    events=events, window=window)


@pytest.fixture(scope="module")
def arena(tmp_path_factory, escape_binary):
    root = Path(tempfile.mkdtemp(prefix="fs9-escapes-"))
    root.chmod(0o755)
    m = Mount(root)
    m.mount()
    try:
        yield Arena(m, escape_binary)
    finally:
        try:
            m.write("ctl", "kill victim\n")  # its scratch folder goes with it
        except OSError:
            pass
        m.umount()
        bugs = m.bugs()
        shutil.rmtree(root, ignore_errors=True)
    assert not bugs, "a handler hit an unexpected exception:\n" + "\n".join(bugs)


def test_the_targets_exist_for_the_operator(arena):
    """A DENIED must not come from a wrong path: what the attempts reach for is there."""
    m = arena.m
    assert (m.state / "log.sqlite").is_file() and (m.vault / "secret.txt").is_file()
    assert "state=running" in m.read("ctl")
    for rel in ("agents/victim/status", "agents/victim/ctl", "topics/secret", "registry/victim",
                "log/audit", "vault/secret.txt"):
        assert (m.path / rel).exists(), rel
    assert (m.agents / "victim/agent.toml").is_file()
    assert os.path.exists(f"/proc/{arena.victim}") and os.path.exists(f"/proc/{m.pid}")
    assert len(ATTEMPTS) >= 25 and len(set(ATTEMPTS)) == len(ATTEMPTS)


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.mark.parametrize("runner, name, definition", ATTEMPTS,
                         ids=[f"{r}-{n}" for r, n, _ in ATTEMPTS])
def test_escape_attempt_fails_and_is_audited(arena, runner, name, definition):
    m = arena.m
    canary = arena.root / "canary/secret"
    r = arena.run(runner, name, definition)
    report = f"{runner} {name} (agent {r['agent']}):\n{r['out']}{r['err']}"
    # (a) it failed, by its own account and by the state of its targets
    escapes = [line for line in r["out"].splitlines() if line.startswith("ESCAPED")]
    assert not escapes, f"ESCAPED: {report}"
    assert any(line.split()[:2] == ["DENIED", name] for line in r["out"].splitlines()), \
        f"no verdict: {report}"
    assert m.alive(), "the fs9 server died"
    victim = _proc_status(arena.victim)
    assert victim["State"][0] in "SR" and victim["TracerPid"] == "0", victim
    assert m.status("victim")["pid"] == str(arena.victim), "the victim's daemon was replaced"
    assert _proc_status(m.pid)["TracerPid"] == "0"
    assert "evil" not in os.listdir(m.path / "agents")
    assert canary.read_bytes() == CANARY and stat.S_IMODE(canary.stat().st_mode) == 0o600 \
        and canary.stat().st_uid == 0, "the canary outside the view changed"
    # (b) it was witnessed, in the name of the agent that tried
    strangers = [e for e in r["window"] if e.get("agent") not in arena.attackers]
    assert not strangers, f"events of this attempt name another agent: {strangers}"
    verdict = [line.split()[2:] for line in r["out"].splitlines()
               if line.split()[:2] == ["DENIED", name]][0]
    if not r["events"] and name in INVISIBLE and verdict and \
            all(step.endswith(":ENOENT") for step in verdict):
        return  # its sandbox's /proc (hidepid=invisible) does not show the target at all
    if not r["events"]:
        why = NOT_YET_AUDITED.get((runner, name))
        if why:
            pytest.xfail(f"not yet audited: {why}")
        pytest.fail(f"no audit event names {r['agent']}: {report}")
    assert all(e["agent"] == r["agent"] for e in r["events"])
