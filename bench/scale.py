"""fs9 at scale (issue 25, items 2 and 3): each figure beside a same-run baseline.

    .venv/bin/python bench/scale.py          (1,000 live agents, 10,000 defined)
    .venv/bin/python bench/scale.py --quick  (100 and 1,000: a smoke run)

Needs root (agents are confined). Mounts fs9 for real (bench/foundation.py's Fs9Mount).

1. Live agents: N confined daemons (`sh` reading its mail/next with `cat`, each
   mail's body to its out, then `rm`), spawned 100 a write to the root ctl.
   - all spawned: from the first write until every one is blocked in read(2) on its
     mail/next, beside the same for one agent;
   - fs9's memory: the server's RSS at 0, 100 and N agents (per agent beyond its own
     processes, which are the sandbox's zygote, sh and cat);
   - `ls agents/` and `cat status` p50/p90 with N agents, beside with one;
   - a mail round trip (write mail/new, read the body back from out) to 20 agents
     spread over the N, p50, beside the same to the one agent on the one-agent mount;
   - the server's CPU over 10 s with the N agents blocked (idle agents cost nothing);
   - `halt` until no agent program is left, and unmount until nothing at all is (beside
     the one-agent mount's unmount); then nothing left behind: processes, uids,
     mounts, scratch folders, control groups (a failure if any).
2. Defined agents: M on-demand task agents (`start = "on-demand"`, `cat`): spawned,
   then the mount is mounted again: `fs9 mount --background` until ready, and the
   server's RSS, beside an empty state's; `ls agents/` and `status` with M; the first
   task of an asleep agent (its sandbox starts) beside the next one (awake).
Prints a table and writes bench/results/scale.json.
"""
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
from agentprocs import (ECHO, blocked_on_mail, left_behind, ours, rss_mib,  # noqa: E402
                        scratch_of)
from foundation import (Fs9Mount, cannot_run, finish, guard_signals, pct,  # noqa: E402
                        read_to_eof, row, table, unmount_all)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.json"


def zombie(pid: int) -> bool:
    """Whether pid has ended and waits for its reaper (or is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# --- measuring ---------------------------------------------------------------------

def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def spawn(fs: Fs9Mount, names: list[str], definition: str) -> None:
    for first in range(0, len(names), 100):
        fs.ctl("ctl", "".join(f"spawn {n} def={definition}\n" for n in names[first:first + 100]))


def wait(predicate, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return value


def all_blocked(fs: Fs9Mount, names: list[str], timeout: float = 900) -> float:
    """Spawn names (echo daemons); seconds until all are blocked on their mail."""
    t = time.monotonic()
    spawn(fs, names, "echo")
    wait(lambda: blocked_on_mail(ours(fs, programs_only=True)) >= len(names), timeout,
         f"{len(names)} daemons blocked on mail", every=0.5)  # (a look reads all of /proc)
    return time.monotonic() - t


def trips(fs: Fs9Mount, names: list[str], rounds: int) -> list[float]:
    """Mail round trips (ms), `rounds` to each of names in turn: a mail, until its body
    comes back on the agent's out (held open throughout: it streams the daemon's run)."""
    outs = {name: os.open(fs.path / f"agents/{name}/out", os.O_RDONLY) for name in names}
    took = []
    try:
        for i in range(rounds):
            for name in names:
                body = b"ping %d\n" % i
                t = time.perf_counter()
                w = os.open(fs.path / f"agents/{name}/mail/new", os.O_WRONLY)
                os.write(w, body)
                os.close(w)
                got = b""
                while not got.endswith(b"\n"):
                    got += os.read(outs[name], 4096)
                took.append((time.perf_counter() - t) * 1000)
                if got != body:
                    raise RuntimeError(f"{name} echoed {got!r}")
    finally:
        for fd in outs.values():
            os.close(fd)
    return took


def reads(fs: Fs9Mount, n: int) -> dict:
    ls = [ms(lambda: os.listdir(fs.path / "agents")) for _ in range(n)]
    st = [ms(lambda: read_to_eof(fs.path / "status")) for _ in range(n)]
    return {"ls_ms": ls, "status_ms": st}


def umount_s(fs: Fs9Mount) -> float:
    """Unmount, until the server and every agent process are gone. (A look for agent
    processes reads all of /proc, a tenth of a second of a CPU with a thousand agents:
    looked for every 0.25 s, and only once the server has ended, which it does after
    every sandbox; polled every 50 ms before, the looks took a share of the 2 CPUs from
    the unmount they timed.)"""
    t = time.monotonic()
    fs.umount()
    wait(lambda: zombie(fs.pid), 60, "the server to end", every=0.01)
    wait(lambda: not ours(fs), 60, "all gone", every=0.25)
    return time.monotonic() - t


def new_mount(tmp: Path, name: str, mounts: list) -> Fs9Mount:
    (tmp / name).mkdir()
    fs = Fs9Mount(tmp / name)
    (fs.agents / "echo").mkdir()
    (fs.agents / "echo/agent.toml").write_text('mode = "daemon"\ncmd = ["sh", "echo.sh"]\n')
    (fs.agents / "echo/echo.sh").write_text(ECHO)
    (fs.agents / "lazy").mkdir()
    (fs.agents / "lazy/agent.toml").write_text('start = "on-demand"\nidle_s = 600\ncmd = ["cat"]\n')
    mounts.append(fs)
    return fs


def figure_live(tmp: Path, n: int, mounts: list) -> dict:
    one = new_mount(tmp, "one", mounts)
    one.mount()
    r: dict = {"n": n, "one_spawn_s": all_blocked(one, ["solo"])}
    r["one_reads"] = reads(one, 20)
    r["one_trip_ms"] = trips(one, ["solo"], 20)
    r["one_umount_s"] = umount_s(one)

    fs = new_mount(tmp, "many", mounts)
    fs.mount()
    r["rss_mib"] = {0: rss_mib(fs.pid)}
    names = [f"e{i}" for i in range(n)]
    first = min(100, n)
    t = time.monotonic()
    all_blocked(fs, names[:first])
    r["rss_mib"][first] = rss_mib(fs.pid)
    all_blocked(fs, names[first:])
    r["spawn_s"] = time.monotonic() - t  # (100 first, then the rest, as one burst each)
    r["rss_mib"][n] = rss_mib(fs.pid)
    procs = ours(fs)
    r["processes"] = len(procs)
    r["reads"] = reads(fs, 20)
    picks = [names[i * (n - 1) // 19] for i in range(20)]
    r["trip_ms"] = trips(fs, picks, 3)
    before = cpu_s(fs.pid)
    time.sleep(10)
    r["idle_cpu_ms_per_s"] = (cpu_s(fs.pid) - before) * 100
    t = time.monotonic()
    fs.ctl("ctl", "halt\n")
    wait(lambda: not ours(fs, programs_only=True), 60, "halt to end every program",
         every=0.25)  # (umount_s: a look reads all of /proc)
    r["halt_s"] = time.monotonic() - t
    r["umount_s"] = umount_s(fs)
    r["left"] = left_behind(fs, set(procs.values()) - {0}, scratch_of(procs))
    return r


def figure_defined(tmp: Path, m: int, mounts: list) -> dict:
    empty = new_mount(tmp, "empty", mounts)
    t = time.monotonic()
    empty.mount(timeout=300)
    r: dict = {"m": m, "empty_mount_s": time.monotonic() - t, "empty_rss_mib": rss_mib(empty.pid)}
    empty.umount()

    fs = new_mount(tmp, "defined", mounts)
    fs.mount()
    t = time.monotonic()
    spawn(fs, [f"d{i}" for i in range(m)], "lazy")
    r["spawn_s"] = time.monotonic() - t
    fs.umount()
    t = time.monotonic()
    fs.mount(timeout=300)
    r["mount_s"] = time.monotonic() - t
    r["rss_mib"] = rss_mib(fs.pid)
    r["reads"] = reads(fs, 10)
    asleep = read_to_eof(fs.path / "status").count(b" asleep ")
    r["asleep"] = asleep
    r["processes"] = len(ours(fs))

    def task(i: int) -> float:
        t = time.perf_counter()
        fs.ctl("agents/d0/ctl", f"run {i}\n")
        if read_to_eof(fs.path / "agents/d0/out") != f"{i}\n".encode():
            raise RuntimeError("d0's task gave another output")
        return (time.perf_counter() - t) * 1000
    r["wake_task_ms"] = task(0)
    r["awake_task_ms"] = statistics.median(task(i) for i in range(1, 6))
    fs.umount()
    return r


def rows_of(live: dict, defined: dict) -> list[dict]:
    out = []
    if live:
        n, one, rss = live["n"], live["one_reads"], live["rss_mib"]
        per = (rss[n] - rss[0]) / n
        lp50, sp50 = pct(live["reads"]["ls_ms"], 50), pct(live["reads"]["status_ms"], 50)
        tp50, op50 = pct(live["trip_ms"], 50), pct(live["one_trip_ms"], 50)
        steps = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(rss.items()))
        out += [
            row(f"1. {n} confined daemons blocked on mail, from the first spawn (vs one)",
                live["spawn_s"], live["one_spawn_s"], "s", "<= 10 s", live["spawn_s"] <= 10,
                fmt="{:.2f}"),
            row(f"   fs9 RSS per idle agent ({steps} MiB at agents)", per,
                rss[0] / max(n, 1), "MiB", "<= 1 MiB", per <= 1, fmt="{:.3f}"),
            row(f"   ls agents/ p50 with {n} (vs one)", lp50, pct(one["ls_ms"], 50), "ms",
                "<= 50 ms", lp50 <= 50, fmt="{:.1f}"),
            row(f"   ls agents/ p90 with {n} (vs one)", pct(live["reads"]["ls_ms"], 90),
                pct(one["ls_ms"], 90), "ms", fmt="{:.1f}"),
            row(f"   cat status p50 with {n} (vs one)", sp50, pct(one["status_ms"], 50), "ms",
                "<= 50 ms", sp50 <= 50, fmt="{:.1f}"),
            row(f"   cat status p90 with {n} (vs one)", pct(live["reads"]["status_ms"], 90),
                pct(one["status_ms"], 90), "ms", fmt="{:.1f}"),
            row(f"   mail round trip p50 to 20 of {n} (vs the one agent)", tp50, op50, "ms",
                "<= 2x", tp50 <= 2 * op50, fmt="{:.1f}"),
            row(f"   mail round trip p90 to 20 of {n} (vs the one agent)",
                pct(live["trip_ms"], 90), pct(live["one_trip_ms"], 90), "ms", fmt="{:.1f}"),
            row(f"   server CPU with {n} blocked, per second (vs 1 s)", live["idle_cpu_ms_per_s"],
                1000, "ms", fmt="{:.1f}"),
            row(f"   halt until no program is left ({live['processes']} processes)",
                live["halt_s"], live["one_umount_s"], "s", "<= 5 s", live["halt_s"] <= 5,
                fmt="{:.2f}"),
            row(f"   unmount until nothing is left (vs one agent's); left: "
                f"{', '.join(live['left']) or 'nothing'}", live["umount_s"],
                live["one_umount_s"], "s", "<= 5 s, nothing left",
                live["umount_s"] <= 5 and not live["left"], fmt="{:.2f}"),
        ]
    if defined:
        m = defined["m"]
        out += [
            row(f"2. mount with {m} on-demand agents defined (vs an empty state)",
                defined["mount_s"], defined["empty_mount_s"], "s", "<= 2 s",
                defined["mount_s"] <= 2, fmt="{:.2f}"),
            row(f"   server RSS with {m} defined (vs empty); {defined['asleep']} asleep, "
                f"{defined['processes']} processes", defined["rss_mib"],
                defined["empty_rss_mib"], "MiB", "<= 200 MiB", defined["rss_mib"] <= 200,
                fmt="{:.0f}"),
            row(f"   ls agents/ p50 with {m} defined", pct(defined["reads"]["ls_ms"], 50),
                pct(live["one_reads"]["ls_ms"], 50) if live else 1, "ms", fmt="{:.1f}"),
            row(f"   cat status p50 with {m} defined", pct(defined["reads"]["status_ms"], 50),
                pct(live["one_reads"]["status_ms"], 50) if live else 1, "ms", fmt="{:.1f}"),
            row("   an asleep agent's first task, to out's EOF (vs awake)",
                defined["wake_task_ms"], defined["awake_task_ms"], "ms", fmt="{:.1f}"),
            row(f"   {m} spawns of on-demand agents, 100 a write", defined["spawn_s"], 1, "s",
                fmt="{:.2f}"),
        ]
    return out


def main() -> int:
    why = cannot_run("scale", root="agents are confined: a uid and a namespace each")
    if why:
        print(why, file=sys.stderr)
        return 2
    quick = "--quick" in sys.argv[1:]
    n, m = (100, 1000) if quick else (1000, 10_000)
    guard_signals(3600)
    started, load = time.monotonic(), os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="fs9-bench-scale-"))
    os.chmod(tmp, 0o755)  # agents' uids walk to the mount point and their programs
    mounts: list = []
    try:
        live = figure_live(tmp, n, mounts) if "defined" not in sys.argv[1:] else {}
        defined = figure_defined(tmp, m, mounts) if "live" not in sys.argv[1:] else {}
    finally:
        unmount_all(tmp, mounts, "scale")
    rows = rows_of(live, defined)
    print(table(rows))
    end = os.getloadavg()
    print(f"(ran {time.monotonic() - started:.0f} s on {os.cpu_count()} cpus; load average "
          f"{load[0]:.1f} at the start, {end[0]:.1f} at the end)")
    return finish(RESULTS, rows, {"live": live, "defined": defined},
                  time.monotonic() - started, load=[load, end])


if __name__ == "__main__":
    sys.exit(main())
