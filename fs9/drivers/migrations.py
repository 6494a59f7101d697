"""The wait of a sandbox's first move into its control groups, begun early.

Moving a process between control groups (a write to cgroup.procs, which every confined
program does before it drops root: programs.py) takes the kernel's cgroup migration
lock for writing, and the first writer after a quiet spell waits for an RCU grace
period (rcu_sync_enter: 10-15 ms on this 2-core machine, docs/benchmarks.md); writers
while one waits share its grace period, and writers within a grace period after the
last one pay nothing. So fs9 moves one of its own threads' process into the group it
is already in (a move that changes nothing) as a sandbox's start begins: the grace
period runs while the fork server forks the sandbox and it sets up, and the first
program's own move, 10-20 ms later, finds it passed. A host whose cgroup2 root is
mounted with favordynmods never waits; this then costs one cheap write.
"""
import os

from . import cgroups


def _own_group_procs() -> str | None:
    """The cgroup.procs of the group this process is in, in one hierarchy fs9 uses."""
    where = cgroups.hierarchies()
    root = where.get("kill") or next(iter(where.values()), None)
    if root is None:
        return None
    v2 = root == where.get("kill")
    controller = os.path.basename(root)
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, names, path = line.split(":", 2)
        if (v2 and names == "") or (not v2 and controller in names.split(",")):
            return os.path.join(root, path.lstrip("/"), "cgroup.procs")
    return None


def begin_grace_period() -> None:
    """Blocking (a worker thread's): move this process into its own group, which takes
    the migration lock and so starts (or shares) its grace period. Failing changes
    nothing: the first program's move then waits for the whole of it, as it did."""
    procs = _own_group_procs()
    if procs is None:
        return
    try:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        pass
