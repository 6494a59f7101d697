"""Spawning confined agents fast (issue 25, item 1): each agent's sandbox is forked
from fs9's one fork server (drivers/forkserver.py). What must hold however fast it is:
every spawn in a long row gives its first task's output; no sandbox carries anything
of another agent (uid, scratch, control group, mounts, processes); the fork server
keeps nothing of any agent. No timing is asserted here: bench/spawnspeed.py measures."""
import os
import zlib

import pytest

from conftest import _ppid, fork_server, uid_procs
from fs9.drivers import cgroups, confine

pytestmark = pytest.mark.skipif(confine.unavailable() is not None,
                                reason=f"cannot confine here: {confine.unavailable()}")

# What a sandbox shows its program of itself and of anything around it.
PROBE = r'''#!/bin/sh
echo "uid=$(id -u)"
echo "home=$(ls -A "$HOME" | tr '\n' ' ')"
echo "cgroups=$(cut -d: -f3 /proc/self/cgroup | sort -u | tr '\n' ' ')"
echo "views=$(grep -o ' /agents/[^/ ]*/view ' /proc/self/mountinfo | sort -u | tr -d ' ' | tr '\n' ' ')"
echo "others=$(for p in /proc/[0-9]*; do stat -c %u "$p"; done 2>/dev/null | sort -u | grep -vx "$(id -u)" | tr '\n' ' ')"
touch "$HOME/mark-$FS9_AGENT"
setsid sleep 300 </dev/null >/dev/null 2>&1 &
echo done
'''


# What a program runs under, as it sees it: a sandbox's first program is confined ahead
# (drivers/programs.py), every later one when it starts; the two must not differ.
UNDER = r'''#!/bin/sh
echo "ids=$(id -u) $(id -g) $(id -G)"
grep -E '^(NoNewPrivs|Seccomp|Seccomp_filters|Cap[A-Za-z]+):' /proc/self/status |
    tr -d ' \t' | sed 's/:/=/'
for k in mnt net ipc uts pid; do echo "ns_$k=$(readlink /proc/self/ns/$k)"; done
echo "cgroups=$(cut -d: -f2- /proc/self/cgroup | sort | tr '\n' ' ')"
echo "leader=$([ "$(cut -d' ' -f6 /proc/$$/stat)" = "$$" ] && echo yes || echo no)"
printf 'fds='  # (by the shell itself: a command substitution's pipe races its listing)
for f in /proc/$$/fd/*; do printf '%s ' "${f##*/}"; done
echo
echo "nice=$(cut -d' ' -f19 /proc/$$/stat)"
echo "etc=$(touch /etc/fs9-probe 2>&1 | grep -c denied)"
echo "view=$(ls "$FS9_MNT" | tr '\n' ' ')"
'''


def read_to_eof(path) -> str:
    with open(path) as f:
        return f.read()


def first_output(mount, name: str, spawn_words: str = "") -> str:
    """Spawn NAME, run one task, read its out to EOF (out blocks until the task ends)."""
    mount.write("ctl", f"spawn {name}{spawn_words}\n")
    mount.write(f"agents/{name}/ctl", "run x\n")
    return read_to_eof(mount.path / "agents" / name / "out")


def fields(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def groups_of(mount, uid: int) -> list[str]:
    instance = f"{zlib.crc32(str(mount.state).encode()):08x}"
    return [d for root in set(cgroups.hierarchies().values())
            if os.path.isdir(d := os.path.join(root, f"fs9-{instance}", str(uid)))]


def left_of(mount, uid: int) -> list[str]:
    """What is left on the host of an agent's uid: processes, control groups, its
    scratch folder."""
    instance = f"{zlib.crc32(str(mount.state).encode()):08x}"  # (not an earlier mount's)
    scratch = [os.path.join("/tmp", d, str(uid)) for d in os.listdir("/tmp")
               if d.startswith(f"fs9-scratch-{instance}-")]
    return [f"pid {p}" for p in uid_procs(uid)] + groups_of(mount, uid) + \
        [d for d in scratch if os.path.exists(d)]


def nothing_left(mount, uids, timeout: float = 30) -> None:
    """Wait until nothing is left of the agents' uids; a timeout says what is."""
    try:
        mount.wait_for(lambda: not any(left_of(mount, u) for u in uids), timeout,
                       "nothing left of the agents")
    except AssertionError as e:
        raise AssertionError(f"{e}: {({u: left_of(mount, u) for u in uids})}") from None


def test_many_confined_spawns_in_a_row_each_give_their_output(mount):
    mount.define("echoid", 'cmd = ["sh", "-c", "cat && id -u"]\n')
    (mount.agents / "echoid").chmod(0o755)
    names, uids = [f"c{i}" for i in range(40)], set()
    for batch in range(0, len(names), 10):
        for name in names[batch:batch + 10]:
            out = first_output(mount, name, " def=echoid")
            assert out.startswith("x\n"), (out, mount.read(f"agents/{name}/err"))
            uids.add(int(out.split()[1]))
        mount.write("ctl", "".join(f"kill {n}\n" for n in names[batch:batch + 10]))
    assert len(uids) == len(names)  # each its own uid
    assert not set(names) & set(os.listdir(mount.path / "agents"))
    nothing_left(mount, uids)


def test_no_sandbox_carries_anything_of_another_agent(mount):
    """Two agents of one definition side by side, then a third after the first is
    killed: each sees only its own uid, scratch, control group, view and processes."""
    mount.define("probe", 'cmd = ["sh", "probe.sh"]\n', {"probe.sh": PROBE})
    (mount.agents / "probe").chmod(0o755)
    (mount.agents / "probe" / "probe.sh").chmod(0o644)
    server = fork_server(mount)
    ns = {k: os.readlink(f"/proc/{mount.pid}/ns/{k}") for k in ("mnt", "net", "ipc")}
    seen = {}
    for name in ("p1", "p2"):
        seen[name] = fields(first_output(mount, name, " def=probe"))
    # its fds once it serves (until its first request it may still be making its wake-up
    # pipe): killing one agent and forking another must leave none behind
    fds = set(os.listdir(f"/proc/{server}/fd"))
    mount.write("ctl", "kill p1\n")
    uid1 = int(seen["p1"]["uid"])
    nothing_left(mount, [uid1])
    seen["p3"] = fields(first_output(mount, "p3", " def=probe"))
    assert len({s["uid"] for s in seen.values()}) == 3, seen
    assert len({s["cgroups"] for s in seen.values()}) == 3, seen
    for name, s in seen.items():
        assert s["home"].split() == [], (name, s)  # no one's mark, not even its own yet
        assert s["views"].split() == [f"/agents/{name}/view"], (name, s)
        assert s["others"].split() == [], (name, s)  # no process of any other uid
        assert s["uid"] in s["cgroups"], (name, s)  # its own group, named by its uid
    # the fork server is as it was: root, fs9's namespaces, no fd of any agent kept
    assert os.stat(f"/proc/{server}").st_uid == 0
    assert {k: os.readlink(f"/proc/{server}/ns/{k}") for k in ns} == ns
    assert set(os.listdir(f"/proc/{server}/fd")) == fds
    # each live sandbox is its own child of the fork server, in a namespace of its own
    sandboxes = [int(e) for e in os.listdir("/proc") if e.isdigit() and
                 _ppid(int(e)) == server]
    assert len(sandboxes) == 2, sandboxes
    assert len({os.readlink(f"/proc/{p}/ns/mnt") for p in sandboxes} | {ns["mnt"]}) == 3
    mount.write("ctl", "kill p2\nkill p3\n")
    for s in (seen["p2"], seen["p3"]):
        nothing_left(mount, [int(s["uid"])])


def test_the_first_program_runs_under_what_every_later_one_does(mount):
    """The first task's program (confined ahead of its start) and the second's (forked
    at its start): the same uid and groups, no capabilities, no_new_privs, the same
    seccomp filter, namespaces, control groups, Landlock (a write to /etc denied), a
    session of its own, no fd but its three, the nice of its priority."""
    mount.define("under", 'cmd = ["sh", "under.sh"]\n', {"under.sh": UNDER})
    (mount.agents / "under").chmod(0o755)
    (mount.agents / "under" / "under.sh").chmod(0o644)
    first = fields(first_output(mount, "u1", " def=under priority=background"))
    mount.write("agents/u1/ctl", "run y\n")
    second = fields(read_to_eof(mount.path / "agents" / "u1" / "out"))
    assert first == second, (first, second)
    uid = first["ids"].split()[0]
    assert first["ids"] == f"{uid} {uid} {uid}", first
    assert first["NoNewPrivs"] == "1" and first["Seccomp"] == "2", first
    assert first["CapEff"] == first["CapPrm"] == "0000000000000000", first
    assert first["leader"] == "yes" and first["etc"] == "1", first
    assert first["nice"] == "10", first  # background's (set from outside when prepared)
    assert uid in first["cgroups"], first
    assert first["ns_mnt"] != os.readlink(f"/proc/{mount.pid}/ns/mnt"), first
    # its three, the script the shell reads, the folder its glob reads: nothing else
    fds = first["fds"].split()
    assert len(fds) == 5 and {"0", "1", "2"} <= set(fds), first
    mount.write("ctl", "kill u1\n")
    nothing_left(mount, [int(uid)])


def test_a_fork_server_killed_is_replaced(mount):
    """kill -9 of the fork server: its sandboxes end (each with a parent-death signal,
    taking its agent's processes with it), and the next task, of a new agent or of an
    agent whose sandbox ended, starts in a fresh sandbox from a new fork server."""
    mount.define("echoid", 'cmd = ["sh", "-c", "cat && id -u"]\n')
    (mount.agents / "echoid").chmod(0o755)
    assert first_output(mount, "before", " def=echoid").startswith("x\n")
    first = fork_server(mount)
    [sandbox] = [int(e) for e in os.listdir("/proc") if e.isdigit() and _ppid(int(e)) == first]
    os.kill(first, 9)
    mount.wait_for(lambda: not os.path.exists(f"/proc/{sandbox}") or
                   open(f"/proc/{sandbox}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
                   30, "the old sandbox to end")
    assert first_output(mount, "after", " def=echoid").startswith("x\n")
    assert fork_server(mount) != first
    mount.write("agents/before/ctl", "run y\n")
    mount.wait_for(lambda: mount.status("before")["done"] == "2", 30, "before's second task")
    assert read_to_eof(mount.path / "agents" / "before" / "out").startswith("y\n")


def test_sandboxes_asked_for_at_once_each_get_their_own(mount):
    """Eight agents spawned in one write and given their tasks together: their sandboxes
    are asked of the fork server at the same moment (one request at a time, each reply
    to its asker), and each task gives its own agent's output."""
    mount.define("echoid", 'cmd = ["sh", "-c", "cat && id -u"]\n')
    (mount.agents / "echoid").chmod(0o755)
    names = [f"b{i}" for i in range(8)]
    mount.write("ctl", "".join(f"spawn {n} def=echoid\n" for n in names))
    for n in names:
        mount.write(f"agents/{n}/ctl", f"run {n}\n")
    outs = {n: read_to_eof(mount.path / "agents" / n / "out").split() for n in names}
    assert all(out[0] == n for n, out in outs.items()), outs
    assert len({out[1] for out in outs.values()}) == len(names), outs
    mount.write("ctl", "".join(f"kill {n}\n" for n in names))
    nothing_left(mount, [int(o[1]) for o in outs.values()])


def test_a_killed_servers_scratch_folders_go_at_the_next_mount(mount):
    """kill -9 of the server removes nothing: its agents' scratch folders stay in /tmp.
    The next mount of the same state removes them once it makes its own; another
    user's folder of a matching name (anyone may make one in /tmp) is not touched."""
    mount.define("echoid", 'cmd = ["sh", "-c", "cat && id -u"]\n')
    (mount.agents / "echoid").chmod(0o755)
    uid = int(first_output(mount, "s1", " def=echoid").split()[1])
    instance = f"{zlib.crc32(str(mount.state).encode()):08x}"
    ours = [os.path.join("/tmp", d) for d in os.listdir("/tmp")
            if d.startswith(f"fs9-scratch-{instance}-")]
    assert len(ours) == 1 and os.path.isdir(os.path.join(ours[0], str(uid))), ours
    planted = f"/tmp/fs9-scratch-{instance}-planted"
    os.mkdir(planted)
    os.chown(planted, 65534, 65534)
    try:
        mount.kill9()
        assert os.path.isdir(ours[0])  # nobody removed it
        mount.mount()
        assert first_output(mount, "s2", " def=echoid").startswith("x\n")
        assert not os.path.exists(ours[0])
        assert os.path.isdir(planted)
    finally:
        os.rmdir(planted)
