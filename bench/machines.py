"""Separate machines emulated on one box for bench/cluster.py --machines CPU: each
"machine" is a control group of its own with a CPU quota (CPU cores' worth of time per
100 ms period, cgroup v1 `cpu` controller: cpu.cfs_quota_us), and a group of the same
name in the v1 `cpuacct` hierarchy to count what it used (cpuacct.usage). This host's
cgroup v2 hierarchy offers no `cpu` controller (only hugetlb), so v1 it is; without
either, --machines refuses to run.

A process is placed after it started, with its descendants that are still in its own
CPU group (a write of each pid to cgroup.procs moves the process with all its threads;
what it forks later is born in the group): for an fs9 node, the server and its fork
server. Agents' programs move themselves into fs9's per-agent groups at start
(drivers/cgroups.py), outside the machine's quota; the mail benchmark runs none.

What this emulates: each machine's CPU, capped and separate. What it does not: the
disk (one device, every nats-server's fsync on it), memory bandwidth and caches (shared)
and the network (loopback: no latency, no bandwidth limit). The groups are removed on
exit, their processes moved back to where the benchmark runs first."""
import os
import time

V1 = "/sys/fs/cgroup"
PERIOD_US = 100_000


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _group(pid: int, controller: str = "cpu") -> str | None:
    """The v1 group of controller process pid is in (a path below the hierarchy's root)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, names, path = line.rstrip("\n").split(":", 2)
                if controller in names.split(","):
                    return path
    except OSError:
        pass
    return None


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


class Machines:
    """n machines m1..mN, each `cpu` cores (a fraction), as groups; `limit(False)` lifts
    the quotas (the same placement, unconstrained), `limit(True)` sets them again."""

    def __init__(self, n: int, cpu: float) -> None:
        if not (os.path.exists(f"{V1}/cpu/cpu.cfs_quota_us")
                and os.path.exists(f"{V1}/cpuacct/cpuacct.usage")):
            raise SystemExit("--machines needs the cgroup v1 cpu and cpuacct hierarchies "
                             f"under {V1}")
        self.cpu = cpu
        base = f"fs9-bench-machines-{os.getpid()}"
        self.parents = [f"{V1}/cpu/{base}", f"{V1}/cpuacct/{base}"]
        self.groups = [(f"{V1}/cpu/{base}/m{i}", f"{V1}/cpuacct/{base}/m{i}")
                       for i in range(1, n + 1)]
        self.home = [f"{V1}/{c}{_group(os.getpid(), c) or '/'}".rstrip("/")
                     for c in ("cpu", "cpuacct")]  # where the benchmark itself runs

    def __enter__(self) -> "Machines":
        try:
            for cpu, acct in self.groups:
                os.makedirs(cpu)
                os.makedirs(acct)
            self.limit(True)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def limit(self, on: bool) -> None:
        quota = str(int(self.cpu * PERIOD_US)) if on else "-1"
        for cpu, _ in self.groups:
            _write(f"{cpu}/cpu.cfs_period_us", str(PERIOD_US))
            _write(f"{cpu}/cpu.cfs_quota_us", quota)

    def place(self, i: int, pid: int) -> list[int]:
        """Move pid, and its descendants in its CPU group, into machine i (1-based):
        the pids moved."""
        own, kids = _group(pid), _children()
        family, todo = [], [pid]
        while todo:
            p = todo.pop()
            if _group(p) == own:
                family.append(p)
                todo += kids.get(p, [])
        for p in family:
            for d in self.groups[i - 1]:
                try:
                    _write(f"{d}/cgroup.procs", str(p))
                except ProcessLookupError:
                    pass  # ended meanwhile
        return family

    def usage_s(self) -> list[float]:
        """CPU seconds each machine has used so far."""
        return [int(open(f"{acct}/cpuacct.usage").read()) / 1e9 for _, acct in self.groups]

    def throttled(self) -> list[int]:
        """How many 100 ms periods each machine has hit its quota in so far."""
        out = []
        for cpu, _ in self.groups:
            stat = dict(line.split() for line in open(f"{cpu}/cpu.stat"))
            out.append(int(stat.get("nr_throttled", 0)))
        return out

    def remove(self) -> None:
        """Every process left in a group back to the benchmark's own groups, then the
        groups removed (rmdir: a group empties a moment after its last move)."""
        for pair in self.groups:
            for d, home in zip(pair, self.home):
                if not os.path.isdir(d):
                    continue
                for pid in open(f"{d}/cgroup.procs").read().split():
                    try:
                        _write(f"{home}/cgroup.procs", pid)
                    except OSError:
                        pass  # ended meanwhile
        deadline = time.monotonic() + 10
        for d in [d for pair in self.groups for d in pair] + self.parents:
            while os.path.isdir(d):
                try:
                    os.rmdir(d)
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
