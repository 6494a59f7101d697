"""Hostile agents against the scale work (issue 25 items 2-4) and the fork server: one
agent's spawns, wakes and sandboxes never reach another agent's sandbox, uid or room.
Each test checks what happened to the other agents, not the attacker's own result."""
import errno
import json
import os

import pytest

from conftest import fork_server, uid_procs
from fs9.drivers import confine, uidslots

pytestmark = pytest.mark.skipif(confine.unavailable() is not None,
                                reason=f"cannot confine here: {confine.unavailable()}")


def test_a_huge_sandbox_spec_leaves_the_fork_server_and_others_sandboxes_alone(mount):
    """An agent with the spawn pledge starts a definition it lists whose view unveils
    many long vault paths: its sandbox's spec is more than one packet to the fork server
    holds by default. Whether that sandbox starts or not, every other agent's sandbox,
    and its program, runs on untouched (the fork server is not replaced under them)."""
    mount.define("victim", 'cmd = ["sh", "-c", "echo up; exec sleep 600"]\nmode = "daemon"\n')
    mount.define("boss", 'cmd = ["cat"]\nunconfined = true\npledge = ["read", "spawn"]\n'
                         'spawns = ["wide", "wider"]\n[unveil]\n"vault" = "r"\n"ctl" = "w"\n')
    # read-only vault subtrees of 1,000 bytes each, each twice in the spec's binds:
    # wide's ~800 KB (more than a socket's default packet), wider's ~1.4 MB (more than
    # the fork server reads in one)
    for name, n in (("wide", 400), ("wider", 700)):
        unveil = "".join(f'"vault/{i:04d}{"x" * 200}/{"y" * 200}/{"z" * 200}/'
                         f'{"w" * 200}/{"v" * 190}" = "r"\n' for i in range(n))
        mount.define(name, 'cmd = ["sh", "-c", "cat; echo done"]\npledge = ["read"]\n'
                           f'[unveil]\n{unveil}')
        (mount.agents / name).chmod(0o755)
    (mount.agents / "victim").chmod(0o755)
    mount.write("ctl", "spawn victim\nspawn boss\n")
    mount.wait_for(lambda: mount.status("victim")["pid"], what="the victim's daemon")
    pid = int(mount.status("victim")["pid"])
    mount.wait_for(lambda: os.path.exists(f"/proc/{pid}") and
                   os.stat(f"/proc/{pid}").st_uid != 0, what="the victim's program")
    uid = os.stat(f"/proc/{pid}").st_uid
    procs = set(uid_procs(uid))
    for big in ("wide", "wider"):
        mount.write("agents/boss/view/ctl", f"spawn {big}\n")
        mount.write(f"agents/{big}/ctl", "run x\n")
        mount.wait_for(lambda: mount.status(big)["done"] != "0" or
                       mount.status(big)["failed"] != "0", 60, f"{big}'s task to end")
    # the victim's program and sandbox are as they were
    assert set(uid_procs(uid)) >= procs, (procs, uid_procs(uid))
    assert mount.status("victim")["restarts"] == "0", (
        mount.status("victim"), mount.read("agents/wide/err"), mount.read("agents/wider/err"))
    assert mount.status("victim")["pid"] == str(pid)
    assert "a fork request may be" in mount.read("agents/wider/err")
    # wide's view fits in one request: its sandbox starts (its vault paths need not exist)
    assert "fork server" not in mount.read("agents/wide/err"), mount.read("agents/wide/err")


def read_to_eof(path) -> str:
    with open(path) as f:
        return f.read()


def test_a_uid_is_not_given_again_while_its_killed_holders_sandbox_may_start(mount):
    """An agent killed while its sandbox is starting (the fork server slow to answer:
    stopped here, as a loaded machine would make it) has no process yet, and is no
    longer in the uid index: its uid looked free. A spawn then given that uid (the
    range's next-fit pointer come round to it) ran beside the dead agent's sandbox,
    which starts anyway and at its end kills every process of that uid and removes the
    control group both share by name. The new agent's work must run to its end, in a
    uid of its own."""
    import signal
    mount.define("probe", 'cmd = ["sh", "-c", "id -u; read x; sleep 2; echo alive"]\n'
                          'start = "on-demand"\nidle_s = 1\n')
    mount.define("filler", 'cmd = ["cat"]\nstart = "on-demand"\n')
    for d in ("probe", "filler"):
        (mount.agents / d).chmod(0o755)
    mount.write("ctl", "spawn old def=probe\n")
    mount.write("agents/old/ctl", "run x\n")
    old_uid = int(read_to_eof(mount.path / "agents/old/out").split()[0])
    mount.wait_for(lambda: mount.status("old")["state"] == "asleep", 30, "old asleep")
    # the uid range's pointer goes once round (10,000 uids), to just before old's
    total = uidslots.SLOT_SIZE - 1
    for start in range(0, total, 250):
        names = [f"f{i}" for i in range(start, min(start + 250, total))]
        mount.write("ctl", "".join(f"spawn {n} def=filler\nkill {n}\n" for n in names))
    server = fork_server(mount)
    os.kill(server, signal.SIGSTOP)
    try:
        mount.write("agents/old/ctl", "run y\n")  # old wakes: its sandbox waits for a fork
        mount.wait_for(lambda: mount.status("old")["state"] != "asleep", 5, "old awake")
        mount.write("ctl", "kill old\nspawn new def=probe\n")
        mount.write("agents/new/ctl", "run z\n")
    finally:
        os.kill(server, signal.SIGCONT)
    out = read_to_eof(mount.path / "agents/new/out").split()
    assert out[-1:] == ["alive"], (out, mount.read("agents/new/err"), mount.status("new"))
    assert int(out[0]) != old_uid, out
    assert mount.status("new")["done"] == "1", mount.status("new")


def test_an_on_demand_agents_scratch_goes_with_its_sandbox_at_sleep(mount):
    """What namespace.md says of sleep: the scratch folder is the sandbox's tmpfs, kept
    while it is awake, and each wake starts with an empty one (it said the scratch
    folder stayed across sleeps: a program trusting that lost its files)."""
    mount.define("p", 'cmd = ["sh", "-c", "ls -A $HOME; touch $HOME/mark-$(cat)"]\n'
                      'start = "on-demand"\nidle_s = 1\n')
    (mount.agents / "p").chmod(0o755)
    mount.write("ctl", "spawn p\n")
    mount.write("agents/p/ctl", "run x\nrun y\n")  # one wake: y sees x's file
    mount.wait_for(lambda: mount.status("p")["done"] == "2", 30, "x and y done")
    mount.wait_for(lambda: mount.status("p")["state"] == "asleep", 30, "p asleep")
    mount.write("agents/p/ctl", "run z\n")
    mount.wait_for(lambda: mount.status("p")["done"] == "3", 30, "z done")
    tasks = sorted(int(t) for t in os.listdir(mount.path / "agents/p/tasks"))
    outs = [mount.read(f"agents/p/tasks/{t}/out") for t in tasks]
    assert outs == ["", "mark-x\n", ""], outs
    assert "its scratch folder (a tmpfs of the\nsandbox's" in \
        open(os.path.join(os.path.dirname(__file__), "..", "docs", "namespace.md")).read()


def test_an_on_demand_agents_escaped_process_ends_with_its_sleep_and_kill(mount):
    """A task that leaves a process behind in a session of its own (out of its task's
    process group): when its on-demand agent falls asleep, nothing of its uid runs;
    killed asleep, nothing of it is left (processes, control group, scratch folder), and
    its uid is not given to the next agent while anything of it could remain."""
    from test_spawn import left_of
    mount.define("leaver", 'cmd = ["sh", "-c", "id -u; setsid sh -c \'sleep 300\' '
                           '</dev/null >/dev/null 2>&1 &"]\nstart = "on-demand"\nidle_s = 1\n')
    (mount.agents / "leaver").chmod(0o755)
    mount.write("ctl", "spawn l def=leaver\n")
    mount.write("agents/l/ctl", "run x\n")
    uid = int(read_to_eof(mount.path / "agents/l/out").split()[0])
    mount.wait_for(lambda: mount.status("l")["state"] == "asleep", 30, "l asleep")
    mount.wait_for(lambda: not uid_procs(uid), 30, "nothing of l running while asleep")
    mount.write("ctl", "kill l\n")
    mount.wait_for(lambda: not left_of(mount, uid), 30, "nothing left of l")


NAMED = r'''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, ctypes.c_char_p(b"\xff\xfe\xfdx"), 0, 0, 0)  # PR_SET_NAME: not UTF-8
print("unshare", libc.unshare(0x00020000), ctypes.get_errno(), flush=True)
print("alive", flush=True)
'''


def test_a_program_named_in_bytes_that_are_not_utf8_leaves_its_sandbox_standing(mount):
    """A program that names itself (comm) in bytes that are not UTF-8, then makes a
    syscall the sandbox refuses: the refusal is reported with its name and the sandbox
    stays up (its root zygote read the name as text, and a decoding error ended it and
    every process of the agent: a program could end its own sandbox at will, each time
    a new one to start through the fork server, and hide its attempts from the log)."""
    mount.define("named", 'cmd = ["python3", "named.py"]\n', {"named.py": NAMED})
    (mount.agents / "named").chmod(0o755)
    (mount.agents / "named" / "named.py").chmod(0o644)
    mount.write("ctl", "spawn n def=named\n")
    mount.write("agents/n/ctl", "run x\n")
    out = read_to_eof(mount.path / "agents/n/out")
    assert out.splitlines() == ["unshare -1 1", "alive"], (out, mount.read("agents/n/err"))
    assert mount.status("n")["done"] == "1", mount.status("n")
    def attempts():
        return [e for e in map(json.loads, mount.read("log/audit").splitlines())
                if e["kind"] == "escape_attempt" and e.get("agent") == "n"]
    mount.wait_for(attempts, 30, "the attempt reported")
    assert attempts()[0]["syscall"] == "unshare" and attempts()[0]["comm"].endswith("x")


def test_an_unmount_during_a_sandbox_start_fails_no_agent(mount):
    """fs9 unmounted while a sandbox's fork request is in flight (the fork server slow
    to answer: stopped here, as a loaded machine would make it): the agent is not failed
    (the closed socket was reported as a defect of its loop, `agent_failed`, and after
    the next mount it stayed stopped until the operator's `start`); its task waits for
    the next mount and runs then."""
    import signal
    mount.define("p", 'cmd = ["cat"]\n')
    (mount.agents / "p").chmod(0o755)
    mount.write("ctl", "spawn p\nspawn first def=p\n")
    # the fork server serving (not still starting: stopped then, it would never take
    # p's request, and nothing would be in flight): first's task done through it
    mount.write("agents/first/ctl", "run first\n")
    assert read_to_eof(mount.path / "agents/first/out") == "first\n"
    server = fork_server(mount)
    os.kill(server, signal.SIGSTOP)  # (the unmount ends it, stopped or not)
    try:
        mount.write("agents/p/ctl", "run x\n")
        # its loop has asked for a sandbox: the fork server's socket holds the request
        mount.wait_for(lambda: _queued_bytes(server) > 0, 8, "the fork request sent")
        mount.umount()
    finally:
        try:
            os.kill(server, signal.SIGCONT)
        except ProcessLookupError:
            pass
    mount.mount()
    assert mount.bugs() == []
    assert mount.status("p")["state"] != "failed", mount.status("p")
    assert read_to_eof(mount.path / "agents/p/out") == "x\n"
    assert mount.status("p")["done"] == "1", mount.status("p")


def _queued_bytes(pid: int) -> int:
    """Bytes waiting in the receive queues of pid's unix sockets (ss): a request sent
    and not yet read."""
    import subprocess
    out = subprocess.run(["ss", "-x", "-p", "-n"], capture_output=True, text=True).stdout
    return sum(int(line.split()[2]) for line in out.splitlines()[1:]
               if f"pid={pid}," in line and line.split()[2].isdigit())


def test_a_spawners_share_is_counted_right_through_kills_starts_and_remounts(mount):
    """The live-agent counts kept at spawn and kill (not recounted): an agent at its
    share of 100 is refused the 101st (EDQUOT) before and after kills made while its
    children's sandboxes start, and after a remount (the counts rebuilt by the replay);
    each kill gives back exactly one; the operator can always spawn."""
    from conftest import errno_of
    from fs9.kernel.agents.spawn import SPAWNED_PER_AGENT
    mount.define("boss", 'cmd = ["cat"]\nunconfined = true\npledge = ["read", "spawn"]\n'
                         'spawns = ["echo"]\n[unveil]\n"ctl" = "w"\n')
    mount.write("ctl", "spawn boss\n")
    ctl = "agents/boss/view/ctl"
    n = SPAWNED_PER_AGENT
    mount.write(ctl, "".join(f"spawn k{i} def=echo\n" for i in range(n)))
    assert errno_of(mount.write, ctl, "spawn over def=echo\n") == errno.EDQUOT
    # ten of them given work (their sandboxes starting) and killed at once
    for i in range(10):
        mount.write(f"agents/k{i}/ctl", "run x\n")
    mount.write(ctl, "".join(f"kill k{i}\n" for i in range(10)))
    mount.write(ctl, "".join(f"spawn j{i} def=echo\n" for i in range(10)))
    assert errno_of(mount.write, ctl, "spawn over def=echo\n") == errno.EDQUOT
    mount.umount()
    mount.mount()
    assert errno_of(mount.write, ctl, "spawn over def=echo\n") == errno.EDQUOT
    mount.write("ctl", "kill j0\nkill j1\n")  # the operator's kills count too
    mount.write(ctl, "spawn a0 def=echo\nspawn a1 def=echo\n")
    assert errno_of(mount.write, ctl, "spawn over def=echo\n") == errno.EDQUOT
    assert "over" not in os.listdir(mount.path / "agents")
    mount.write("ctl", "spawn mine def=echo\n")  # the operator's room
    assert "mine" in os.listdir(mount.path / "agents")


def test_a_confined_program_starts_with_the_cmd_and_env_its_manifest_may_have(mount):
    """cmd and env together may be up to 1 MiB (what exec(2) takes; the manifest's
    check): a confined agent's program starts with 840 KiB of them, as an unconfined
    one does (its start request to the sandbox was one packet of a socket's default
    size, ~200 KB: past that, "Message too long")."""
    big = "y" * (60 << 10)  # (a string of a manifest is at most 64 KiB)
    env = "".join(f'B{i} = "{big}"\n' for i in range(14))  # 840 KiB
    mount.define("envy", 'cmd = ["sh", "-c", "env | grep -c ^B"]\n'
                         f'[env]\n{env}')
    (mount.agents / "envy").chmod(0o755)
    mount.write("ctl", "spawn e def=envy\n")
    mount.write("agents/e/ctl", "run x\n")
    out = read_to_eof(mount.path / "agents/e/out")
    assert out.split() == ["14"], (out[:200], mount.read("agents/e/err")[:300])


def test_a_fork_server_killed_in_a_burst_of_starts_is_replaced_for_all(mount):
    """kill -9 of the fork server while a burst of sandboxes is asked of it: the request
    in flight is asked again of a new one, the queued ones go to that one; each task
    gives its own output or (its sandbox forked by the old one) ends with it, and every
    agent's next task runs (held)."""
    mount.define("echoid", 'cmd = ["sh", "-c", "cat && id -u"]\n')
    (mount.agents / "echoid").chmod(0o755)
    # a fork server serving, not one still starting (this is about one killed mid-burst)
    mount.write("ctl", "spawn q def=echoid\n")
    mount.write("agents/q/ctl", "run q\n")
    assert read_to_eof(mount.path / "agents/q/out").split()[:1] == ["q"]
    server = fork_server(mount)
    names = [f"q{i}" for i in range(8)]
    mount.write("ctl", "".join(f"spawn {n} def=echoid\n" for n in names))
    for n in names:
        mount.write(f"agents/{n}/ctl", f"run {n}\n")
    os.kill(server, 9)
    outs = {n: read_to_eof(mount.path / "agents" / n / "out").split() for n in names}
    # a task whose sandbox the old fork server had forked ended with it (exit 137 if its
    # program had started; "cannot confine: the sandbox exited" if the sandbox died
    # before it: docs/namespace.md); every other one gave its own output
    for n, out in outs.items():
        s = mount.status(n)
        assert out[:1] == [n] or (s["latest_state"], s["latest_exit"]) == ("failed", "137") \
            or (s["latest_state"], s["latest_reason"]) == \
            ("failed", "cannot confine: the sandbox exited"), \
            (n, out, s["latest_state"], s["latest_exit"], s["latest_reason"])
    for n in names:  # and each agent's next task runs, in a sandbox from the new one
        mount.write(f"agents/{n}/ctl", f"run again{n}\n")
    again = {n: read_to_eof(mount.path / "agents" / n / "out").split() for n in names}
    assert [n for n, out in again.items() if out[:1] != [f"again{n}"]] == [], again
    assert fork_server(mount) != server
    assert mount.bugs() == []


def test_wakes_past_max_awake_wait_their_turn_and_lose_nothing(mount):
    """Anyone who can give on-demand agents work (an agent with `send` mailing every
    agent it sees) wakes them; each awake one is a sandbox on fs9's account. With
    `--max-awake 2`, six given work at once are never more than two awake: the rest
    say `waking` and run in turn, every task done once."""
    mount.umount()
    mount.mount("--max-awake", "2")
    mount.define("nap", 'start = "on-demand"\nidle_s = 1\nunconfined = true\n'
                        'cmd = ["sh", "-c", "read x; sleep 1; echo $x"]\n')
    names = [f"n{i}" for i in range(6)]
    mount.write("ctl", "".join(f"spawn {n} def=nap\n" for n in names))
    for n in names:
        mount.write(f"agents/{n}/ctl", f"run {n}\n")
    most, waking = 0, set()

    def all_done():
        nonlocal most
        # the root status: every agent's line in one read, as the kernel had them at one
        # moment (six status files read one after another are six moments: an agent seen
        # awake may be asleep, and its room another's, by the time the next is read)
        lines = [line.split() for line in mount.read("status").splitlines()]
        states = {f[0]: (f[1], f[5]) for f in lines if f and f[0] in names}
        awake = [n for n, (state, _) in states.items() if state not in ("asleep", "waking")]
        most = max(most, len(awake))
        waking.update(n for n, (state, _) in states.items() if state == "waking")
        return len(states) == len(names) and all(done == "1" for _, done in states.values())
    mount.wait_for(all_done, 120, "all six tasks done")
    assert most <= 2, f"{most} on-demand agents awake at once past --max-awake 2"
    assert waking, "no wake was seen waiting its turn"
    for n in names:
        tasks = os.listdir(mount.path / f"agents/{n}/tasks")
        assert [mount.read(f"agents/{n}/tasks/{t}/out") for t in tasks] == [f"{n}\n"]
