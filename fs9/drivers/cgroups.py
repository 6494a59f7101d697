"""One control group per confined agent: its programs' memory, processes and CPU share,
and a way to end every one of them, however they fork.

fs9 uses what the host has, per controller: cgroup v2 where the v2 hierarchy offers
the controller (`cgroup.controllers`), else the v1 hierarchy of that name mounted
under /sys/fs/cgroup. Limits:
  - memory: v2 memory.max (and memory.swap.max 0) | v1 memory.limit_in_bytes
    (memory.memsw.limit_in_bytes too, where swap accounting exists); past it the
    kernel's OOM killer ends a program of the group (oom_kill counted);
  - processes and threads: v2/v1 pids.max; past it fork/clone fail (EAGAIN) and
    pids.events counts `max`;
  - CPU share: v2 cpu.weight (1-10000, default 100) | v1 cpu.shares (x10.24);
  - the end of everything: v2 cgroup.kill (Linux 5.14+; any v2 group has it, with or
    without controllers), else SIGKILL to each pid of the groups until none is left.
Groups live under a parent per fs9 instance (`fs9-<instance>`), which holds no process
itself (v2's rule). Everything here is plain paths and numbers and blocking file
writes. A controller the host has in neither hierarchy is named in `missing`: that
limit is not enforced, and the kernel says so in an event when the agent starts.
"""
import errno
import os
import signal
import time

ROOT = "/sys/fs/cgroup"
CONTROLLERS = ("memory", "pids", "cpu")
REMOVE_S = 10.0  # how long a removal waits for a group to empty after its processes died


def _is_v2(path: str) -> bool:
    return os.path.exists(os.path.join(path, "cgroup.controllers"))


def hierarchies() -> dict[str, str]:
    """Where each controller (and "kill": a v2 hierarchy) is found on this host."""
    found: dict[str, str] = {}
    v2 = next((p for p in (ROOT, os.path.join(ROOT, "unified")) if _is_v2(p)), None)
    if v2 is not None:
        found["kill"] = v2
        try:
            with open(os.path.join(v2, "cgroup.controllers")) as f:
                offered = f.read().split()
        except OSError:
            offered = []
        for c in CONTROLLERS:
            if c in offered:
                found[c] = v2
    for c in CONTROLLERS:
        v1 = os.path.join(ROOT, c)
        if c not in found and os.path.exists(os.path.join(v1, "cgroup.procs")) \
                and not _is_v2(v1):
            found[c] = v1
    return found


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _field(text: str, key: str) -> int:
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key and v.strip().isdigit():
            return int(v)
    return 0


class Group:
    """An agent's groups: `create` with its limits, `join_files` for its programs,
    `counters` to learn which limit bit, `kill` to end them all, `remove`."""

    def __init__(self, instance: str, name: str) -> None:
        self.where = hierarchies()
        self.dirs = {}  # hierarchy root -> this group's directory in it
        for root in set(self.where.values()):
            self.dirs[root] = os.path.join(root, f"fs9-{instance}", name)
        self.missing = [c for c in CONTROLLERS if c not in self.where]

    def _dir(self, controller: str) -> str | None:
        root = self.where.get(controller)
        return self.dirs.get(root) if root else None

    def create(self, memory: int, pids: int, cpu_weight: int) -> None:
        """Make the groups (parents too) and set the limits. OSError if it cannot."""
        for root, path in self.dirs.items():
            parent = os.path.dirname(path)
            if not os.path.isdir(parent):
                os.makedirs(parent, exist_ok=True)
            wanted = [c for c in CONTROLLERS if self.where.get(c) == root and _is_v2(root)]
            for d in (root, parent) if wanted else ():
                try:  # v2: a controller reaches a group only through its parents
                    _write(os.path.join(d, "cgroup.subtree_control"),
                           " ".join(f"+{c}" for c in wanted))
                except OSError:
                    pass  # the root's may be managed by systemd, and set already
            os.makedirs(path, exist_ok=True)
        self.set_cpu_weight(cpu_weight)
        mem = self._dir("memory")
        if mem:
            if _is_v2(self.where["memory"]):
                _write(os.path.join(mem, "memory.max"), str(memory))
                if os.path.exists(os.path.join(mem, "memory.swap.max")):
                    _write(os.path.join(mem, "memory.swap.max"), "0")
            else:
                _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory))
                memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
                if os.path.exists(memsw):
                    _write(memsw, str(memory))
        pid_dir = self._dir("pids")
        if pid_dir:
            _write(os.path.join(pid_dir, "pids.max"), str(pids))

    def set_cpu_weight(self, weight: int) -> None:
        cpu = self._dir("cpu")
        if not cpu:
            return
        if _is_v2(self.where["cpu"]):
            _write(os.path.join(cpu, "cpu.weight"), str(max(1, min(10000, weight))))
        else:
            _write(os.path.join(cpu, "cpu.shares"), str(max(2, weight * 1024 // 100)))

    def join_files(self) -> list[str]:
        """The cgroup.procs files a program writes "0" to (itself) to enter its groups."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def counters(self) -> dict[str, int]:
        """How often each limit bit: {"oom_kill": N, "pids_max": N}."""
        out = {"oom_kill": 0, "pids_max": 0}
        mem = self._dir("memory")
        if mem:
            name = "memory.events" if _is_v2(self.where["memory"]) else "memory.oom_control"
            out["oom_kill"] = _field(_read(os.path.join(mem, name)), "oom_kill")
        pid_dir = self._dir("pids")
        if pid_dir:
            out["pids_max"] = _field(_read(os.path.join(pid_dir, "pids.events")), "max")
        return out

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs.values():
            found |= {int(p) for p in _read(os.path.join(d, "cgroup.procs")).split()}
        return found

    def kill(self, within_s: float = 5.0) -> bool:
        """End every process of the groups; whether none is left within within_s."""
        kill_file = os.path.join(self.dirs.get(self.where.get("kill", ""), ""), "cgroup.kill")
        deadline = time.monotonic() + within_s
        while True:
            left = self.pids()
            if not left:
                return True
            if os.path.exists(kill_file):
                try:
                    _write(kill_file, "1")
                except OSError:
                    pass
            for pid in left:  # v1 only, or a kill file that failed: one by one
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def remove_empty(self) -> bool:
        """Remove the groups if nothing is in them (rmdir refuses a group with a process
        in it: EBUSY): whether they are gone. No wait, one system call a group: many are
        removed in one go (kernel/agents/endings.py); else `remove`, which waits."""
        for d in self.dirs.values():
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:  # EBUSY: a process still leaving it
                return False
        return True

    def remove(self) -> None:
        """Kill what is left, then remove the groups (the parent stays: shared)."""
        self.kill()
        # a group empties a moment after its last process died: a moment that a loaded
        # machine stretches, so the bound is one of time, not of tries
        deadline = time.monotonic() + REMOVE_S
        for d in self.dirs.values():
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
