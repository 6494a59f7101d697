"""fs9 durability benchmark: what `power` costs beside `process`, and what a backup costs.

    .venv/bin/python bench/durability.py           (about 3 minutes)
    .venv/bin/python bench/durability.py --quick   (about a minute: fewer messages,
                                                    a 100,000-event log)

Two real mounts on this machine's disk (a temporary directory under /tmp), one with
`--durability process`, one with `--durability power`, and measures, interleaved:

1. durable mail throughput: bench/bus.py's figure 1 shape (one sender: open, write,
   close of agents/box/mail/new, each close returns once the message is acknowledged;
   one receiver reading mail/next and rm'ing each). Also SENDERS sender processes at
   once (a mailbox each), where `power`'s group commit lets them share fsyncs.
   Baseline: SQLite in WAL mode with synchronous=FULL, one transaction per message
   (a 320-byte row), in a file beside the states, one writer; and SENDERS writer
   processes, each its own connection (busy_timeout), one transaction per message.
2. delivery latency p50/p99: one message at a time to a receiver blocked in read()
   on mail/next, from just before the sender's open until that read() returns; and
   until the sender's close returns (the message acknowledged: at `power`, on disk;
   the receiver may see it up to one fsync earlier). Baseline: one synchronous=FULL
   commit (the durable write alone, nobody woken).
   Peer: NATS JetStream (the pinned nats-server, `sync_interval: always`, so an
   acknowledged message is on disk; nats-py in this process): one publisher awaiting
   each publish's acknowledgement and one durable pull consumer acking each message
   (ack_sync), throughput and publish-to-receipt latency, one message at a time.
   Skipped, saying why, without the nats-server binary (`make deps` installs it).
3. `fs9 backup` of a large log: a log of LOG_EVENTS events (made with fs9's own
   EventLog, as a server appends them; mail-sized events), then `fs9 backup` and
   `fs9 check` of it, as commands (Python's start included); baseline: `cp` of its
   log.sqlite followed by sync (a raw copy, consistent only while nothing writes).

Prints a table and writes bench/results/durability.json. Every mount is unmounted
at the end and every child process ended.
"""
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
from foundation import (PY, REPO, Fs9Mount, cannot_run, finish, guard_signals, pct, row,  # noqa: E402
                        table, unmount_all)
from bus import Fs9Mail, figure_mail_latency, mail_rate, message  # noqa: E402
import natsserver  # noqa: E402  (tests/natsserver.py: the pinned server, on 127.0.0.1)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "durability.json"
QUICK = "--quick" in sys.argv[1:]
MAIL_N, REPEATS = (300, 2) if QUICK else (1000, 4)
SENDERS = 4
LOG_EVENTS = 100_000 if QUICK else 1_000_000
WATCHDOG_S = 600


# --- figure 1: throughput -------------------------------------------------------------

SENDER = r"""
import os, sys, time
new, n = sys.argv[1], int(sys.argv[2])
body = b"m" * 118 + b" %08d\n"
sys.stdin.readline()  # go
for i in range(n):
    fd = os.open(new, os.O_WRONLY)
    try:
        os.write(fd, body % i)
    finally:
        os.close(fd)
print(time.perf_counter_ns())
"""

SQLITE_WRITER = r"""
import sqlite3, sys, time
path, n = sys.argv[1], int(sys.argv[2])
db = sqlite3.connect(path, isolation_level=None, timeout=60)
db.execute("PRAGMA synchronous=FULL")
row = b"m" * 310 + b" %08d\n"
sys.stdin.readline()  # go
for i in range(n):
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO mail (body) VALUES (?)", (row % i,))
    db.execute("COMMIT")
print(time.perf_counter_ns())
"""


def parallel(argvs: list[list[str]]) -> float:
    """Start the processes, let them go at once; seconds from go to the last one done."""
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for argv in argvs]
    time.sleep(0.3)  # interpreters up
    t0 = time.perf_counter_ns()
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    ends = []
    for p in procs:
        out, _ = p.communicate(timeout=WATCHDOG_S)
        if p.returncode != 0:
            raise RuntimeError(f"{argvs[0][:3]} failed ({p.returncode})")
        ends.append(int(out.split()[-1]))
    return (max(ends) - t0) / 1e9


def fs9_senders(fs: Fs9Mount, n: int) -> float:
    """SENDERS processes each sending n messages to its own mailbox; messages/s."""
    argvs = [[PY, "-c", SENDER, str(fs.path / f"agents/sink{k}/mail/new"), str(n)]
             for k in range(SENDERS)]
    rate = SENDERS * n / parallel(argvs)
    for k in range(SENDERS):  # empty the mailboxes for the next run (they only grow)
        fs.ctl(f"agents/sink{k}/ctl", "kill\n")
        fs.ctl("ctl", f"spawn sink{k} cmd=cat\n")
    return rate


class SqliteFull:
    """The baseline: SQLite WAL, synchronous=FULL, one transaction per message."""
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS mail (id INTEGER PRIMARY KEY, body BLOB)")
        db.close()
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA synchronous=FULL")

    def commit(self, i: int) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO mail (body) VALUES (?)", (message(i),))
        self.db.execute("COMMIT")

    def rate(self, n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            self.commit(i)
        return n / (time.perf_counter() - t0)

    def writers(self, n: int) -> float:
        argvs = [[PY, "-c", SQLITE_WRITER, str(self.path), str(n)] for _ in range(SENDERS)]
        return SENDERS * n / parallel(argvs)

    def latency_ms(self, n: int) -> list[float]:
        out = []
        for i in range(n):
            t0 = time.perf_counter_ns()
            self.commit(i)
            out.append((time.perf_counter_ns() - t0) / 1e6)
        return out


def figure_throughput(boxes: dict, mounts: dict, base: SqliteFull) -> dict:
    runs = {name: [] for name in (*boxes, "sqlite")}
    many = {name: [] for name in (*mounts, "sqlite")}
    for box in boxes.values():
        mail_rate(box, 50)  # warm up
    for r in range(REPEATS):
        for name, box in boxes.items():
            runs[name].append(mail_rate(box, MAIL_N)["per_s"])
        runs["sqlite"].append(base.rate(MAIL_N))
        for name, fs in mounts.items():
            many[name].append(fs9_senders(fs, MAIL_N // SENDERS))
        many["sqlite"].append(base.writers(MAIL_N // SENDERS))
    return {"one": {k: statistics.median(v) for k, v in runs.items()},
            "many": {k: statistics.median(v) for k, v in many.items()},
            "runs": runs, "many_runs": many}


def figure_latency(boxes: dict, base: SqliteFull) -> dict:
    for name, box in boxes.items():
        box.name = name  # bus.py keys its figures by box name
    lat = figure_mail_latency(list(boxes.values()), autogen=False)
    samples = base.latency_ms(200)
    lat["sqlite"] = {"p50_ms": pct(samples, 50), "p99_ms": pct(samples, 99)}
    return lat


# --- figure 3: backup of a large log ---------------------------------------------------

def make_log(state: Path, events: int) -> float:
    """A state whose log holds `events` mail-sized events, appended by fs9's EventLog in
    batches (a transaction each, as fast as possible); seconds taken."""
    sys.path.insert(0, str(REPO))
    from fs9.kernel.log import EventLog
    log = EventLog(str(state))
    t0 = time.perf_counter()
    body = "m" * 118
    for start in range(0, events, 10_000):
        log.db.execute("BEGIN")
        for i in range(start, min(events, start + 10_000)):
            log.append("mail_sent", agent="box", corr=f"{i:016x}", id=f"{i:016x}",
                       sender="operator", type="event", priority="normal",
                       classification="internal", blob=body.encode())
        log.db.execute("COMMIT")
    log.close()
    return time.perf_counter() - t0


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=WATCHDOG_S)
    if r.returncode != 0:
        raise RuntimeError(f"{argv}: {r.stderr.strip()}")
    return time.perf_counter() - t0


def figure_backup(tmp: Path) -> dict:
    state = tmp / "big"
    made_s = make_log(state, LOG_EVENTS)
    size = (state / "log.sqlite").stat().st_size
    backup = timed([PY, "-m", "fs9", "backup", str(state), str(tmp / "big-backup")])
    check = timed([PY, "-m", "fs9", "check", str(state)])
    raw = timed(["sh", "-c", f"cp {state}/log.sqlite {tmp}/raw.sqlite && sync {tmp}/raw.sqlite"])
    return {"events": LOG_EVENTS, "bytes": size, "made_s": made_s, "backup_s": backup,
            "check_s": check, "cp_s": raw}


# --- report -------------------------------------------------------------------------------

# --- the peer: NATS JetStream -------------------------------------------------------

async def _jetstream(url: str, n: int, latency_n: int) -> dict:
    import asyncio
    import nats
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="BENCH", subjects=["bench.>"])
        body = message(0)
        sub = await js.pull_subscribe("bench.mail", durable="box")

        async def receive(count: int, seen: list) -> None:
            while len(seen) < count:
                try:
                    for msg in await sub.fetch(1, timeout=5):
                        seen.append(time.perf_counter())
                        await msg.ack_sync()
                except nats.errors.TimeoutError:
                    pass
        seen: list = []
        t0 = time.perf_counter()
        receiver = asyncio.create_task(receive(n, seen))
        for _ in range(n):
            await js.publish("bench.mail", body)  # returns once JetStream acknowledged it
        await receiver
        rate = n / (time.perf_counter() - t0)
        samples = []
        for _ in range(latency_n):
            got: list = []
            receiver = asyncio.create_task(receive(1, got))
            await asyncio.sleep(0.002)  # the consumer is waiting in fetch
            start = time.perf_counter()
            await js.publish("bench.mail", body)
            await receiver
            samples.append((got[0] - start) * 1000)
        return {"rate": rate, "p50_ms": pct(samples, 50), "p99_ms": pct(samples, 99)}
    finally:
        await nc.close()


def figure_jetstream(tmp: Path) -> dict | None:
    """NATS JetStream's durable publish and consume beside fs9's mail (None: no server)."""
    if natsserver.binary() is None:
        print("durability: no nats-server (make deps installs it): JetStream skipped",
              file=sys.stderr)
        return None
    import asyncio
    server = natsserver.NatsServer(tmp / "nats").start()
    try:
        return asyncio.run(_jetstream(server.url, MAIL_N, 200 if QUICK else 500))
    finally:
        server.stop()


def rows_of(t: dict, lat: dict, b: dict, js: dict | None) -> list[dict]:
    one, many = t["one"], t["many"]
    mib = b["bytes"] / (1 << 20)
    return [
        row("1. mail msg/s, process (vs SQLite FULL txn/msg)", one["process"], one["sqlite"],
            "/s", fmt="{:.0f}"),
        row("   mail msg/s, power (vs SQLite FULL txn/msg)", one["power"], one["sqlite"],
            "/s", fmt="{:.0f}"),
        row(f"   mail msg/s, {SENDERS} senders, process (vs {SENDERS} SQLite writers)",
            many["process"], many["sqlite"], "/s", fmt="{:.0f}"),
        row(f"   mail msg/s, {SENDERS} senders, power (vs {SENDERS} SQLite writers)",
            many["power"], many["sqlite"], "/s", fmt="{:.0f}"),
        row("2. delivery p50, process (vs one FULL commit)", lat["process"]["p50_ms"],
            lat["sqlite"]["p50_ms"], "ms"),
        row("   delivery p50, power (vs one FULL commit)", lat["power"]["p50_ms"],
            lat["sqlite"]["p50_ms"], "ms"),
        row("   delivery p99, power (vs one FULL commit)", lat["power"]["p99_ms"],
            lat["sqlite"]["p99_ms"], "ms"),
        row("   send acknowledged p50, process (vs one FULL commit)",
            lat["process"]["send_p50_ms"], lat["sqlite"]["p50_ms"], "ms"),
        row("   send acknowledged p50, power (vs one FULL commit)",
            lat["power"]["send_p50_ms"], lat["sqlite"]["p50_ms"], "ms"),
    ] + ([] if js is None else [
        row("   mail msg/s, power (vs JetStream, sync_interval always)", one["power"], js["rate"],
            "/s", fmt="{:.0f}"),
        row("   mail msg/s, process (vs JetStream, sync_interval always)", one["process"],
            js["rate"], "/s", fmt="{:.0f}"),
        row("   delivery p50, power (vs JetStream publish to receipt)", lat["power"]["p50_ms"],
            js["p50_ms"], "ms"),
        row("   delivery p99, power (vs JetStream publish to receipt)", lat["power"]["p99_ms"],
            js["p99_ms"], "ms"),
    ]) + [
        row(f"3. fs9 backup, {b['events']:,} events, {mib:.0f} MiB (vs cp + sync)",
            b["backup_s"], b["cp_s"], "s", fmt="{:.2f}"),
        row(f"   fs9 check, {b['events']:,} events (vs cp + sync)", b["check_s"], b["cp_s"],
            "s", fmt="{:.2f}"),
    ]


def main() -> int:
    why = cannot_run("durability")
    if why:
        print(why, file=sys.stderr)
        return 0
    guard_signals(WATCHDOG_S)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fs9-bench-durability-", dir="/tmp"))
    mounts = {}
    try:
        for name in ("process", "power"):
            (tmp / name).mkdir()
            fs = Fs9Mount(tmp / name)
            fs.mount_args = ["--durability", name]
            fs.mount()
            mounts[name] = fs
            for k in range(SENDERS):
                fs.ctl("ctl", f"spawn sink{k} cmd=cat\n")
        boxes = {name: Fs9Mail(fs) for name, fs in mounts.items()}
        base = SqliteFull(tmp / "baseline.sqlite")
        t = figure_throughput(boxes, mounts, base)
        lat = figure_latency(boxes, base)
        js = figure_jetstream(tmp)
        b = figure_backup(tmp)
    finally:
        unmount_all(tmp, list(mounts.values()), "durability")
        shutil.rmtree(tmp, ignore_errors=True)
    rows = rows_of(t, lat, b, js)
    print(table(rows))
    elapsed = time.monotonic() - started
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus; throughput: median of {REPEATS} "
          f"runs of {MAIL_N} messages, interleaved; the {b['events']:,}-event log took "
          f"{b['made_s']:.0f} s to make)")
    return finish(RESULTS, rows, {"throughput": t, "latency": lat, "backup": b,
                                  "jetstream": js}, elapsed)


if __name__ == "__main__":
    sys.exit(main())
