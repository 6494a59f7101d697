"""fs9 views benchmark: what confinement costs, each figure beside a baseline measured in the same run.

    .venv/bin/python bench/views.py           (about 10 s)
    .venv/bin/python bench/views.py --quick   (smoke run, rough figures)
    .venv/bin/python bench/views.py --strict  (exit 1 when a target is missed)

Needs root (confined agents run in a private mount namespace, as their own uids,
under Landlock) and /usr/bin/python3 (the venv's python is not reachable from a
sandbox). Mounts fs9 for real (bench/foundation.py's Fs9Mount) in a temporary
directory made traversable (0711) so the agents' uids can reach the mount point
and their program folders, then measures:

1. confinement's cost per task: bench/foundation.py's task round trip (write
   `run x` to a running `cmd = ["cat"]` agent's ctl, open its `out` and read to
   EOF) for a confined agent against the same agent spawned with
   `unconfined=true`, after a warm-up (the sandbox starts on first use).
   Blocks of round trips alternate between the two, round by round.
   Also the one-time start: from the `spawn` write until the first task's `out`
   reached EOF, a fresh agent each time, confined and unconfined interleaved
   (each then killed).
2. file operations inside a view against the operator on the full mount. A
   timing program (/usr/bin/python3, written into the agent's folder as
   timeops.py) runs AS THE CONFINED AGENT'S TASK: in its sandbox, as its uid,
   under Landlock, with the view bound over the mount point. It times N
   iterations each of stat, open+read+close and listdir on $FS9_MNT/agents/NAME
   paths and reports every sample. The baseline runs the same program with the
   same /usr/bin/python3 as root on the full mount, on the same files (the
   operator's paths). A third run, as root on the operator's
   MNT/agents/NAME/view/... paths, separates the server's view resolution from
   what the sandbox itself adds (Landlock, the bind mount, the other uid).
   Runs are interleaved round by round; each figure is the median of all samples.

Prints a table and writes bench/results/views.json. The mount is always
unmounted at the end (fusermount3 -u -z as a fallback).
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (Fs9Mount, cannot_run, finish, fs9_round_trip, guard_signals, pct,  # noqa: E402
                        read_to_eof, row, table, unmount_all)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "views.json"
SYS_PY = "/usr/bin/python3"  # reachable by agents' uids (under /usr, Landlock's read list)

TRIP_ROUNDS, TRIP_PER_ROUND, TRIP_WARM = 7, 60, 10
STARTS = 5  # fresh agents per kind for the one-time start
OPS_ROUNDS, OPS_N = 9, 300  # timing-program runs per kind; iterations of each op per run
WATCHDOG_S = 120
AGENT = "vbench"  # the agent whose view part 2 measures

RUN = b"run x\n"

# The timing program: JSON on stdin {"base", "agent", "n"}; JSON on stdout.
TIMEOPS = r'''
import json, os, sys, time

cfg = json.loads(sys.stdin.read())
base = cfg.get("base") or os.environ["FS9_MNT"]
folder = os.path.join(base, "agents", cfg["agent"])
small = os.path.join(folder, "manifest")
n = cfg["n"]
clock = time.perf_counter_ns


def read_all(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        return data
    finally:
        os.close(fd)


ops = {
    "stat": lambda: os.stat(small),
    "read": lambda: read_all(small),
    "listdir": lambda: os.listdir(folder),
}
out = {"uid": os.getuid(), "base": base,
       "sees_root_ctl": os.path.exists(os.path.join(base, "ctl")),
       "manifest_bytes": len(read_all(small)), "listing": sorted(os.listdir(folder)),
       "us": {}}
for name, op in ops.items():
    for _ in range(20):  # warm up: lookups cached, code paths hot
        op()
    samples = []
    for _ in range(n):
        t0 = clock()
        op()
        samples.append((clock() - t0) / 1000)
    out["us"][name] = samples
sys.stdout.write(json.dumps(out))
'''

OPS = ("stat", "read", "listdir")
OP_TEXT = {"stat": "stat agents/N/manifest", "read": "open+read+close agents/N/manifest",
           "listdir": "listdir agents/N/"}


# --- part 1: round trips and sandbox start ---------------------------------------------

def text(fs: Fs9Mount, rel: str) -> str:
    return (fs.path / rel).read_text()


def figure_trip(fs: Fs9Mount) -> dict:
    fs.ctl("ctl", "spawn rc cmd=cat\n")
    fs.ctl("ctl", "spawn ru cmd=cat unconfined=true\n")
    agents = {"confined": "rc", "unconfined": "ru"}
    fds = {k: os.open(fs.path / "agents" / a / "ctl", os.O_WRONLY) for k, a in agents.items()}
    outs = {k: fs.path / "agents" / a / "out" for k, a in agents.items()}
    ms: dict[str, list[float]] = {k: [] for k in agents}
    try:
        for k in agents:  # warm up: the confined agent's sandbox starts here
            for _ in range(TRIP_WARM):
                fs9_round_trip(fds[k], outs[k])
        for i in range(TRIP_ROUNDS):
            for k in (agents if i % 2 == 0 else list(agents)[::-1]):
                for _ in range(TRIP_PER_ROUND):
                    ms[k].append(fs9_round_trip(fds[k], outs[k]))
    finally:
        for fd in fds.values():
            os.close(fd)
    status = text(fs, "agents/rc/status")
    for a in agents.values():
        fs.ctl("ctl", f"kill {a}\n")  # a killed agent's scratch folder is removed
    out = {k: {"n": len(v), "p50_ms": pct(v, 50), "p90_ms": pct(v, 90), "p99_ms": pct(v, 99),
               "round_p50s_ms": [statistics.median(v[j:j + TRIP_PER_ROUND])
                                 for j in range(0, len(v), TRIP_PER_ROUND)]}
           for k, v in ms.items()}
    out["confined_status"] = status
    return out


def figure_start(fs: Fs9Mount) -> dict:
    """From the spawn write until the first task's out reaches EOF, fresh agents."""
    ms: dict[str, list[float]] = {"confined": [], "unconfined": []}
    for i in range(STARTS):
        kinds = [("confined", ""), ("unconfined", " unconfined=true")]
        for kind, extra in (kinds if i % 2 == 0 else kinds[::-1]):
            name = f"s{kind[0]}{i}"
            t0 = time.perf_counter_ns()
            fs.ctl("ctl", f"spawn {name} cmd=cat{extra}\n")
            fs.ctl(f"agents/{name}/ctl", "run x\n")
            data = read_to_eof(fs.path / "agents" / name / "out")
            t1 = time.perf_counter_ns()
            if data != b"x\n":
                raise RuntimeError(f"{name}: out gave {data!r}; err: "
                                   f"{text(fs, f'agents/{name}/err')!r}")
            ms[kind].append((t1 - t0) / 1e6)
            fs.ctl("ctl", f"kill {name}\n")
    return {k: {"n": len(v), "p50_ms": statistics.median(v), "min_ms": min(v),
                "max_ms": max(v), "all_ms": v} for k, v in ms.items()}


# --- part 2: file operations inside a view -----------------------------------------------

def define_agent(fs: Fs9Mount) -> Path:
    folder = fs.agents / AGENT
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)
    (folder / "timeops.py").write_text(TIMEOPS)
    (folder / "timeops.py").chmod(0o644)
    (folder / "agent.toml").write_text(f'cmd = ["{SYS_PY}", "timeops.py"]\ntimeout_s = 60\n')
    fs.ctl("ctl", f"spawn {AGENT}\n")
    return folder / "timeops.py"


def run_in_view(fs: Fs9Mount, n: int) -> dict:
    """The timing program as the confined agent's task: in through `in`, out via `out`."""
    before = set(os.listdir(fs.path / "agents" / AGENT / "tasks"))
    with open(fs.path / "agents" / AGENT / "in", "w") as f:
        f.write(json.dumps({"agent": AGENT, "n": n}))
    new = sorted(set(os.listdir(fs.path / "agents" / AGENT / "tasks")) - before, key=int)
    if len(new) != 1:
        raise RuntimeError(f"expected one new task, saw {new}")
    task = fs.path / "agents" / AGENT / "tasks" / new[0]
    data = read_to_eof(task / "out")
    try:
        return json.loads(data)
    except ValueError:
        raise RuntimeError(f"timing program in the view failed: out {data[:300]!r}; err "
                           f"{read_to_eof(task / 'err')[:2000]!r}; "
                           f"status {(task / 'status').read_text()!r}")


def run_as_operator(script: Path, base: Path, n: int) -> dict:
    r = subprocess.run([SYS_PY, str(script)], input=json.dumps(
        {"base": str(base), "agent": AGENT, "n": n}).encode(), capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"timing program as operator failed: {r.stderr.decode()[-2000:]}")
    return json.loads(r.stdout)


def figure_ops(fs: Fs9Mount) -> dict:
    script = define_agent(fs)
    runs = {
        "view": lambda n: run_in_view(fs, n),  # the confined agent, in its sandbox
        "operator": lambda n: run_as_operator(script, fs.path, n),  # root, full mount
        "operator_via_view": lambda n: run_as_operator(  # root, MNT/agents/A/view/...
            script, fs.path / "agents" / AGENT / "view", n),
    }
    for run in runs.values():  # warm up (the sandbox starts on the first task)
        run(20)
    samples = {k: {op: [] for op in OPS} for k in runs}
    seen: dict[str, dict] = {}
    for i in range(OPS_ROUNDS):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for k in order:
            res = runs[k](OPS_N)
            seen[k] = {x: res[x] for x in ("uid", "base", "sees_root_ctl", "manifest_bytes",
                                           "listing")}
            for op in OPS:
                samples[k][op] += res["us"][op]
    # it really ran in the sandbox: another uid, and the root's ctl is not in its world
    if seen["view"]["uid"] == 0 or seen["view"]["sees_root_ctl"]:
        raise RuntimeError(f"the in-view run was not confined: {seen['view']}")
    if seen["operator"]["manifest_bytes"] != seen["view"]["manifest_bytes"]:
        raise RuntimeError(f"not the same file: {seen}")
    fs.ctl("ctl", f"kill {AGENT}\n")
    out = {"who": seen, "n_per_op": len(samples["view"]["stat"])}
    for k, per_op in samples.items():
        out[k] = {op: {"p50_us": pct(v, 50), "p90_us": pct(v, 90), "p99_us": pct(v, 99),
                       "round_p50s_us": [statistics.median(v[j:j + OPS_N])
                                         for j in range(0, len(v), OPS_N)]}
                  for op, v in per_op.items()}
    return out


# --- report ---------------------------------------------------------------------------

def rows_of(t: dict, s: dict, o: dict) -> list[dict]:
    c, u = t["confined"], t["unconfined"]
    rows = [
        row("1. task round trip p50 (confined vs unconfined)", c["p50_ms"], u["p50_ms"], "ms",
            "<= +10 ms", c["p50_ms"] - u["p50_ms"] <= 10),
        row("   task round trip p99 (confined vs unconfined)", c["p99_ms"], u["p99_ms"], "ms"),
        row("   sandbox start: spawn to first task done, p50", s["confined"]["p50_ms"],
            s["unconfined"]["p50_ms"], "ms", fmt="{:.1f}"),
    ]
    for i, op in enumerate(OPS):
        v, b = o["view"][op], o["operator"][op]
        n = "2. " if i == 0 else "   "
        rows.append(row(f"{n}{OP_TEXT[op]} p50 (view vs operator)", v["p50_us"], b["p50_us"],
                        "us", "<= 1.20x", v["p50_us"] <= 1.2 * b["p50_us"], fmt="{:.1f}"))
    for op in OPS:
        v, b = o["view"][op], o["operator"][op]
        rows.append(row(f"   {OP_TEXT[op]} p90 (view vs operator)", v["p90_us"], b["p90_us"],
                        "us", fmt="{:.1f}"))
    for op in OPS:
        v, b = o["no_audit"]["view"][op], o["no_audit"]["operator"][op]
        rows.append(row(f"   {OP_TEXT[op]} p50, --no-kernel-audit (view vs operator)",
                        v["p50_us"], b["p50_us"], "us", fmt="{:.1f}"))
    for op in OPS:
        vv, b = o["operator_via_view"][op], o["operator"][op]
        rows.append(row(f"   {op} p50, root via agents/N/view/ (vs operator)", vv["p50_us"],
                        b["p50_us"], "us", fmt="{:.1f}"))
    return rows


def main() -> int:
    why = cannot_run("views", root="confinement", program=SYS_PY)
    if why:
        print(why, file=sys.stderr)
        return 2

    guard_signals(WATCHDOG_S)

    global TRIP_ROUNDS, TRIP_PER_ROUND, STARTS, OPS_ROUNDS, OPS_N
    if "--quick" in sys.argv[1:]:
        TRIP_ROUNDS, TRIP_PER_ROUND, STARTS, OPS_ROUNDS, OPS_N = 1, 30, 2, 1, 100
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fs9-views-"))
    tmp.chmod(0o711)  # agents' uids walk through it to the mount point and their folders
    fs = Fs9Mount(tmp)
    fs.agents.chmod(0o755)
    try:
        fs.mount()
        signal.alarm(WATCHDOG_S)
        print("1/3 task round trip, confined vs unconfined ...", file=sys.stderr, flush=True)
        t = figure_trip(fs)
        signal.alarm(WATCHDOG_S)
        print(f"2/3 sandbox start ... ({time.monotonic() - started:.0f} s)", file=sys.stderr,
              flush=True)
        s = figure_start(fs)
        signal.alarm(WATCHDOG_S * 2)
        print(f"3/3 file operations in a view ... ({time.monotonic() - started:.0f} s)",
              file=sys.stderr, flush=True)
        o = figure_ops(fs)
        signal.alarm(0)
        # the same file operations with the kernel-audit witness off: what watching costs
        fs.umount()
        print(f"   ... and with --no-kernel-audit ({time.monotonic() - started:.0f} s)",
              file=sys.stderr, flush=True)
        fs.mount_args = ["--no-kernel-audit"]
        fs.mount()
        signal.alarm(WATCHDOG_S * 2)
        o["no_audit"] = figure_ops(fs)
        signal.alarm(0)
    finally:
        signal.alarm(0)
        unmount_all(tmp, [fs], "views")

    rows = rows_of(t, s, o)
    print(table(rows))
    elapsed = time.monotonic() - started
    added = t["confined"]["p50_ms"] - t["unconfined"]["p50_ms"]
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus; confinement adds {added:+.3f} ms "
          f"a round trip at p50 ({t['confined']['n']} round trips each, interleaved); "
          f"sandbox start: median of {STARTS} fresh agents each; file ops: percentiles of "
          f"{o['n_per_op']} samples an op, {OPS_ROUNDS} runs interleaved; in-view run as uid "
          f"{o['who']['view']['uid']})")
    return finish(RESULTS, rows, {"round_trip": t, "sandbox_start": s, "file_ops": o},
                  elapsed)


if __name__ == "__main__":
    sys.exit(main())
