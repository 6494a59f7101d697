"""fs9 operations benchmark (issue 15): what running it for real costs.

    .venv/bin/python bench/ops.py           (about 5 minutes)
    .venv/bin/python bench/ops.py --quick   (smoke run, rough figures)
    .venv/bin/python bench/ops.py hot       (only figure 2; also: metrics, restart)

Needs root (agents are confined). Mounts fs9 for real (bench/foundation.py's Fs9Mount).

1. `metrics` with 1,000 agents: a read of the root `metrics` (open, read to EOF,
   close), p50, beside a read of the root `status` (one line an agent) in the same
   run. Target: <= 50 ms.
2. The hot path with metrics scraped and with traces exported, each beside the same
   work without: mounts side by side, each with the same 1,000 idle agents, a `cat`
   agent and a mailbox: `plain`; `scraped`, the plain mount while a thread reads its
   `metrics` at once and then every second, as a Prometheus scraper would (the same
   mount, so nothing else differs); `traced` (fs9 mount --otlp to a collector on
   loopback, an in-process HTTP server that takes the spans), a mount of its own, so
   beside it `plain2`, a second plain mount: what two mounts differ by with nothing
   between them. Figures, rounds interleaved so load hits each alike: the task round
   trip p50 (`run x`, `out` read to EOF) and mail msg/s (write `mail/new`, read
   `mail/next`, `rm mail/ID`). Target: traced and scraped within 5% of plain.
3. Crash to restart: SIGKILL of a daemon child's process until its new run starts
   (the `task_started` event's own time stamp, minus the moment of the kill), for a
   supervisor with three children under each strategy (the middle one killed; for
   one_for_all and rest_for_one also until every child it restarts runs again), beside
   a daemon with restart = "permanent" and no supervisor (the kernel's own restart)
   and a bare respawn (subprocess.Popen of the same program until it has exec'd).
Prints a table and writes bench/results/ops.json.
"""
import http.server
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (Fs9Mount, cannot_run, finish, guard_signals, pct, read_to_eof,  # noqa: E402
                        table, unmount_all)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ops.json"
WATCHDOG_S = 900
AGENTS, READS, ROUNDS, TRIPS, MAILS, CRASHES = 1000, 30, 6, 40, 200, 8
UP = 'mode = "daemon"\nrestart = "permanent"\ncmd = ["sh", "-c", "exec sleep 600"]\n'
STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def spawn_idle(fs: Fs9Mount, n: int) -> None:
    """n idle `cat` agents (no task: no sandbox started), 100 spawns a write."""
    for first in range(0, n, 100):
        fs.ctl("ctl", "".join(f"spawn idle{i} cmd=cat\n" for i in range(first, min(n, first + 100))))


# --- 1. metrics with 1,000 agents ----------------------------------------------------

def server_cpu_ms(fs: Fs9Mount) -> float:
    """The server's CPU time so far (user + system, /proc: 10 ms ticks)."""
    fields = Path(f"/proc/{fs.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def figure_metrics(fs: Fs9Mount, reads: int) -> dict:
    """Wall clock a read (interleaved with the baseline's), then the server's CPU a
    read over `reads` reads of each (steadier on a loaded machine)."""
    metrics, status = [], []
    size = len(read_to_eof(fs.path / "metrics"))  # (warm)
    for i in range(reads):
        metrics.append(timed(lambda: read_to_eof(fs.path / "metrics")))
        status.append(timed(lambda: read_to_eof(fs.path / "status")))
    cpu = {}
    for name in ("metrics", "status"):
        before = server_cpu_ms(fs)
        for i in range(reads):
            read_to_eof(fs.path / name)
        cpu[name] = (server_cpu_ms(fs) - before) / reads
    return {"metrics_ms": metrics, "status_ms": status, "bytes": size,
            "metrics_cpu_ms": cpu["metrics"], "status_cpu_ms": cpu["status"]}


# --- 2. the hot path: plain, scraped, traced ---------------------------------------------

class Collector:
    """An OTLP/HTTP endpoint on loopback that takes whatever is posted (200)."""

    def __init__(self) -> None:
        self.posts = self.bytes = 0
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                self.rfile.read(n)
                collector.posts += 1
                collector.bytes += n
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Scraper:
    """Reads a mount's `metrics` at once, then every second, until closed."""

    def __init__(self, path: Path) -> None:
        self.path, self.reads, self.stop = path, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                read_to_eof(self.path / "metrics")
                self.reads += 1
            except OSError:
                return
            if self.stop.wait(1.0):
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def round_trip(fs: Fs9Mount) -> float:
    fd = os.open(fs.path / "agents/bench/ctl", os.O_WRONLY)
    try:
        t = time.perf_counter()
        os.write(fd, b"run x\n")
    finally:
        os.close(fd)
    data = read_to_eof(fs.path / "agents/bench/out")  # blocks until the task ends
    ms = (time.perf_counter() - t) * 1000
    if data != b"x\n":
        raise RuntimeError(f"bench's out gave {data!r}")
    return ms


def mail_rate(fs: Fs9Mount, n: int) -> float:
    """Messages a second, one at a time: send, read mail/next, rm mail/ID."""
    mail = fs.path / "agents/box/mail"
    t = time.perf_counter()
    for i in range(n):
        fd = os.open(mail / "new", os.O_WRONLY)
        try:
            os.write(fd, b"message %d\n" % i)
        finally:
            os.close(fd)
        head = read_to_eof(mail / "next").split(b"\n\n", 1)[0].decode()
        os.unlink(mail / next(ln[4:] for ln in head.splitlines() if ln.startswith("id: ")))
    return n / (time.perf_counter() - t)


def helpers_cpu_ms(fs: Fs9Mount) -> float:
    """CPU time so far of the server's helper processes (the traces' exporter)."""
    total = 0.0
    for d in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == fs.pid and \
                    b"fs9.kernel.traces" in Path(f"/proc/{d}/cmdline").read_bytes():
                total += (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            continue
    return total


def figure_hot_path(mounts: dict[str, Fs9Mount], rounds: int, trips: int, mails: int) -> dict:
    """Wall clock of each phase's round trips and mail, rounds interleaved; and the CPU
    its server (and, apart, its helper processes) spent on the mail, a steadier figure
    on a loaded machine. Phases: `plain`; `scraped`, the same mount while a scraper reads
    its `metrics` (so nothing but the scraping differs); `traced`, a mount of its own
    (--otlp is chosen at mount), beside `plain2`, a second plain mount: how far two
    mounts differ with nothing between them (the noise a mount-to-mount ratio carries)."""
    phases = {"plain": mounts["plain"], "scraped": mounts["plain"],
              "traced": mounts["traced"], "plain2": mounts["plain2"]}
    out = {name: {"trip_ms": [], "mail_per_s": [], "mail_cpu_ms": 0.0, "helper_cpu_ms": 0.0,
                  "mails": 0, "scrapes": 0} for name in phases}
    order = list(phases)
    for r in range(rounds):
        for name in order[r % 4:] + order[:r % 4]:  # who goes first rotates
            fs, o = phases[name], out[name]
            scraper = Scraper(fs.path) if name == "scraped" else None
            try:
                o["trip_ms"] += [round_trip(fs) for _ in range(trips)]
                cpu, helpers = server_cpu_ms(fs), helpers_cpu_ms(fs)
                o["mail_per_s"].append(mail_rate(fs, mails))
                o["mail_cpu_ms"] += server_cpu_ms(fs) - cpu
                o["helper_cpu_ms"] += helpers_cpu_ms(fs) - helpers
                o["mails"] += mails
            finally:
                if scraper is not None:
                    scraper.close()
                    o["scrapes"] += scraper.reads
    return out


# --- 3. crash to restart -----------------------------------------------------------------

class EventTail:
    def __init__(self, fs: Fs9Mount) -> None:
        self.fd = os.open(fs.path / "events", os.O_RDONLY)
        self.buf = b""

    def until(self, predicate, timeout: float = 60) -> dict:
        """The first event (a dict) predicate accepts, read as they come."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                e = json.loads(line)
                if predicate(e):
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no such event")
            if poller.poll(left * 1000):
                self.buf += os.read(self.fd, 1 << 16)

    def close(self) -> None:
        os.close(self.fd)


def status(fs: Fs9Mount, agent: str) -> dict:
    text = (fs.path / f"agents/{agent}/status").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def running_pid(fs: Fs9Mount, agent: str, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = status(fs, agent)["pid"]
        if pid and os.path.exists(f"/proc/{pid}"):
            return int(pid)
        time.sleep(0.01)
    raise TimeoutError(f"{agent} has no running process")


def crash(fs: Fs9Mount, tail: EventTail, victim: str, restarted: list[str]) -> tuple[float, float]:
    """SIGKILL victim's process: (ms until victim's next run started, ms until every
    agent of `restarted` has started again)."""
    for name in restarted:  # all running before the crash
        running_pid(fs, name)
    pid = running_pid(fs, victim)
    t0 = time.time()
    os.kill(pid, signal.SIGKILL)
    started: dict[str, float] = {}
    while set(started) != set(restarted):
        e = tail.until(lambda e: e["kind"] == "task_started" and e.get("agent") in restarted
                       and e["ts"] >= t0 and e.get("agent") not in started)
        started[e["agent"]] = e["ts"]
    return (started[victim] - t0) * 1000, (max(started.values()) - t0) * 1000


def bare_respawn() -> float:
    """ms from Popen until the program has exec'd (what a bare restart costs)."""
    t0 = time.time()
    p = subprocess.Popen(["sh", "-c", "exec sleep 600"])
    try:
        while True:
            try:
                if b"sleep" in Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[0]:
                    return (time.time() - t0) * 1000
            except FileNotFoundError:
                pass
            time.sleep(0.0002)
    finally:
        p.kill()
        p.wait()


def figure_restart(fs: Fs9Mount, crashes: int) -> dict:
    for s in STRATEGIES:
        (fs.agents / f"sup_{s}").mkdir()
        kids = ", ".join(f'{{name = "{s}_{c}", def = "up", shutdown = "brutal_kill"}}'
                         for c in "akb")
        (fs.agents / f"sup_{s}/agent.toml").write_text(
            f'mode = "supervisor"\nstrategy = "{s}"\nmax_restarts = 1000\nwithin_s = 60\n'
            f"children = [{kids}]\n")
    (fs.agents / "up").mkdir()
    (fs.agents / "up/agent.toml").write_text(UP)
    (fs.agents / "solo").mkdir()
    (fs.agents / "solo/agent.toml").write_text(UP + "max_restarts = 1000\nwithin_s = 60\n")
    fs.ctl("ctl", "".join(f"spawn sup_{s}\n" for s in STRATEGIES) + "spawn solo\n")
    tail = EventTail(fs)
    out: dict[str, dict] = {}
    try:
        cases = [("solo", "solo", ["solo"])] + [
            (s, f"{s}_k", {"one_for_one": [f"{s}_k"], "one_for_all": [f"{s}_{c}" for c in "akb"],
                           "rest_for_one": [f"{s}_k", f"{s}_b"]}[s]) for s in STRATEGIES]
        for name, victim, restarted in cases:
            out[name] = {"victim_ms": [], "all_ms": []}
        for i in range(crashes):  # interleaved: each case once a round
            for name, victim, restarted in cases:
                v, a = crash(fs, tail, victim, restarted)
                out[name]["victim_ms"].append(v)
                out[name]["all_ms"].append(a)
            out.setdefault("bare", {"victim_ms": [], "all_ms": []})
            b = bare_respawn()
            out["bare"]["victim_ms"].append(b)
            out["bare"]["all_ms"].append(b)
    finally:
        tail.close()
    return out


# --- the run ------------------------------------------------------------------------------

def med(xs: list[float]) -> float:
    return statistics.median(xs)


def row(figure: str, fs9: str, baseline: str, ratio: float, target: str = "info",
        passed: bool | None = None) -> dict:
    """A row of foundation.table, its figures as text."""
    return {"figure": figure, "fs9_text": fs9, "baseline_text": baseline, "ratio": ratio,
            "target": target, "pass": passed}


def rows_of(m: dict | None, hot: dict | None, rs: dict | None) -> list[dict]:
    return (_metrics_rows(m) if m else []) + (_hot_rows(hot) if hot else []) + \
        (_restart_rows(rs) if rs else [])


def _metrics_rows(m: dict) -> list[dict]:
    return [row(f"1. `metrics` read, {m['agents']:,} agents ({m['bytes']:,} bytes), p50 / p90",
                f"{med(m['metrics_ms']):.1f} / {pct(m['metrics_ms'], 90):.1f} ms",
                f"`status` read {med(m['status_ms']):.1f} ms",
                med(m["metrics_ms"]) / med(m["status_ms"]), "<= 50 ms",
                med(m["metrics_ms"]) <= 50),
            row("1. server CPU per `metrics` read", f"{m['metrics_cpu_ms']:.1f} ms",
                f"per `status` read {m['status_cpu_ms']:.1f} ms",
                m["metrics_cpu_ms"] / max(m["status_cpu_ms"], 0.01))]


def _hot_rows(hot: dict) -> list[dict]:
    rows, plain = [], hot["plain"]
    for name in ("scraped", "traced", "plain2"):
        h = hot[name]
        trip = med(h["trip_ms"]) / med(plain["trip_ms"])
        mail = med(plain["mail_per_s"]) / med(h["mail_per_s"])
        rows.append(row(f"2. task round trip p50, {name} vs plain",
                        f"{med(h['trip_ms']):.2f} ms", f"{med(plain['trip_ms']):.2f} ms",
                        *((trip, "<= 1.05x", trip <= 1.05) if name != "plain2" else (trip,))))
        rows.append(row(f"2. mail msg/s, {name} vs plain (time per message)",
                        f"{med(h['mail_per_s']):,.0f}/s", f"{med(plain['mail_per_s']):,.0f}/s",
                        *((mail, "<= 1.05x", mail <= 1.05) if name != "plain2" else (mail,))))
        cpu, base = h["mail_cpu_ms"] / h["mails"], plain["mail_cpu_ms"] / plain["mails"]
        helpers = h["helper_cpu_ms"] / h["mails"]
        rows.append(row(f"2. server CPU per message, {name} vs plain"
                        + (" (+ the exporter process)" if name == "traced" else ""),
                        f"{cpu * 1000:,.0f} us" + (f" (+ {helpers * 1000:,.0f} us)"
                                                  if name == "traced" else ""),
                        f"{base * 1000:,.0f} us", cpu / base if base else 0.0))
    return rows


def _restart_rows(rs: dict) -> list[dict]:
    rows, bare = [], med(rs["bare"]["victim_ms"])
    for name in ("solo",) + STRATEGIES:
        r = rs[name]
        what = "daemon, no supervisor" if name == "solo" else f"supervisor {name}"
        tail = "" if name in ("solo", "one_for_one") else \
            f"; all restarted {med(r['all_ms']):.1f} ms"
        rows.append(row(f"3. crash to restart p50, {what}",
                        f"{med(r['victim_ms']):.1f} ms{tail}", f"bare respawn {bare:.2f} ms",
                        med(r["victim_ms"]) / bare))
    return rows


def main() -> int:
    global AGENTS, READS, ROUNDS, TRIPS, MAILS, CRASHES
    why = cannot_run("bench/ops.py", root="confined agents")
    if why:
        print(why)
        return 0
    if "--quick" in sys.argv[1:]:
        AGENTS, READS, ROUNDS, TRIPS, MAILS, CRASHES = 200, 5, 1, 5, 20, 2
    only = {"metrics", "hot", "restart"} & set(sys.argv[1:]) or {"metrics", "hot", "restart"}
    guard_signals(WATCHDOG_S)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fs9-bench-ops-"))
    tmp.chmod(0o711)  # agents' uids walk to the mount points
    collector = Collector()
    mounts: dict[str, Fs9Mount] = {}
    try:
        for name in ("plain", "plain2", "traced") if "hot" in only else ("plain",):
            (tmp / name).mkdir(mode=0o711)
            fs = mounts[name] = Fs9Mount(tmp / name)
            if name == "traced":
                fs.mount_args = ["--otlp", collector.url]
            fs.mount()
            fs.ctl("ctl", "spawn bench cmd=cat\nspawn box cmd=cat\n")
            print(f"{name}: spawning {AGENTS} agents ...", file=sys.stderr, flush=True)
            spawn_idle(fs, AGENTS if "hot" in only or "metrics" in only else 0)
            for _ in range(3):  # the sandbox starts on first use
                round_trip(fs)
        signal.alarm(WATCHDOG_S)
        m = hot = rs = None
        if "metrics" in only:
            print("1/3 metrics ...", file=sys.stderr, flush=True)
            m = {**figure_metrics(mounts["plain"], READS), "agents": AGENTS + 2}
        if "hot" in only:
            print("2/3 hot path ...", file=sys.stderr, flush=True)
            hot = figure_hot_path(mounts, ROUNDS, TRIPS, MAILS)
        if "restart" in only:
            print("3/3 crash to restart ...", file=sys.stderr, flush=True)
            rs = figure_restart(mounts["plain"], CRASHES)
        signal.alarm(0)
    finally:
        signal.alarm(0)
        unmount_all(tmp, list(mounts.values()), "bench/ops.py")
        collector.close()
    rows = rows_of(m, hot, rs)
    print(table(rows))
    elapsed = time.monotonic() - started
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus; the collector took "
          f"{collector.posts} posts, {collector.bytes:,} bytes; the scraper read "
          f"{hot['scraped']['scrapes'] if hot else 0} times)")
    return finish(RESULTS, rows, {"metrics": m, "hot_path": hot, "restart": rs}, elapsed)


if __name__ == "__main__":
    sys.exit(main())
