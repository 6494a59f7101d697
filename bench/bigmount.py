"""fs9 with a big log: what a million events cost at mount (issue 17, item 4).

    .venv/bin/python bench/bigmount.py           (a 1,000,000-event log; several minutes)
    .venv/bin/python bench/bigmount.py --quick   (a 100,000-event log)
    .venv/bin/python bench/bigmount.py --events N

Builds a state whose log holds N events the way a server writes them, through fs9's own
kernel offline (Kernel.submit / record / bus.send / bus.ack, no FUSE: as fast as the
kernel can apply and append): a worker agent's finished tasks (task_queued with a
200-byte input, task_started, an output chunk, task_done) and acknowledged mail
(mail_sent, mail_delivered, mail_acked), half the events each; a snapshot every 100,000
events, as a server writes them (kernel/snapshot.py). Then, beside a fresh state in the
same run:

1. time from `fs9 mount` (the command, Python's start included) until `cat status`
   answers on the mount; baseline: the same for the fresh state; target <= 2 s.
2. the server's RSS (VmRSS of the mount's process) once serving; baseline: the fresh
   mount's; target <= 200 MiB.
3. durable mail msg/s (bench/bus.py's one sender, one receiver, each acknowledged) on
   the big mount and on the fresh one, interleaved; target >= 0.9x the fresh one.
4. the big state mounted again with `--full-replay` (the snapshot ignored: what every
   mount cost before snapshots): its time to serving and RSS.

Prints a table and writes bench/results/bigmount.json. Every mount is unmounted at the
end.
"""
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (REPO, Fs9Mount, cannot_run, finish, guard_signals, row,  # noqa: E402
                        table, unmount_all)
from bus import Fs9Mail, mail_rate  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "bigmount.json"
QUICK = "--quick" in sys.argv[1:]
EVENTS = int(sys.argv[sys.argv.index("--events") + 1]) if "--events" in sys.argv else \
    100_000 if QUICK else 1_000_000
MAIL_N, REPEATS = (300, 3) if QUICK else (1000, 3)
BATCH = 5_000  # events a transaction while building
WATCHDOG_S = 3600


def build(root: Path, events: int) -> dict:
    """A state under root/state with about `events` events of finished work; what it
    took. The kernel is fs9's own, offline (no agent runs: its events are recorded as an
    agent loop records them)."""
    sys.path.insert(0, str(REPO))
    from fs9.kernel.kernel import Kernel
    from fs9.kernel import snapshot
    (root / "agents").mkdir(exist_ok=True)
    k = Kernel(str(root / "state"), str(root / "agents"))
    db = k.log.db
    db.execute("PRAGMA synchronous=OFF")  # a bench's own state: its build need not be durable
    k.ctl(b"spawn worker cmd=cat unconfined=true\n")
    worker = k.agents["worker"]
    t0 = time.perf_counter()
    task_input = b"i" * 199 + b"\n"
    task_output = b"o" * 199 + b"\n"
    body = b"m" * 118
    n = 0
    while k.log.last_seq < events:
        db.execute("BEGIN")
        stop = min(events, k.log.last_seq + BATCH)
        while k.log.last_seq < stop:
            if n % 2 == 0:  # a finished task: 4 events
                task = k.submit(worker, task_input)
                ids = dict(agent="worker", task=task.id, corr=task.corr)
                k.record("task_started", attempt=1, **ids)
                k.log.add_chunk(task.id, 1, 1, task_output)
                k.record("task_done", exit=0, **ids)
            else:  # an acknowledged message: 3 events (its read logged as a server does)
                msg = k.bus.send(worker, body + b" %08d\n" % n)
                corr = msg.headers["correlation-id"]
                k.log.append("mail_delivered", agent="worker", corr=corr, id=msg.id,
                             name=msg.name)
                k.bus.ack(worker, msg.name)
            n += 1
        db.execute("COMMIT")
        if k.log.last_seq // snapshot.SNAPSHOT_EVERY != (k.log.last_seq - BATCH) // snapshot.SNAPSHOT_EVERY:
            snapshot.write_now(k)  # (as the server's snapshot.keep does, every 100,000)
    made_s = time.perf_counter() - t0
    tasks = (n + 1) // 2
    k.log.close()
    # A server's checkpoints sync the database as they go; this build (synchronous=OFF)
    # left it all in the page cache, which the mount's opening fsync would otherwise
    # write back on the clock (a second and more, none of it the mount's own work).
    fd = os.open(root / "state" / "log.sqlite", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    size = (root / "state" / "log.sqlite").stat().st_size
    return {"events": events, "tasks": tasks, "messages": n - tasks, "bytes": size,
            "made_s": made_s}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def mount_timed(fs: Fs9Mount) -> float:
    """Seconds from `fs9 mount` until `cat status` answers on the mount."""
    t0 = time.perf_counter()
    fs.mount(timeout=600)
    deadline = time.monotonic() + 600
    while True:
        try:
            (fs.path / "status").read_bytes()  # (empty in a state with no agents)
            return time.perf_counter() - t0
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the mount never served status")
        time.sleep(0.01)


def rows_of(b: dict, m: dict) -> list[dict]:
    big, fresh, full = m["big"], m["fresh"], m["full"]
    mail = big["mail"] / fresh["mail"]
    return [
        row(f"1. mount to serving, {b['events']:,} events (vs a fresh state)", big["mount_s"],
            fresh["mount_s"], "s", "<= 2 s", big["mount_s"] <= 2, fmt="{:.2f}"),
        row(f"2. server RSS, {b['tasks']:,} finished tasks (vs a fresh state)", big["rss_mib"],
            fresh["rss_mib"], "MiB", "<= 200 MiB", big["rss_mib"] <= 200, fmt="{:.0f}"),
        row("3. mail msg/s with that log (vs a fresh state)", big["mail"], fresh["mail"], "/s",
            ">= 0.9x", mail >= 0.9, fmt="{:.0f}"),
        row("4. the same mount with --full-replay (vs from its snapshot)", full["mount_s"],
            big["mount_s"], "s", "-", True, fmt="{:.2f}"),
        row("4. its server RSS (vs from its snapshot)", full["rss_mib"], big["rss_mib"], "MiB",
            "-", True, fmt="{:.0f}"),
    ]


def main() -> int:
    why = cannot_run("bigmount")
    if why:
        print(why, file=sys.stderr)
        return 0
    guard_signals(WATCHDOG_S)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fs9-bench-bigmount-", dir="/tmp"))
    tmp.chmod(0o755)  # agents' uids must reach the mount points beneath it
    mounts: dict[str, Fs9Mount] = {}
    try:
        for name in ("big", "fresh"):
            (tmp / name).mkdir()
            mounts[name] = Fs9Mount(tmp / name)
        b = build(tmp / "big", EVENTS)  # (Fs9Mount made root/agents: the kernel's too)
        print(f"bigmount: {b['events']:,} events ({b['tasks']:,} tasks, {b['messages']:,} "
              f"messages, {b['bytes'] / (1 << 20):.0f} MiB) made in {b['made_s']:.0f} s",
              file=sys.stderr)
        m = {}
        for name, fs in mounts.items():
            m[name] = {"mount_s": mount_timed(fs)}
            m[name]["rss_mib"] = rss_mib(fs.pid)
        boxes = {name: Fs9Mail(fs) for name, fs in mounts.items()}
        runs = {name: [] for name in boxes}
        for box in boxes.values():
            mail_rate(box, 50)  # warm up
        for _ in range(REPEATS):
            for name, box in boxes.items():
                runs[name].append(mail_rate(box, MAIL_N)["per_s"])
        for name in boxes:
            m[name]["mail"] = statistics.median(runs[name])
            m[name]["mail_runs"] = runs[name]
            m[name]["rss_after_mail_mib"] = rss_mib(mounts[name].pid)
        big = mounts["big"]
        big.umount()  # (writes a snapshot, which the next mount ignores)
        big.mount_args = ["--full-replay"]
        m["full"] = {"mount_s": mount_timed(big), "rss_mib": rss_mib(big.pid)}
    finally:
        unmount_all(tmp, list(mounts.values()), "bigmount")
        shutil.rmtree(tmp, ignore_errors=True)
    rows = rows_of(b, m)
    print(table(rows))
    elapsed = time.monotonic() - started
    load = os.getloadavg()
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus, load average {load[0]:.1f} "
          f"{load[1]:.1f} {load[2]:.1f}; mail: median of {REPEATS} runs of {MAIL_N} messages, "
          f"interleaved; the log took {b['made_s']:.0f} s to make)")
    return finish(RESULTS, rows, {"build": b, "mounts": m}, elapsed, load=load)


if __name__ == "__main__":
    sys.exit(main())
