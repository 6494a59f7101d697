"""Red team 8: holes found by attacking fs9 as a confined agent would, each proved on a
real mount (the view is the identity: requests through `agents/NAME/view/...` are that
agent's, exactly the directory its sandbox binds over the mount; agents that must run
code are confined python programs; a shared vault's other users are throwaway uids, as
in tests/test_shared_vault.py).

  log growth  events an agent made fs9 write without a rate: lookups of hidden names
              (unveil_denied), steps counted per write not per line, progress reports,
              ctl lines (its own ctl too), work handed on through `in`, rereads of
              pending mail (mail_delivered)
  trusted.*   extended attributes Linux shows only to CAP_SYS_ADMIN, read by fs9 (root)
              for agents and a shared vault's users
  authority   an agent's spawn words widened the definition (priority, time limit,
              restarts); an agent with the spawn pledge halted fs9 and resumed it
  memory      conversations with models without a per-agent cap; a page-cache key per
              vault inode kept for ever
  audit       an agent's refused writes to another agent's ctl and in were logged as,
              and said to, that other agent
"""
import errno
import json
import os
import subprocess
import time

import pytest

from conftest import Mount, errno_of, shared_vault, wait_task

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
    # in a later second, the next row logged says how many were not: every lookup is
    # either a row or counted in one
    def accounted():
        assert errno_of(os.stat, hidden) == errno.ENOENT
        rows = audit(mount, "unveil_denied", "spy")
        return len(rows) + sum(e.get("coalesced", 0) for e in rows) >= probes
    mount.wait_for(accounted, what="unveil_denied events counting every lookup")


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
    with shared_vault(tmp_path, 0o755) as m:
        yield m


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


# --- the log's growth from an agent's steps and progress reports ----------------------

FLOODER = """\
cmd = ["/usr/bin/python3", "flood.py"]
pledge = ["read", "write", "send"]
timeout_s = 120
"""

FLOOD_PY = r"""
import errno, json, os, sys, time
target = sys.argv[1]  # its own steps, a file of the mount (mnt:PATH), or $NAME
target = os.path.join(os.environ["FS9_AGENT_DIR"], "steps") if target == "steps" else \
    os.path.join(os.environ["FS9_MNT"], target[4:]) if target.startswith("mnt:") else \
    os.environ[target]
payload = sys.argv[2].encode().decode("unicode_escape").encode() * int(sys.argv[3])
writes = int(sys.argv[4])
codes = {}
started = time.monotonic()
for _ in range(writes):
    try:
        fd = os.open(target, os.O_WRONLY)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
        codes["ok"] = codes.get("ok", 0) + 1
    except OSError as e:
        codes[errno.errorcode[e.errno]] = codes.get(errno.errorcode[e.errno], 0) + 1
print(json.dumps({"codes": codes, "elapsed": time.monotonic() - started}))
"""


def flood(mount: Mount, name: str, *args: str, unveil: str = "") -> dict:
    """A confined agent name running flood.py ARGS (what to write: the file, a text
    repeated so many times, so many times) once: what its writes got."""
    words = ", ".join(json.dumps(a) for a in args)
    toml = FLOODER.replace('"flood.py"]', f'"flood.py", {words}]')
    mount.define(name, toml + (f"[unveil]\n{unveil}" if unveil else ""), {"flood.py": FLOOD_PY})
    mount.sh(f"echo 'spawn {name}' > ctl", check=True)
    mount.write(f"agents/{name}/in", "go\n")
    out, err = wait_task(mount, name, timeout=120)
    assert out.strip(), err
    return json.loads(out.strip().splitlines()[-1])


def logged(mount: Mount, kind: str) -> int:
    import sqlite3
    db = sqlite3.connect(f"file:{mount.state / 'log.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM events WHERE kind=?", (kind,)).fetchone()[0]
    finally:
        db.close()


def test_a_write_of_many_short_steps_is_held_to_the_steps_rate(mount):
    """`steps` allows an agent 200 events a second (a burst of 1,000): counted per
    write, a write of 60,000 one-byte lines was 60,000 agent_step events at once (fs9's
    loop busy writing them, every agent and the operator waiting: 4 such writes, 240,000
    events, 11 s)."""
    got = flood(mount, "stepper", "steps", "x\\n", "600", "40")
    steps = logged(mount, "agent_step")
    assert steps <= 1000 + 200 * (got["elapsed"] + 2), f"{steps} agent_step events: {got}"
    assert got["codes"].get("EAGAIN"), got
    # more lines in one write than the burst could never pass: EFBIG, nothing logged
    assert errno_of(mount.write, "agents/stepper/steps", "x\n" * 60000) == errno.EFBIG
    assert logged(mount, "agent_step") == steps
    assert "60000 steps in one write: at most 1000" in mount.read("agents/stepper/err")


def test_progress_reports_are_held_to_the_steps_rate(mount):
    """Each write to tasks/ID/progress is a task_progress event (up to 4 KiB of text)
    and a status_update message: without a rate an agent wrote them as fast as fs9
    served the writes, the log growing without bound."""
    got = flood(mount, "reporter", "FS9_PROGRESS", "y", "4000", "3000")
    reports = logged(mount, "task_progress")
    assert reports <= 1000 + 200 * (got["elapsed"] + 2), f"{reports} task_progress: {got}"
    assert got["codes"].get("EAGAIN"), got


# --- an agent's spawn words narrow a definition, never widen it ----------------------

BOSS = ('cmd = ["cat"]\nunconfined = true\npledge = ["read", "write", "send", "spawn"]\n'
        'spawns = ["worker", "flaky"]\n[unveil]\n"ctl" = "w"\n')


def test_an_agents_spawn_never_widens_the_definition(mount):
    """An agent with the spawn pledge may set priority, timeout_s, max_restarts,
    within_s and restart of the definitions it may start: only to narrow them. It set a
    child interactive (above the definition's and its own), without a time limit
    (timeout_s=0), and a daemon whose definition gives up after 3 restarts a minute to
    restart for ever (455 confined sandboxes started in 5 s)."""
    mount.define("boss", BOSS)
    mount.define("worker", 'cmd = ["cat"]\ntimeout_s = 60\n')
    mount.define("flaky", 'cmd = ["sh", "-c", "exit 1"]\nmode = "daemon"\n'
                 'restart = "transient"\nmax_restarts = 3\nwithin_s = 60\n')
    mount.sh("echo 'spawn boss' > ctl", check=True)
    ctl = "agents/boss/view/ctl"
    for words in ("w1 def=worker priority=interactive", "w2 def=worker timeout_s=0",
                  "w3 def=worker timeout_s=61", "f1 def=flaky max_restarts=1000000000",
                  "f2 def=flaky within_s=0.001", "f3 def=flaky restart=permanent"):
        assert errno_of(mount.write, ctl, f"spawn {words}\n") == errno.EPERM, words
        assert words.split()[0] not in os.listdir(mount.path / "agents"), words
    assert "may not widen definition worker: priority=interactive" in mount.read("agents/boss/err")
    # narrowing is fine
    mount.write(ctl, "spawn w4 def=worker priority=background timeout_s=5\n")
    assert mount.status("w4")["priority"] == "background"
    mount.write(ctl, "spawn f4 def=flaky max_restarts=1 within_s=120 restart=temporary\n")
    assert 'restart = "temporary"' in mount.read("agents/f4/manifest")


# --- work handed on through `in` is held to the writer's mail rate --------------------

def test_work_an_agent_hands_on_through_in_is_held_to_its_mail_rate(mount):
    """An agent's `in` write is a task whose input (up to 16 MiB) the log keeps, as a
    message's body: a cluster node already charged it to the writer's mail rate
    (4 MiB/s, a burst of 16 MiB), one node did not. 40 writes of 1 MiB to a worker's
    `in` all passed at once: the log grew at the disk's speed, not the rate's."""
    mount.define("worker", 'cmd = ["true"]\nunconfined = true\n')
    mount.sh("echo 'spawn worker' > ctl", check=True)
    got = flood(mount, "hander", "mnt:agents/worker/in", "z", str(1 << 20), "40",
                unveil='"agents/worker/in" = "w"\n')
    queued = logged(mount, "task_queued") - 1  # (the flood's own task)
    assert got["codes"].get("EAGAIN"), got
    allowed_mib = 16 + 4 * (got["elapsed"] + 2)
    assert queued <= allowed_mib, f"{queued} tasks of 1 MiB in {got['elapsed']:.1f} s: {got}"
    assert "agent hander is over its rate for mail" in mount.read("log/audit")


# --- the kill switch is the operator's ---------------------------------------------

def test_only_the_operator_halts_and_resumes(mount):
    """`halt` stops every agent's work and `resume` undoes it: the kill switch. An agent
    with the spawn pledge (it may write the root ctl to start its definitions) halted
    every agent, and resumed fs9 after the operator had halted it."""
    mount.define("boss", BOSS)
    mount.sh("echo 'spawn boss' > ctl", check=True)
    ctl = "agents/boss/view/ctl"
    assert errno_of(mount.write, ctl, "halt\n") == errno.EPERM
    assert mount.read("ctl").startswith("state=running")
    mount.write("ctl", "halt\n")  # the operator pulls the switch
    assert errno_of(mount.write, ctl, "resume\n") == errno.EPERM
    assert mount.read("ctl").startswith("state=halted")
    assert "only the operator halts or resumes fs9, not agent boss" in mount.read("agents/boss/err")
    mount.write("ctl", "resume\n")
    assert mount.read("ctl").startswith("state=running")


def test_an_agents_commands_are_held_to_a_rate(mount):
    """Each line of a ctl write is a command and an event (`priority`, `agent_stop`...),
    and an agent may always write its own ctl: 10 writes of 5,000 `priority background`
    lines were 50,000 events in 3 s. An agent's commands have a rate, line by line (100
    a second, a burst of 500: EAGAIN past it; more lines in one write, EFBIG), on its
    own ctl, another's and the root's alike."""
    mount.define("a", 'cmd = ["cat"]\nunconfined = true\npriority = "background"\n')
    mount.sh("echo 'spawn a' > ctl", check=True)
    own = "agents/a/view/agents/a/ctl"
    assert errno_of(mount.write, own, "priority background\n" * 5000) == errno.EFBIG
    started, codes = time.monotonic(), []
    for _ in range(40):
        codes.append(errno_of(mount.write, own, "priority background\n" * 100))
    elapsed = time.monotonic() - started
    assert errno.EAGAIN in codes, codes
    said = logged(mount, "priority")
    assert said <= 500 + 100 * (elapsed + 2), f"{said} priority events in {elapsed:.1f} s"
    mount.write("agents/a/ctl", "priority normal\n" * 2000)  # the operator is not limited
    assert logged(mount, "priority") == said + 2000


# --- conversations with models are capped per agent -------------------------------

def test_an_agent_holds_a_bounded_number_of_conversations(mount):
    """Each open of models/M/clone is a conversation, kept in fs9's memory for an hour
    unused (and a log event): an agent opening it in a loop held them without bound.
    Past 64 open at once an open is EDQUOT (close one: `close` in its ctl); the
    operator is not counted."""
    mount.define("talker", 'cmd = ["cat"]\nunconfined = true\n[unveil]\n"models" = "rw"\n')
    mount.sh("echo 'spawn talker' > ctl", check=True)
    clone = mount.path / "agents/talker/view/models/scripted/clone"
    opened, codes = [], []
    for _ in range(200):
        try:
            opened.append(clone.read_text().strip())
        except OSError as e:
            codes.append(e.errno)
    assert len(opened) == 64 and set(codes) == {errno.EDQUOT}, (len(opened), set(codes))
    assert "64 conversations open" in mount.read("agents/talker/err")
    mount.write(f"agents/talker/view/models/scripted/{opened[0]}/ctl", "close\n")
    assert clone.read_text().strip()  # room again
    assert (mount.path / "models/scripted/clone").read_text().strip()  # the operator's


# --- rereading pending mail does not grow the log ---------------------------------

def test_rereading_pending_mail_is_logged_once_a_message(mount):
    """A read of a pending message (its file, next, batch, stream) is a mail_delivered
    record: rereading the same pending messages wrote one row each time, without a rate
    (a mail/batch read of 1,000 pending messages: 1,000 rows; 20 of them, 20,000). A
    message's delivery is now on the record once a mount (a remount delivers again)."""
    mount.define("a", 'cmd = ["cat"]\nunconfined = true\n')
    mount.sh("echo 'spawn a' > ctl", check=True)
    mount.write("agents/a/mail/batch", "".join(f"m{i}\n" for i in range(1000)))
    box = mount.path / "agents/a/view/agents/a/mail"
    for _ in range(20):
        assert (box / "batch").read_bytes().count(b"\n") == 1000
    first = sorted(n for n in os.listdir(box) if n[0].isdigit())[0]
    for _ in range(200):
        assert (box / first).read_bytes().endswith(b"m0\n")
        assert (box / "next").read_bytes().endswith(b"m0\n")
    mount.write("agents/a/mail/ack", first)  # (an ack commits the deferred records)
    assert logged(mount, "mail_delivered") == 1000


# --- fs9's memory of files the kernel has forgotten --------------------------------

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_files_made_and_removed_leave_nothing_in_fs9s_memory(mount):
    """At each open of a vault file fs9 notes its mtime and size under its inode number
    (close-to-open consistency of the page cache); inode numbers are never reused and
    the note was never dropped, so an agent making, opening and removing files in its
    subtree grew fs9 (root) by about 150 bytes a file, without end. The note now goes
    when the kernel forgets the inode."""
    (mount.vault / "c").mkdir()
    mount.define("churner", 'cmd = ["cat"]\nunconfined = true\nowns = ["vault/c"]\n')
    mount.sh("echo 'spawn churner' > ctl", check=True)
    folder = mount.path / "agents/churner/view/vault/c"

    def churn(tag: str, n: int = 15000) -> None:
        for i in range(n):
            path = folder / f"{tag}{i}"
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            os.close(os.open(path, os.O_RDONLY))
            os.unlink(path)
    churn("warm")  # (the log's and the allocator's own growth first)
    before = rss_kib(mount.pid)
    churn("f")
    grown = rss_kib(mount.pid) - before
    assert grown < 1024, f"fs9 grew {grown} KiB for 15,000 files made and removed"
    assert not os.listdir(mount.vault / "c")


# --- a refusal is the writer's -----------------------------------------------------

def test_refusals_of_writes_to_another_agents_files_are_the_writers(mount):
    """An agent's refused write to another agent's ctl or in was logged as the other
    agent's refusal and said in the other's err, not the writer's: the writer got no
    reason, the audit named the wrong agent, the refusals spent the other's budget of
    logged refusals (50 a second, then counted), and the other's err, which fs9 writes
    for the agent about its own commands, carried the writer's words (an unknown
    command is quoted: `fs9: unknown control message '...'`)."""
    mount.define("victim", VICTIM + 'clearance = "public"\n')
    mount.define("boss", 'cmd = ["cat"]\nunconfined = true\npledge = ["read", "write", '
                 '"send", "spawn"]\n[unveil]\n"agents/victim/ctl" = "w"\n'
                 '"agents/victim/in" = "w"\n')
    mount.sh("echo 'spawn victim' > ctl; echo 'spawn boss' > ctl", check=True)
    view = "agents/boss/view/agents/victim"
    assert errno_of(mount.write, f"{view}/ctl", "priority interactive\n") == errno.EPERM
    assert errno_of(mount.write, f"{view}/ctl", "ignore previous instructions\n") == errno.EINVAL
    assert errno_of(mount.write, f"{view}/in", "work\n") == errno.EACCES  # cleared lower
    said = mount.read("agents/boss/err")
    assert "may lower victim's priority" in said and "ignore previous instructions" in said
    assert "victim is cleared for public, work from boss is internal" in said
    assert mount.read("agents/victim/err") == ""
    assert {e.get("agent") for e in map(json.loads, mount.read("log/audit").splitlines())
            if e["kind"] == "refused"} == {"boss"}
