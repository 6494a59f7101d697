"""fs9 foundation benchmark: each figure beside a baseline measured in the same run.

    .venv/bin/python bench/foundation.py        (or: make bench)
    .venv/bin/python bench/foundation.py --quick   (smoke run, rough figures)
    .venv/bin/python bench/foundation.py --strict  (exit 1 when a target is missed)

Mounts fs9 for real (`python -m fs9 mount ... --background`) in a temporary
directory, and a bare pyfuse3 server (bench/bare_pyfuse3.py) on a second mount
point, then measures:

1. control writes/s: one process holds agents/X/ctl open (X stopped, so queued
   tasks start nothing; a fresh X each run, for its queue's room) and writes
   `run x\\n` in a loop for ~2 s (at most QUEUE_ROOM writes), against the same loop
   on the bare server's discard-everything file, and on its `logged` file (each
   write one row committed to a SQLite WAL log before the answer, as fs9 logs a
   command: the floor of a server that does). Median of repeats.
2. stream wake-up: a reader process blocked in read() on `events`; the writer
   takes a timestamp, writes `run x` to a stopped agent's ctl; latency is until
   the reader's read() returns (CLOCK_MONOTONIC in both processes, nothing
   subtracted). Baseline: the same with a named pipe. The ctl write's own
   latency (a FUSE round trip plus the logged commit) is shown beside a bare
   pyfuse3 write, and a bare pyfuse3 blocked read woken by a write is shown too.
3. task round trip: write `run x` to a running agent (cmd=cat), open its `out`
   and read to EOF; against subprocess.run(["cat"], input=b"x\\n").

Figures are interleaved with their baselines, repeat by repeat, because the
machine is noisy. Prints a table and writes bench/results/foundation.json.
Both mounts are always unmounted at the end (fusermount3 -u -z as a fallback).
"""
import json
import os
import platform
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
PY = str(VENV_PY) if VENV_PY.exists() else sys.executable
RESULTS = HERE / "results" / "foundation.json"

WRITE_S = 2.0  # one write-loop run
QUEUE_ROOM = 15_000  # its writes at most: an agent's queue takes 20,000 of the operator's
WRITE_REPEATS = 5
WAKE_ROUNDS, WAKE_PER_ROUND = 5, 150  # samples per kind = rounds * per round
TRIP_ROUNDS, TRIP_PER_ROUND = 5, 80
SETTLE_S = 0.002  # reader announced itself: let its read() reach the server and block
WATCHDOG_S = 90  # no single figure may take longer than this

RUN = b"run x\n"


# --- mounts -----------------------------------------------------------------------

def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def detach(path: Path) -> None:
    if mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


class Fs9Mount:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "mnt"  # beside, never inside, the state directory
        self.state = root / "state"
        self.agents = root / "agents"
        self.vault = root / "vault"
        self.pid: int | None = None
        self.agents.mkdir()
        self.py, self.repo = PY, REPO  # whose fs9 it mounts (another tree: its .venv)

    def fs9(self, *args, timeout=30) -> subprocess.CompletedProcess:
        return subprocess.run([self.py, "-m", "fs9", *args], cwd=self.repo,
                              capture_output=True, text=True, timeout=timeout)

    mount_args: list[str] = []  # more `fs9 mount` options

    def mount(self, timeout: float = 30) -> None:
        r = self.fs9("mount", str(self.path), "--state", str(self.state), "--agents",
                     str(self.agents), "--vault", str(self.vault), "--background",
                     *self.mount_args, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"fs9 mount failed: {r.stderr.strip()}")
        with open(self.path / "ctl") as f:
            self.pid = int(dict(w.split("=", 1) for w in f.read().split() if "=" in w)["pid"])

    def ctl(self, rel: str, text: str) -> None:
        with open(self.path / rel, "w") as f:
            f.write(text)

    def umount(self) -> None:
        try:
            if mounted(self.path):
                self.fs9("umount", str(self.path), timeout=20)
        except subprocess.TimeoutExpired:
            pass
        if mounted(self.path) and self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        detach(self.path)


class BareMount:
    def __init__(self, root: Path) -> None:
        self.path = root / "bare"
        self.path.mkdir()
        self.proc: subprocess.Popen | None = None

    def mount(self) -> None:
        self.proc = subprocess.Popen([PY, str(HERE / "bare_pyfuse3.py"), str(self.path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"bare pyfuse3 server did not start: {self.proc.stderr.read()!r}")

    def umount(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        detach(self.path)


# --- measuring ---------------------------------------------------------------------

def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def write_rate(path: Path, seconds: float, most: int = QUEUE_ROOM) -> float:
    """Writes/s of one process holding path open and writing `run x\\n` in a loop, for
    `seconds` or `most` writes, whichever ends first."""
    fd = os.open(path, os.O_WRONLY)
    try:
        n = 0
        start = time.perf_counter()
        end = start + seconds
        while True:
            os.write(fd, RUN)
            n += 1
            if n >= most or time.perf_counter() >= end:
                break
        return n / (time.perf_counter() - start)
    finally:
        os.close(fd)


class BlockedReader:
    """A child process that reads `path` in a loop; reports when each read() returns.

    Before every read it writes one byte to `ready`; after the read it sends the
    perf_counter_ns (CLOCK_MONOTONIC, comparable across processes) to `result`."""

    def __init__(self, path: Path, opener=None) -> None:
        ready_r, ready_w = os.pipe()
        result_r, result_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child
            code = 0
            try:
                os.close(ready_r)
                os.close(result_r)
                fd = opener() if opener else os.open(path, os.O_RDONLY)
                while True:
                    os.write(ready_w, b"r")
                    data = os.read(fd, 65536)
                    t1 = time.perf_counter_ns()
                    if not data:
                        break
                    os.write(result_w, struct.pack("q", t1))
            except BaseException:
                code = 1
            os._exit(code)
        os.close(ready_w)
        os.close(result_w)
        self.ready, self.result = ready_r, result_r

    def _take(self, fd: int, n: int, timeout: float = 10.0) -> bytes:
        if not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError("the blocked reader did not wake within 10 s")
        data = os.read(fd, n)
        if len(data) != n:
            raise RuntimeError("the reader process ended early")
        return data

    def wait_blocked(self) -> None:
        self._take(self.ready, 1)
        time.sleep(SETTLE_S)
        # then make sure it sleeps in the kernel (in read(), waiting for the server)
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            with open(f"/proc/{self.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "S":
                    return
            time.sleep(0.0002)

    def woke_at(self) -> int:
        return struct.unpack("q", self._take(self.result, 8))[0]

    def close(self, wake=None) -> None:
        """Kill the reader. A FUSE read already handed to a server ends only when the
        server answers (SIGKILL or not), so `wake()` makes the server answer."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if wake is not None:
                try:
                    wake()
                except OSError:
                    pass  # e.g. EPIPE: the fifo's reader is already gone
            if time.monotonic() > deadline:
                raise TimeoutError(f"reader {self.pid} would not die")
            time.sleep(0.01)
        os.close(self.ready)
        os.close(self.result)


def wake_samples(reader: BlockedReader, trigger_fd: int, trigger: bytes, n: int,
                 lat: list[float], wlat: list[float]) -> None:
    """n wake-ups: ms from just before the trigger write until the reader's read() returned."""
    for _ in range(n):
        reader.wait_blocked()
        t0 = time.perf_counter_ns()
        os.write(trigger_fd, trigger)
        tw = time.perf_counter_ns()
        t1 = reader.woke_at()
        lat.append((t1 - t0) / 1e6)
        wlat.append((tw - t0) / 1e6)


def fs9_round_trip(ctl_fd: int, out: Path) -> float:
    t0 = time.perf_counter_ns()
    os.write(ctl_fd, RUN)
    data = read_to_eof(out)
    t1 = time.perf_counter_ns()
    if data != b"x\n":
        raise RuntimeError(f"agent out gave {data!r}, expected b'x\\n'")
    return (t1 - t0) / 1e6


def direct_round_trip() -> float:
    t0 = time.perf_counter_ns()
    r = subprocess.run(["cat"], input=b"x\n", capture_output=True)
    t1 = time.perf_counter_ns()
    if r.stdout != b"x\n":
        raise RuntimeError(f"cat gave {r.stdout!r}")
    return (t1 - t0) / 1e6


# --- the figures ----------------------------------------------------------------------

def figure_writes(fs: Fs9Mount, bare: BareMount) -> dict:
    runs = iter(range(1 << 30))

    def stopped() -> Path:
        """A stopped agent's ctl (queued tasks start nothing), one for each run: the
        queue it fills has room for the run (QUEUE_ROOM)."""
        name = f"wx{next(runs)}"
        fs.ctl("ctl", f"spawn {name} cmd=cat unconfined=true\n")
        fs.ctl(f"agents/{name}/ctl", "stop\n")
        return fs.path / "agents" / name / "ctl"
    sink, logged = bare.path / "sink", bare.path / "logged"
    write_rate(stopped(), 0.2), write_rate(sink, 0.2), write_rate(logged, 0.2)  # warm up
    fs9_rates, bare_rates, logged_rates = [], [], []
    for i in range(WRITE_REPEATS):
        kinds = [(fs9_rates, stopped()), (bare_rates, sink), (logged_rates, logged)]
        for rates, path in (kinds if i % 2 == 0 else kinds[::-1]):
            rates.append(write_rate(path, WRITE_S))
    return {"fs9_per_s": fs9_rates, "bare_pyfuse3_per_s": bare_rates,
            "bare_logged_per_s": logged_rates, "fs9": statistics.median(fs9_rates),
            "baseline": statistics.median(bare_rates), "logged": statistics.median(logged_rates)}


def figure_wake(fs: Fs9Mount, bare: BareMount, tmp: Path) -> dict:
    fs.ctl("ctl", "spawn wk cmd=cat unconfined=true\n")
    fs.ctl("agents/wk/ctl", "stop\n")
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    kinds = {k: ([], []) for k in ("fs9", "fifo", "bare")}  # (wake-up ms, trigger write ms)

    ctl_fd = os.open(fs.path / "agents" / "wk" / "ctl", os.O_WRONLY)
    sink_fd = os.open(bare.path / "sink", os.O_WRONLY)
    # open(2) of one fifo end blocks until the other is opened: open the read end
    # non-blocking first, then the write end, then make reads block again.
    fifo_rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    fifo_wfd = os.open(fifo, os.O_WRONLY)
    os.set_blocking(fifo_rfd, True)
    readers = {
        "fs9": (BlockedReader(fs.path / "events"), ctl_fd, RUN),
        "fifo": (BlockedReader(fifo, opener=lambda: fifo_rfd), fifo_wfd, b"x\n"),
        "bare": (BlockedReader(bare.path / "pipe"), sink_fd, RUN),
    }
    os.close(fifo_rfd)  # the child has its copy
    try:
        for kind, (reader, fd, trig) in readers.items():  # warm up
            wake_samples(reader, fd, trig, 10, [], [])
        for _ in range(WAKE_ROUNDS):
            for kind, (reader, fd, trig) in readers.items():
                wake_samples(reader, fd, trig, WAKE_PER_ROUND, *kinds[kind])
    finally:
        for reader, fd, trig in readers.values():
            reader.close(wake=lambda: os.write(fd, trig))
        for fd in (ctl_fd, sink_fd, fifo_wfd):
            os.close(fd)
    out = {}
    for kind, (lat, wlat) in kinds.items():
        out[kind] = {"n": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                     "write_p50_ms": pct(wlat, 50), "write_p99_ms": pct(wlat, 99)}
    return out


def figure_trip(fs: Fs9Mount) -> dict:
    # unconfined: this is the foundation's path (kernel, FUSE, exec); bench/views.py adds
    # the sandbox on top (a confined agent, the default, costs about 1.3 ms more)
    fs.ctl("ctl", "spawn rt cmd=cat unconfined=true\n")
    ctl_fd = os.open(fs.path / "agents" / "rt" / "ctl", os.O_WRONLY)
    out = fs.path / "agents" / "rt" / "out"
    fs9_ms, direct_ms = [], []
    try:
        for _ in range(5):  # warm up
            fs9_round_trip(ctl_fd, out), direct_round_trip()
        for _ in range(TRIP_ROUNDS):
            for _ in range(TRIP_PER_ROUND):
                fs9_ms.append(fs9_round_trip(ctl_fd, out))
            for _ in range(TRIP_PER_ROUND):
                direct_ms.append(direct_round_trip())
    finally:
        os.close(ctl_fd)
    round_p50 = lambda xs: [statistics.median(xs[i:i + TRIP_PER_ROUND])
                            for i in range(0, len(xs), TRIP_PER_ROUND)]
    return {"n": len(fs9_ms),
            "fs9_p50_ms": pct(fs9_ms, 50), "fs9_p99_ms": pct(fs9_ms, 99),
            "direct_p50_ms": pct(direct_ms, 50), "direct_p99_ms": pct(direct_ms, 99),
            "fs9_round_p50s_ms": round_p50(fs9_ms), "direct_round_p50s_ms": round_p50(direct_ms)}


# --- report ---------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    head = ("figure", "fs9", "baseline", "ratio", "target", "pass")
    cells = [head] + [(r["figure"], r["fs9_text"], r["baseline_text"], f"{r['ratio']:.2f}x",
                       r["target"], {True: "PASS", False: "FAIL", None: "-"}[r["pass"]])
                      for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    line = lambda c: "  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip()
    return "\n".join([line(cells[0]), line(tuple("-" * w for w in widths))] +
                     [line(c) for c in cells[1:]])


def row(figure, fs9, baseline, unit, target="info", passed=None, fmt="{:.3f}"):
    return {"figure": figure, "fs9": fs9, "baseline": baseline, "unit": unit,
            "ratio": fs9 / baseline, "target": target, "pass": passed,
            "fs9_text": f"{fmt.format(fs9)} {unit}", "baseline_text": f"{fmt.format(baseline)} {unit}"}


def rows_of(w: dict, k: dict, t: dict) -> list[dict]:
    f, fifo, bare = k["fs9"], k["fifo"], k["bare"]
    return [
        row("1. ctl writes/s (vs bare pyfuse3)", w["fs9"], w["baseline"], "/s",
            ">= 0.75x", w["fs9"] >= 0.75 * w["baseline"], fmt="{:.0f}"),
        row("   ctl writes/s (vs bare pyfuse3 + a commit a write)", w["fs9"], w["logged"], "/s",
            fmt="{:.0f}"),
        row("   bare pyfuse3 + a commit a write (vs bare pyfuse3)", w["logged"], w["baseline"],
            "/s", fmt="{:.0f}"),
        row("2. events wake-up p50 (vs fifo)", f["p50_ms"], fifo["p50_ms"], "ms",
            "<= 1 ms", f["p50_ms"] <= 1.0),
        row("   events wake-up p99 (vs fifo)", f["p99_ms"], fifo["p99_ms"], "ms"),
        row("   events wake-up p50 (vs bare pyfuse3 read)", f["p50_ms"], bare["p50_ms"], "ms"),
        row("   ctl write latency p50 (vs bare write)", f["write_p50_ms"], bare["write_p50_ms"], "ms"),
        row("   ctl write latency p99 (vs bare write)", f["write_p99_ms"], bare["write_p99_ms"], "ms"),
        row("3. task round trip p50 (vs subprocess.run)", t["fs9_p50_ms"], t["direct_p50_ms"], "ms",
            "<= 2x", t["fs9_p50_ms"] <= 2 * t["direct_p50_ms"]),
        row("   task round trip p99 (vs subprocess.run)", t["fs9_p99_ms"], t["direct_p99_ms"], "ms"),
    ]


def guard_signals(watchdog_s: float) -> None:
    """SIGTERM runs the finally blocks (unmount); SIGALRM (signal.alarm) stops a figure
    that takes over watchdog_s."""
    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    def on_alarm(signum, frame):
        raise TimeoutError(f"a figure took over {watchdog_s} s")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGALRM, on_alarm)


def unmount_all(tmp: Path, mounts: list, label: str) -> None:
    """Unmount each (even if one fails), then remove tmp unless something stays mounted."""
    try:
        for m in mounts:
            try:
                m.umount()
            except Exception as e:
                print(f"{label}: unmounting {m.path}: {e}", file=sys.stderr)
    finally:
        left = [str(m.path) for m in mounts if mounted(m.path)]
        if not left:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"{label}: still mounted: {left}", file=sys.stderr)


def main() -> int:
    why = cannot_run("foundation")
    if why:
        print(why, file=sys.stderr)
        return 2

    guard_signals(WATCHDOG_S)

    global WRITE_S, WRITE_REPEATS, WAKE_ROUNDS, TRIP_ROUNDS
    if "--quick" in sys.argv[1:]:  # a smoke run of a few seconds; figures are rough
        WRITE_S, WRITE_REPEATS, WAKE_ROUNDS, TRIP_ROUNDS = 0.5, 1, 1, 1
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fs9-bench-"))
    fs, bare = Fs9Mount(tmp), BareMount(tmp)
    try:
        fs.mount()
        bare.mount()
        signal.alarm(WATCHDOG_S)
        print("1/3 control writes ...", file=sys.stderr, flush=True)
        w = figure_writes(fs, bare)
        signal.alarm(WATCHDOG_S)
        print(f"2/3 stream wake-up ... ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        k = figure_wake(fs, bare, tmp)
        signal.alarm(WATCHDOG_S)
        print(f"3/3 task round trip ... ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        t = figure_trip(fs)
        signal.alarm(0)
    finally:
        signal.alarm(0)
        unmount_all(tmp, [bare, fs], "foundation")

    rows = rows_of(w, k, t)
    print(table(rows))
    elapsed = time.monotonic() - started
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus; writes: median of {WRITE_REPEATS} x "
          f"{WRITE_S:g} s; latencies: percentiles of {k['fs9']['n']} wake-ups and "
          f"{t['n']} round trips, interleaved with their baselines)")
    return finish(RESULTS, rows, {"writes": w, "wake": k, "round_trip": t}, elapsed)


def traversable(prefix: str) -> tuple[Path, "Fs9Mount"]:
    """A temporary folder confined agents' uids can walk (0711), and an Fs9Mount in it
    (not mounted yet) whose definitions' folder they can read."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    tmp.chmod(0o711)
    fs = Fs9Mount(tmp)
    fs.agents.chmod(0o755)
    return tmp, fs


def cannot_run(name: str, root: str = "", program: str = "") -> str | None:
    """Why benchmark `name` cannot run here (fusermount3 missing; not root when it says
    why it needs root; a program it needs missing), or None."""
    if not shutil.which("fusermount3"):
        return f"{name}: fusermount3 missing; cannot mount"
    if root and os.geteuid() != 0:
        return f"{name}: needs root ({root})"
    if program and not os.access(program, os.X_OK):
        return f"{name}: {program} missing"
    return None


def read_to_eof(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        return data
    finally:
        os.close(fd)


def finish(path: Path, rows: list[dict], raw: dict, elapsed: float, **extra) -> int:
    """Write the JSON report (when, the machine, the commit, `extra`, the rows, the raw
    figures); the exit status: 1 under --strict when a target is missed."""
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": round(elapsed, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release()},
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True).stdout.strip(),
        **extra,
        "rows": [{k: v for k, v in r.items() if not k.endswith("_text")} for r in rows],
        "raw": raw,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {path.relative_to(REPO)}")
    return 1 if "--strict" in sys.argv[1:] and any(r["pass"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
