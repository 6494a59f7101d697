"""fs9 QoS benchmark: an interactive agent's task latency while background agents burn
both cores, against the same agent on an idle machine, in the same run.

    .venv/bin/python bench/qos.py           (about 40 s)
    .venv/bin/python bench/qos.py --quick   (smoke run, rough figures)

Needs root (confined agents). Mounts fs9 (bench/foundation.py's Fs9Mount), spawns a
confined `cmd = ["cat"]` agent with `priority = "interactive"` and measures the task
round trip (write `run x` to its ctl, read its `out` to EOF: foundation's
fs9_round_trip), in blocks that alternate: idle, then with two confined agents of
`priority = "background"` each running a busy loop (one per core), round by round.
Their CPU share is their cgroup's weight (interactive 800, background 10) and nice.
Target: loaded p50 <= 1.5x idle p50. Writes bench/results/qos.json.
"""
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (Fs9Mount, cannot_run, finish, fs9_round_trip, guard_signals, pct,  # noqa: E402
                        row, table, traversable, unmount_all)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "qos.json"
ROUNDS, PER_ROUND, WARM = 5, 40, 10
BURNERS = 2
WATCHDOG_S = 300


def burning(fs: Fs9Mount, on: bool) -> None:
    """Start (a busy loop each, up to 10 minutes) or stop the background burners."""
    for i in range(BURNERS):
        fs.ctl(f"agents/burn{i}/ctl", "stop\n" if not on else "start\n")
        if on:
            fs.ctl(f"agents/burn{i}/in", "go\n")
    if on:  # until both burn: their loops are running
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [(fs.path / f"agents/burn{i}/status").read_text() for i in range(BURNERS)]
            if all("state=running" in s for s in states):
                return
            time.sleep(0.05)
        raise RuntimeError("the burners did not start")


def main() -> int:
    why = cannot_run("qos", root="confinement")
    if why:
        print(why, file=sys.stderr)
        return 2
    guard_signals(WATCHDOG_S)
    global ROUNDS, PER_ROUND
    if "--quick" in sys.argv[1:]:
        ROUNDS, PER_ROUND = 2, 15
    started = time.monotonic()
    tmp, fs = traversable("fs9-qos-")
    ms: dict[str, list[float]] = {"idle": [], "loaded": []}
    try:
        fs.mount()
        fs.ctl("ctl", "spawn quick cmd=cat priority=interactive\n")
        for i in range(BURNERS):
            fs.ctl("ctl", f"spawn burn{i} cmd=\"sh -c 'timeout 600 sh -c \\\"while :; do :; done\\\"'\""
                          " priority=background timeout_s=0\n")
        fd = os.open(fs.path / "agents/quick/ctl", os.O_WRONLY)
        out = fs.path / "agents/quick/out"
        try:
            for _ in range(WARM):
                fs9_round_trip(fd, out)
            for r in range(ROUNDS):
                for kind in (("idle", "loaded") if r % 2 == 0 else ("loaded", "idle")):
                    burning(fs, kind == "loaded")
                    for _ in range(PER_ROUND):
                        ms[kind].append(fs9_round_trip(fd, out))
            burning(fs, False)
        finally:
            os.close(fd)
    finally:
        unmount_all(tmp, [fs], "qos")
    idle, loaded = statistics.median(ms["idle"]), statistics.median(ms["loaded"])
    rows = [row("interactive task round trip p50, 2 background burners vs idle", loaded, idle,
                "ms", "<= 1.5x", loaded / idle <= 1.5),
            row("the same, p90", pct(ms["loaded"], 90), pct(ms["idle"], 90), "ms")]
    print(table(rows))
    elapsed = time.monotonic() - started
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus; {len(ms['idle'])} round trips each, "
          f"blocks alternating idle/loaded; loadavg {os.getloadavg()[0]:.1f})")
    return finish(RESULTS, rows, {"ms": ms}, elapsed)


if __name__ == "__main__":
    sys.exit(main())
