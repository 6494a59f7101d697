"""Sandboxes made ahead of their agents' spawns (kernel/agents/pool.py,
drivers/pooled.py): a confined spawn that takes one runs its program under exactly what
a fresh sandbox's does; no two agents share one; the pool stays bounded; nothing of it
is left after unmount. No timing is asserted here: bench/spawnspeed.py measures."""
import os

import pytest

from conftest import _ppid, fork_server, uid_procs
from fs9.drivers import confine
from test_spawn import UNDER, fields, groups_of, left_of, nothing_left, read_to_eof
from test_scale import groups_left

pytestmark = pytest.mark.skipif(confine.unavailable() is not None,
                                reason=f"cannot confine here: {confine.unavailable()}")

# UNDER (test_spawn.py), and more of what a program runs under: its login uid (the
# audit's key), a refused syscall (answered through its seccomp listener: a pooled
# sandbox's first program hands its own over), Landlock on reads outside its view
MORE = UNDER + r'''
echo "loginuid=$(cat /proc/self/loginuid)"
echo "unshare=$(unshare -m true 2>&1 | grep -c 'not permitted')"
echo "sys=$(ls /sys 2>&1 | grep -c denied)"
echo "inet=$(cat /proc/net/dev | grep -c ':')"
'''
LIMITS = "[limits]\nmemory_mb = 200\nprocesses = 40\n"
POOL = 2  # fs9 mount --sandbox-pool


@pytest.fixture
def pooled(mount):
    """The mount, served again with a pool of POOL sandboxes (off by default)."""
    mount.umount()
    return mount.mount("--sandbox-pool", str(POOL))


def sandboxes_of(server: int) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _ppid(int(e)) == server]


def firsts_of(server: int) -> dict[int, int]:
    """The pool's sandboxes' first programs, each with the uid its control group is
    named by, once it is in it (it moves itself there after its fork)."""
    found = {}
    for sandbox in sandboxes_of(server):
        for pid in [int(e) for e in os.listdir("/proc") if e.isdigit() and
                    _ppid(int(e)) == sandbox]:
            try:
                with open(f"/proc/{pid}/cgroup") as f:
                    named = {os.path.basename(line.strip()) for line in f}
            except OSError:
                continue
            found.update({pid: int(n) for n in named if n.isdigit()})
    return found


def pool_full(mount) -> int:
    """Wait until the pool holds its POOL sandboxes, each with its first program in its
    control group (no agent alive): the fork server."""
    server = fork_server(mount)
    mount.wait_for(lambda: len(sandboxes_of(server)) == POOL and
                   len(set(firsts_of(server).values())) == POOL, what="the pool full")
    return server


def limits_of(mount, uid: int) -> dict[str, str]:
    """The limits written in the agent's control groups, by file name."""
    found = {}
    for d in groups_of(mount, uid):
        for name in ("memory.limit_in_bytes", "memory.max", "pids.max", "cpu.shares",
                     "cpu.weight"):
            if os.path.exists(os.path.join(d, name)):
                with open(os.path.join(d, name)) as f:
                    found[name] = f.read().strip()
    return found


def define_under(mount) -> None:
    mount.define("under", 'cmd = ["sh", "under.sh"]\n' + LIMITS, {"under.sh": MORE})
    (mount.agents / "under").chmod(0o755)
    (mount.agents / "under" / "under.sh").chmod(0o644)


def test_a_pooled_sandbox_runs_its_program_under_what_a_fresh_one_does(pooled):
    mount = pooled
    """With the pool full, one write spawns three: the first two take sandboxes made
    ahead, the third a fresh one (the pool refills after the write). Their first
    programs run under the same: uid and groups, no capabilities, no_new_privs, the
    seccomp filter (a refused syscall), namespaces of their own (no network), control
    groups named by their uid with their own limits, Landlock, login uid, fds, nice; and
    a second program of a pooled one, forked at its start, the same as its first."""
    define_under(mount)
    pool_full(mount)
    mount.write("ctl", "".join(f"spawn u{i} def=under priority=background\n"
                               for i in (1, 2, 3)))
    seen = {}
    for name in ("u1", "u2", "u3"):
        mount.write(f"agents/{name}/ctl", "run x\n")
        seen[name] = fields(read_to_eof(mount.path / "agents" / name / "out"))
    uids = {name: s["ids"].split()[0] for name, s in seen.items()}
    assert len(set(uids.values())) == 3, seen
    fs9_ns = {k: os.readlink(f"/proc/{mount.pid}/ns/{k}") for k in ("mnt", "net", "ipc")}
    for k in ("mnt", "net", "ipc"):  # each its own, none fs9's
        assert len({s[f"ns_{k}"] for s in seen.values()} | {fs9_ns[k]}) == 4, (k, seen)
    same = {name: {k: v.replace(uids[name], "U") for k, v in s.items()
                   if not k.startswith("ns_") or k in ("ns_uts", "ns_pid")}
            for name, s in seen.items()}
    assert same["u1"] == same["u2"] == same["u3"], same
    first = seen["u1"]
    assert first["ids"] == " ".join([uids["u1"]] * 3) and first["loginuid"] == uids["u1"]
    assert first["NoNewPrivs"] == "1" and first["Seccomp"] == "2", first
    assert first["Seccomp_filters"] == "1", first
    assert first["CapEff"] == first["CapPrm"] == "0000000000000000", first
    assert first["unshare"] == "1" and first["etc"] == "1" and first["sys"] == "1", first
    assert first["inet"] == "1", first  # only its loopback, down: a namespace of its own
    assert first["nice"] == "10" and first["leader"] == "yes", first
    assert len(first["fds"].split()) == 5, first
    assert limits_of(mount, int(uids["u1"])) == limits_of(mount, int(uids["u3"])) != {}
    assert limits_of(mount, int(uids["u1"])).get("pids.max", "40") == "40"
    # its second program, forked by the sandbox, which loaded its own filter only then
    # (its first loaded one itself): under exactly what the first ran under, its refused
    # syscall answered through the sandbox's own listener
    mount.write("agents/u1/ctl", "run y\n")
    second = fields(read_to_eof(mount.path / "agents" / "u1" / "out"))
    assert second == first, (first, second)
    mount.write("ctl", "kill u1\nkill u2\nkill u3\n")
    nothing_left(mount, [int(u) for u in uids.values()])


def test_no_two_agents_share_a_pooled_sandbox(pooled):
    mount = pooled
    """Agents spawned one after another, each taking what the pool has: each runs in a
    sandbox of its own (mount namespace, uid, control group), and each sandbox ends
    with its agent."""
    define_under(mount)
    server = pool_full(mount)
    seen, sandboxes = {}, set()
    for i in range(6):
        name = f"s{i}"
        mount.write("ctl", f"spawn {name} def=under\n")
        mount.write(f"agents/{name}/ctl", "run x\n")
        seen[name] = fields(read_to_eof(mount.path / "agents" / name / "out"))
        sandboxes |= set(sandboxes_of(server))
        assert len(sandboxes_of(server)) <= i + 1 + POOL
    assert len({s["ns_mnt"] for s in seen.values()}) == 6, seen
    uids = [int(s["ids"].split()[0]) for s in seen.values()]
    assert len(set(uids)) == 6
    for uid in uids:
        assert groups_of(mount, uid), uid
    mount.write("ctl", "".join(f"kill {n}\n" for n in seen))
    nothing_left(mount, uids)
    # each agent's sandbox ended with it: only the pool's are left, never reused
    mount.wait_for(lambda: len(sandboxes_of(server)) == POOL, what="the pool alone")
    assert len(sandboxes) >= 6


def test_a_killed_fork_server_takes_the_pool_with_it_and_the_pool_is_made_again(pooled):
    """kill -9 of the fork server ends the sandboxes made ahead (each with a parent-death
    signal); a spawn then still gives its output, and the pool is made again, from the
    new fork server, with nothing left of the old one's."""
    mount = pooled
    mount.define("echoid", 'cmd = ["sh", "-c", "cat && id -u"]\n')
    (mount.agents / "echoid").chmod(0o755)
    server = pool_full(mount)
    old = firsts_of(server)
    os.kill(server, 9)
    mount.wait_for(lambda: not mounted_procs(list(old)), 30, "the old pool to end")
    mount.write("ctl", "spawn after def=echoid\n")
    mount.write("agents/after/ctl", "run x\n")
    out = read_to_eof(mount.path / "agents" / "after" / "out").split()
    assert out[0] == "x", (out, mount.read("agents/after/err"))
    mount.write("ctl", "kill after\n")
    nothing_left(mount, [int(out[1])])
    assert pool_full(mount) != server
    for uid in set(old.values()) - {int(out[1])}:  # the old pool's uids: nothing left
        mount.wait_for(lambda: not left_of(mount, uid), 30, f"nothing left of {uid}")


def test_the_pool_is_bounded_and_nothing_of_it_is_left_after_unmount(pooled):
    mount = pooled
    server = pool_full(mount)
    made = sandboxes_of(server)
    # what a sandbox made ahead holds: its first program, root until its agent's start,
    # in the control group of the uid set aside for it
    firsts = firsts_of(server)
    uids = set(firsts.values())
    assert len(firsts) == len(uids) == POOL, firsts
    assert all(os.stat(f"/proc/{p}").st_uid == 0 for p in firsts)
    assert all(groups_of(mount, uid) for uid in uids)
    assert len(sandboxes_of(server)) == POOL  # (and no more are made meanwhile)
    mount.umount()
    assert not mounted_procs(made + list(firsts))
    assert not groups_left(mount)
    for uid in uids:
        assert not left_of(mount, uid) and not uid_procs(uid), uid


def mounted_procs(pids) -> list[int]:
    """Those of pids still running (not zombies)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


def test_agents_with_inet_or_on_demand_start_as_before_and_leave_the_pool_alone(pooled):
    """An agent with `inet` (its sandbox shares the host's network) and an on-demand one
    (asleep, it would hold a sandbox made ahead) take none: the pool's sandboxes and
    their uids stay as they were."""
    mount = pooled
    mount.define("online", 'cmd = ["sh", "-c", "cat; id -u; cat /proc/net/dev | grep -c :"]\n'
                           'pledge = ["inet"]\n')
    mount.define("lazy", 'cmd = ["sh", "-c", "cat; id -u"]\nstart = "on-demand"\n')
    for d in ("online", "lazy"):
        (mount.agents / d).chmod(0o755)
    server = pool_full(mount)
    before = firsts_of(server)
    mount.write("ctl", "spawn n1 def=online\nspawn d1 def=lazy\n")
    outs = {}
    for name in ("n1", "d1"):
        mount.write(f"agents/{name}/ctl", "run x\n")
        outs[name] = read_to_eof(mount.path / "agents" / name / "out").split()
    assert outs["n1"][0] == "x" and int(outs["n1"][2]) > 1, outs  # the host's interfaces
    assert outs["d1"][0] == "x", outs
    assert not {int(outs["n1"][1]), int(outs["d1"][1])} & set(before.values()), (outs, before)
    assert firsts_of(server) == before
    mount.write("ctl", "kill n1\nkill d1\n")
    nothing_left(mount, [int(outs["n1"][1]), int(outs["d1"][1])])
