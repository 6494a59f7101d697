"""The operator's spawn while an agent spawns in a loop (issue 25's red-team leftover:
sandbox start places kept for the operator's agents, kernel/agents/starts.py).

    .venv/bin/python bench/starts.py            (about a minute)

Needs root. One real mount; a `spawner` agent (unconfined, pledge `spawn`, its view's
ctl writable) whose spawns the benchmark writes through its view, as the agent would:
daemons of a confined definition (`sleep`), each a sandbox to start. The figure: the
operator's confined spawn-to-output (bench/spawnspeed.py's `one_spawn`), p50 of fresh
agents, while the spawner's flood of starts is under way, beside the same with nothing
else starting, in alternating rounds. Before the start places were shared out, the
red team measured the flooded spawn 10x slower (a run of its own, not this one).
"""
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (Fs9Mount, cannot_run, guard_signals, traversable,  # noqa: E402
                        unmount_all)
from spawnspeed import define, kill_all, one_spawn  # noqa: E402

WATCHDOG_S = 600
FLOOD = 60  # daemons the spawner starts in a round (its share of live agents is 100)


def flood(fs: Fs9Mount, names: list[str], done: threading.Event) -> None:
    """The spawner's spawns, one write each through its view (so the kernel counts them
    as the agent's)."""
    for name in names:
        with open(fs.path / "agents/spawner/view/ctl", "w") as f:
            f.write(f"spawn {name} def=hog\n")
    done.set()


def main() -> int:
    why = cannot_run("starts", root="confined agents need root")
    if why:
        print(why, file=sys.stderr)
        return 0
    guard_signals(WATCHDOG_S)
    started = time.monotonic()
    tmp, fs = traversable("fs9-starts-")
    ms: dict[str, list[float]] = {"flooded": [], "quiet": []}
    try:
        fs.mount()
        signal.alarm(WATCHDOG_S)
        definition = define(fs)
        for name, toml in (("hog", 'mode = "daemon"\ncmd = ["sleep", "600"]\n'
                                   'restart = "temporary"\n'),
                           ("spawner", 'cmd = ["cat"]\nunconfined = true\n'
                                       'pledge = ["read", "spawn"]\nspawns = ["hog"]\n'
                                       '[unveil]\n"ctl" = "w"\n')):
            (fs.agents / name).mkdir()
            (fs.agents / name).chmod(0o755)
            (fs.agents / name / "agent.toml").write_text(toml)
        fs.ctl("ctl", "spawn spawner\n")
        serial = 0
        for i in range(6):
            for kind in (("flooded", "quiet") if i % 2 == 0 else ("quiet", "flooded")):
                hogs = [f"h{i}x{n}" for n in range(FLOOD)] if kind == "flooded" else []
                done = threading.Event()
                if hogs:
                    threading.Thread(target=flood, args=(fs, hogs, done), daemon=True).start()
                    time.sleep(0.2)  # (the flood under way: its starts hold their places)
                names = []
                for _ in range(3):
                    serial += 1
                    names.append(f"op{serial}")
                    ms[kind].append(one_spawn(fs.path, names[-1], definition))
                if hogs:
                    done.wait(120)
                kill_all(fs.path, names + hogs)
        signal.alarm(0)
    finally:
        unmount_all(tmp, [fs], "starts")
    flooded, quiet = statistics.median(ms["flooded"]), statistics.median(ms["quiet"])
    load = os.getloadavg()
    print(f"operator's confined spawn-to-output p50: {flooded:.1f} ms while an agent starts "
          f"{FLOOD} sandboxes, {quiet:.1f} ms with nothing else starting: {flooded / quiet:.2f}x "
          f"({len(ms['flooded'])} and {len(ms['quiet'])} samples, alternating rounds)")
    print(f"(ran {time.monotonic() - started:.0f} s on {os.cpu_count()} cpus, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
