"""fs9 spawn speed: from `echo 'spawn NAME def=D' > ctl` to the first task's output at EOF
(issue 25 item 1), each figure beside a same-run baseline.

    .venv/bin/python bench/spawnspeed.py            (about 20 s)
    .venv/bin/python bench/spawnspeed.py --quick    (smoke run, rough figures)
    .venv/bin/python bench/spawnspeed.py --strict   (exit 1 when a target is missed)
    .venv/bin/python bench/spawnspeed.py --vs /work/main   (before/after: confined spawns
        of this tree's fs9 and of another tree's, with its own .venv, round by round;
        add --pooled for both mounted with --sandbox-pool 2)

Needs root (confined agents). Mounts fs9 for real (bench/foundation.py's Fs9Mount) in a
temporary directory agents' uids can walk (foundation.traversable), defines D (`cmd =
["cat"]`), then times, for a fresh agent each time: the `spawn NAME def=D` write to the root ctl, `run x` to its ctl,
and its `out` opened and read to EOF (b"x\\n"). Four kinds, interleaved round by round:

  pooled      D as defined, confined, on a second fs9 mounted with `--sandbox-pool 2`
              (sandboxes made ahead: kernel/agents/pool.py), each spawn once the pool
              is full again (spawns apart, as an operator's or a script's are);
  confined    D as defined, on the first fs9 (no pool, the default): its own mount
              namespace and view, uid, Landlock, seccomp, network and IPC namespaces,
              control group (limits);
  unconfined  `spawn NAME def=D unconfined=true`;
  bare        the same program with no fs9: fork+exec `cat`, write b"x\\n", read to EOF.

Then the pooled kind back to back (a burst: each spawn as soon as the one before gave its
output; the pool, one sandbox made at a time, runs dry), for what a burst gets.

Then two costs alone, for where the time goes: moving a process into its control groups
(every confined program does; the first write waits for an RCU grace period of the
kernel's cgroup migration lock) and a Python interpreter starting with the sandbox's
imports (what each sandbox paid before the fork server).

Agents are killed after their round's samples (outside the timing). `spawn_to_output(fs, ...)` is
the measuring function; bench/scale.py imports it. The peers' figures are theirs, measured
elsewhere on other machines: printed for scale, never as a same-run ratio.
"""
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (Fs9Mount, cannot_run, finish, guard_signals, pct,  # noqa: E402
                        read_to_eof, row, table, traversable, unmount_all)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "spawnspeed.json"
DEFINITION = "spawnd"
WATCHDOG_S = 300
# published elsewhere (issue 25): name, p50 ms, what it is
PEERS = (("rivet agentOS (in-process kernel, WASM), session start", 4.8),
         ("sandlock (Landlock + seccomp from Python), sandbox start", 1.0),
         ("E2B (Firecracker microVM), sandbox start", 440.0))
TARGET_P50_MS, TARGET_P99_MS = 5.0, 10.0
POOL = 2  # the pooled fs9's --sandbox-pool


def define(fs: Fs9Mount, name: str = DEFINITION) -> str:
    """The definition the confined spawns use: `cat`, confined (the default)."""
    folder = fs.agents / name
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)
    (folder / "agent.toml").write_text('cmd = ["cat"]\n')
    return name


def one_spawn(mnt: Path, name: str, definition: str, extra: str = "") -> float:
    """ms from the spawn write until the first task's out is read to EOF."""
    t0 = time.perf_counter_ns()
    fd = os.open(mnt / "ctl", os.O_WRONLY)
    try:
        os.write(fd, f"spawn {name} def={definition}{extra}\n".encode())
    finally:
        os.close(fd)
    fd = os.open(mnt / "agents" / name / "ctl", os.O_WRONLY)
    try:
        os.write(fd, b"run x\n")
    finally:
        os.close(fd)
    data = read_to_eof(mnt / "agents" / name / "out")
    t1 = time.perf_counter_ns()
    if data != b"x\n":
        err = (mnt / "agents" / name / "err").read_bytes()
        raise RuntimeError(f"{name}: out gave {data!r}; err: {err!r}")
    return (t1 - t0) / 1e6


def bare_fork_exec() -> float:
    """ms for the same program without fs9: fork+exec cat, feed it, read to EOF."""
    t0 = time.perf_counter_ns()
    r = subprocess.run(["cat"], input=b"x\n", capture_output=True)
    t1 = time.perf_counter_ns()
    if r.stdout != b"x\n":
        raise RuntimeError(f"cat gave {r.stdout!r}")
    return (t1 - t0) / 1e6


def cgroup_attach() -> float:
    """ms to move a fresh process into a fresh control group of each hierarchy fs9
    uses (what every confined program does before it drops root): the first write
    waits for the kernel's cgroup migration lock (an RCU grace period, unless a
    cgroup2 root is mounted with favordynmods)."""
    from fs9.drivers import cgroups
    group = cgroups.Group("spawnspeed", f"probe{os.getpid()}")
    group.create(64 << 20, 16, 100)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.read(r, 1)
        os._exit(0)
    try:
        t0 = time.perf_counter_ns()
        for procs in group.join_files():
            with open(procs, "w") as f:
                f.write(str(pid))
        return (time.perf_counter_ns() - t0) / 1e6
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
        group.remove()


def interpreter_start() -> float:
    """ms for a Python interpreter to start and import the sandbox's code: what each
    sandbox paid before the fork server."""
    t0 = time.perf_counter_ns()
    subprocess.run([sys.executable, "-c", "import fs9.drivers.zygote"], check=True,
                   cwd=HERE.parent)
    return (time.perf_counter_ns() - t0) / 1e6


def where_it_goes(n: int) -> dict:
    """Two costs measured alone, in the same run: {name: {n, p50_ms}}."""
    out = {}
    for name, fn in (("cgroup_attach", cgroup_attach), ("interpreter_start", interpreter_start)):
        ms = []
        for _ in range(n):
            ms.append(fn())
            time.sleep(0.05)  # apart, as spawns are: each attach pays its own wait
        out[name] = {"n": n, "p50_ms": statistics.median(ms), "p90_ms": pct(ms, 90)}
    return out


def kill_all(mnt: Path, names: list[str], settle_s: float = 0.2) -> None:
    """Kill agents (untimed) and let their teardown (sandbox, control group, scratch)
    finish before the next samples: a spawn is measured, not the kills before it."""
    with open(mnt / "ctl", "w") as f:
        f.write("".join(f"kill {n}\n" for n in names))
    deadline = time.monotonic() + 30
    while any((mnt / "agents" / n).exists() for n in names) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(settle_s)


def sandboxes(fs: Fs9Mount) -> int:
    """How many sandboxes fs's fork server has (its agents' and those made ahead)."""
    def children(parent: int, mark: bytes = b"") -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) != parent:
                        continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if mark in f.read():
                        found.append(int(entry))
            except (OSError, ValueError):
                pass
        return found
    servers = children(fs.pid, b"fs9.drivers.forkserver")
    return len(children(servers[0])) if servers else 0


def pool_full(fs: Fs9Mount, live: int, timeout_s: float = 10.0) -> None:
    """Wait (untimed) until the pooled fs9 has its POOL sandboxes made ahead beside the
    `live` agents' own."""
    deadline = time.monotonic() + timeout_s
    while sandboxes(fs) < live + POOL:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool was not full within {timeout_s:g} s")
        time.sleep(0.005)


def spawn_to_output(fs: Fs9Mount, rounds: int = 10, per_round: int = 10,
                    prefix: str = "sp", kinds=("confined", "unconfined", "bare"),
                    raw: bool = False, pooled: Fs9Mount | None = None,
                    paced: bool = True) -> dict:
    """Spawn-to-output samples (ms) of each kind, interleaved round by round: per round
    and kind, `per_round` fresh agents, each timed from its spawn write to its first
    task's out at EOF, then all killed (untimed):
    {kind: {n, p50_ms, p90_ms, p99_ms, min_ms, max_ms}} (raw: {kind: [ms...]}). Blocks;
    raises RuntimeError if an agent's output is wrong. The "pooled" kind spawns on
    `pooled` (an fs9 mounted with --sandbox-pool POOL), each once the pool is full
    again if `paced`."""
    definition = define(fs)
    if pooled is not None:
        define(pooled)
    extra = {"confined": "", "unconfined": " unconfined=true", "pooled": ""}
    ms: dict[str, list[float]] = {k: [] for k in kinds}
    serial = 0
    for i in range(rounds):
        for kind in (kinds if i % 2 == 0 else kinds[::-1]):
            if kind == "bare":
                ms[kind] += [bare_fork_exec() for _ in range(per_round)]
                continue
            on = pooled if kind == "pooled" else fs
            names = []
            for _ in range(per_round):
                serial += 1
                names.append(f"{prefix}{kind[0]}{serial}")
                if kind == "pooled" and paced:
                    pool_full(on, len(names) - 1)
                ms[kind].append(one_spawn(on.path, names[-1], definition, extra[kind]))
            kill_all(on.path, names)
    if raw:
        return ms
    return {k: {"n": len(v), "p50_ms": statistics.median(v), "p90_ms": pct(v, 90),
                "p99_ms": pct(v, 99), "min_ms": min(v), "max_ms": max(v)}
            for k, v in ms.items()}


def rows_of(s: dict) -> list[dict]:
    """The table: each fs9 figure beside the bare fork+exec of the same run."""
    p, c, u, b = s["pooled"], s["confined"], s["unconfined"], s["bare"]
    return [
        row(f"spawn to output p50, confined, --sandbox-pool {POOL} (vs bare fork+exec)",
            p["p50_ms"], b["p50_ms"], "ms", f"<= {TARGET_P50_MS:g} ms",
            p["p50_ms"] <= TARGET_P50_MS, "{:.2f}"),
        row(f"spawn to output p99, confined, --sandbox-pool {POOL} (vs bare fork+exec)",
            p["p99_ms"], b["p99_ms"], "ms", f"<= {TARGET_P99_MS:g} ms",
            p["p99_ms"] <= TARGET_P99_MS, "{:.2f}"),
        row(f"spawn to output p50, confined, --sandbox-pool {POOL} vs none", p["p50_ms"],
            c["p50_ms"], "ms", fmt="{:.2f}"),
        row(f"spawn to output p99, confined, --sandbox-pool {POOL} vs none", p["p99_ms"],
            c["p99_ms"], "ms", fmt="{:.2f}"),
        row("spawn to output p50, confined, no pool (vs bare fork+exec)", c["p50_ms"],
            b["p50_ms"], "ms", fmt="{:.2f}"),
        row("spawn to output p99, confined, no pool (vs bare fork+exec)", c["p99_ms"],
            b["p99_ms"], "ms", fmt="{:.2f}"),
        row("spawn to output p50, unconfined (vs bare fork+exec)", u["p50_ms"], b["p50_ms"],
            "ms", fmt="{:.2f}"),
        row("spawn to output p99, unconfined (vs bare fork+exec)", u["p99_ms"], b["p99_ms"],
            "ms", fmt="{:.2f}"),
        row("spawn to output p50, confined vs unconfined", c["p50_ms"], u["p50_ms"], "ms",
            fmt="{:.2f}"),
    ]


def versus(other: Path, rounds: int, per_round: int, pool: int = 0) -> int:
    """Confined spawn-to-output of this tree's fs9 and of `other`'s (a git worktree with
    its own .venv: main's, say), both mounted, a round of each in turn, so that both
    meet the same load. Prints p50/p99 of each and their ratio. `pool`: both mounted
    with `--sandbox-pool` that many, each spawn once the pool is full again."""
    mounts, tmps = {}, []
    for label, tree in (("this tree", None), (str(other), other)):
        tmp, fs = traversable("fs9-spawnspeed-vs-")
        tmps.append(tmp)
        if tree is not None:
            fs.py, fs.repo = str(tree / ".venv" / "bin" / "python"), tree
        fs.mount_args = ["--sandbox-pool", str(pool)]
        mounts[label] = fs
    ms: dict[str, list[float]] = {label: [] for label in mounts}
    try:
        for fs in mounts.values():
            fs.mount()
        signal.alarm(WATCHDOG_S)
        for i in range(rounds):
            for label in (list(mounts) if i % 2 == 0 else list(mounts)[::-1]):
                kind = "pooled" if pool else "confined"
                s = spawn_to_output(mounts[label], rounds=1, per_round=per_round,
                                    prefix=f"r{i}", kinds=(kind,), raw=True,
                                    pooled=mounts[label] if pool else None)
                ms[label] += s[kind]
        signal.alarm(0)
    finally:
        for tmp, fs in zip(tmps, mounts.values()):
            unmount_all(tmp, [fs], "spawnspeed")
    (a, b) = mounts
    pa, pb = statistics.median(ms[a]), statistics.median(ms[b])
    print(f"confined spawn to output{f', --sandbox-pool {pool}' if pool else ''}, "
          f"{len(ms[a])} spawns each, rounds of {per_round} "
          f"alternating: {a} p50 {pa:.2f} ms p99 {pct(ms[a], 99):.2f} ms; {b} p50 {pb:.2f} "
          f"ms p99 {pct(ms[b], 99):.2f} ms; p50 ratio {pa / pb:.2f}x, p99 ratio "
          f"{pct(ms[a], 99) / pct(ms[b], 99):.2f}x")
    load = os.getloadavg()
    print(f"(on {os.cpu_count()} cpus, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    return 0


def main() -> int:
    why = cannot_run("spawnspeed", root="confined agents need root")
    if why:
        print(why, file=sys.stderr)
        return 0
    quick = "--quick" in sys.argv
    if "--vs" in sys.argv:
        guard_signals(WATCHDOG_S)
        pool = POOL if "--pooled" in sys.argv else 0
        return versus(Path(sys.argv[sys.argv.index("--vs") + 1]).resolve(),
                      rounds=4 if quick else 10, per_round=5 if quick else 10, pool=pool)
    guard_signals(WATCHDOG_S)
    started = time.monotonic()
    tmp, fs = traversable("fs9-spawnspeed-")  # agents' uids must reach it
    pooled_tmp, pooled = traversable("fs9-spawnspeed-pooled-")
    pooled.mount_args = ["--sandbox-pool", str(POOL)]
    rounds, per_round = (4, 5) if quick else (10, 10)
    try:
        fs.mount()
        pooled.mount()
        signal.alarm(WATCHDOG_S)
        s = spawn_to_output(fs, rounds=rounds, per_round=per_round, pooled=pooled,
                            kinds=("pooled", "confined", "unconfined", "bare"))
        burst = spawn_to_output(fs, rounds=2, per_round=per_round, pooled=pooled,
                                kinds=("pooled",), paced=False, prefix="burst")["pooled"]
        parts = where_it_goes(5 if quick else 20)
        signal.alarm(0)
    finally:
        unmount_all(tmp, [fs], "spawnspeed")
        unmount_all(pooled_tmp, [pooled], "spawnspeed")
    p, c, u, b = s["pooled"], s["confined"], s["unconfined"], s["bare"]
    rows = rows_of(s)
    print(table(rows))
    print(f"where a confined spawn's time goes, measured alone: moving a process into its "
          f"control groups p50 {parts['cgroup_attach']['p50_ms']:.2f} ms (once per program "
          f"started); a Python interpreter with the sandbox's imports p50 "
          f"{parts['interpreter_start']['p50_ms']:.2f} ms (once per sandbox before the fork "
          "server; not paid now)")
    print(f"the pooled fs9 back to back ({burst['n']} spawns, each as soon as the one "
          f"before gave its output: the pool runs dry): p50 {burst['p50_ms']:.2f} ms, p99 "
          f"{burst['p99_ms']:.2f} ms")
    print(f"ratios p50: confined, pooled {p['p50_ms'] / b['p50_ms']:.2f}x bare fork+exec, "
          f"no pool {c['p50_ms'] / b['p50_ms']:.2f}x, "
          f"unconfined {u['p50_ms'] / b['p50_ms']:.2f}x, confined {c['p50_ms'] / u['p50_ms']:.2f}x "
          "unconfined")
    print("peers (published figures, measured elsewhere on other machines; not this run):")
    for peer, p50 in PEERS:
        print(f"  {peer}: {p50:g} ms p50  (fs9 confined, pooled, here: "
              f"{p['p50_ms'] / p50:.2f}x)")
    load = os.getloadavg()
    elapsed = time.monotonic() - started
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {c['n']} fresh agents per kind, "
          "each killed after its sample)")
    return finish(RESULTS, rows, {"spawn_to_output": s, "pooled_burst": burst, "parts": parts,
                                  "peers_p50_ms": dict(PEERS)}, elapsed,
                  loadavg=load)


if __name__ == "__main__":
    sys.exit(main())
