"""fs9 vault benchmark (issue 5): the vault through the mount against the backing
directory itself, each figure beside baselines measured in the same run.

    .venv/bin/python bench/vault.py           (about 2 minutes)
    .venv/bin/python bench/vault.py --quick   (smoke run, rough figures)
    .venv/bin/python bench/vault.py --strict  (exit 1 when a target is missed)
    .venv/bin/python bench/vault.py --no-kernel-audit  (fs9 mounted without its audit witness)

Needs root (drop_caches, a confined agent). Makes a temporary directory (0711, so
agents' uids reach the mount point) with a vault holding:

    bench/files/f0000.md .. f0999.md   1,000 files of 4 KiB (one 1,000-entry directory)
    bench/big.bin                       256 MiB of random bytes (fsynced)
    docs/dNN/docNNNNN.md                10,000 synthetic markdown documents (seeded
                                        vocabulary, Zipf word frequencies), for search

then mounts fs9 over it (bench/foundation.py's Fs9Mount) and pyfuse3's own example
passthroughfs.py (copied from PASSTHROUGH_SRC; skipped, with the reason printed, if
absent) over the same backing directory, and measures with one timing program
(TIMEOPS, run by /usr/bin/python3 in every case) on four bases:

    native    root, on the backing directory VAULT/bench
    fs9       root, through the mount: MNT/vault/bench
    pt        root, through passthroughfs: PT/bench
    view      a confined agent (`[unveil] "vault/bench" = "r"`, pledge read) running the
              program as its task, in its sandbox, on $FS9_MNT/vault/bench, which its
              sandbox binds read-only from disk (docs/namespace.md, "Confinement")

1. stat/s over the 1,000 files: the first pass of a run (for fs9, over 1 s since the
   last touch, so the kernel's 1 s entry/attribute cache has expired and each stat is
   a LOOKUP) and repeated passes (fs9: served from the kernel's cache; passthroughfs
   answers with timeout 0, so it asks its server every time);
2. open+read-to-EOF+close of the 4 KiB files, files/s;
3. listdir of the 1,000-entry directory, ms per listing (names only, no stat);
4. sequential read of big.bin with 1 MiB readv() calls, MiB/s: warm (the backing file in
   the page cache; what each path adds on top of memory copies) in every run, and
   cold (echo 3 > /proc/sys/vm/drop_caches before each read) for native, fs9 and
   passthroughfs, a few times at the end;
5. search (when MNT/search exists): p50 latency of reading `search/QUERY` (open, read
   to EOF, close) for several distinct queries, warm, beside `grep -rlw WORD` over the
   same documents; and change-to-searchable: a new file with a unique word written into
   the backing directory directly (and, as information, through the mount), then
   `search/WORD` polled until it lists the file; p50 and max of 10.

Runs are interleaved round by round (the order rotates), each figure is a median.
Prints a table like bench/foundation.py's and writes bench/results/vault.json.
Both mounts are always unmounted at the end (fusermount3 -u -z as a fallback).
"""
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (PY, Fs9Mount, cannot_run, detach, finish, guard_signals, mounted,  # noqa: E402
                        pct, read_to_eof, unmount_all)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "vault.json"
SYS_PY = "/usr/bin/python3"  # reachable by agents' uids (the venv's python is not)
PASSTHROUGH_SRC = Path("/tmp/pf/pyfuse3-3.5.0/examples/passthroughfs.py")
AGENT = "vview"

N_FILES, FILE_BYTES = 1000, 4096
BIG_MIB = 256
N_DOCS, DOCS_PER_DIR, VOCAB, WORDS_PER_DOC = 10_000, 100, 4000, 150
SEED = 9

ROUNDS = 5  # interleaved rounds of the timing program on each base
# per run of the program: FUSE bases (slow passes) / on-disk bases (passes of a few ms,
# so more of them: a noise burst weighs less)
STAT_PASSES, READ_PASSES, LISTINGS, SEQ_WARM = 3, 2, 15, 2
FAST = dict(stat_passes=9, read_passes=8, listings=40, seq_reads=3)
ON_DISK = ("native", "plain", "view")
COLD_ROUNDS = 3
CACHE_GAP_S = 1.2  # fs9 caches entries and attributes for 1 s (ops.CACHE_S)
SEARCH_REPEATS, GREP_REPEATS, FRESH_N = 15, 3, 10
INDEX_WAIT_S, FRESH_TIMEOUT_S = 90, 5.0
WATCHDOG_S = 150

# --- the timing program: JSON config on stdin, JSON on stdout ------------------------

TIMEOPS = r'''
import json, os, sys, time

cfg = json.loads(sys.stdin.read())
base = cfg.get("base") or os.path.join(os.environ["FS9_MNT"], cfg["rel"])
clock = time.perf_counter_ns
files = os.path.join(base, "files")
# names from the config, not a listing: a listing first would fill the kernel's caches
paths = [os.path.join(files, "f%04d.md" % i) for i in range(cfg["n_files"])]


def fstype(path):
    """The filesystem type and options of the mount that holds path."""
    path, best = os.path.realpath(path), ("", "?", "")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            a, b = line.split(" - ")
            point, opts = a.split()[4], a.split()[5]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                best = (point, b.split()[0], opts)
    return best[1] + ":" + best[2]


def read_all(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 0
        while chunk := os.read(fd, 65536):
            n += len(chunk)
        return n
    finally:
        os.close(fd)


out = {"uid": os.getuid(), "base": base, "fstype": fstype(base)}
ops = cfg["ops"]
if "stat" in ops:
    rates = []
    for _ in range(cfg["stat_passes"]):
        t0 = clock()
        for p in paths:
            os.stat(p)
        rates.append(len(paths) / ((clock() - t0) / 1e9))
    out["stat_per_s"] = rates  # [0] is the first pass
if "read" in ops:
    rates = []
    for _ in range(cfg["read_passes"]):
        t0 = clock()
        total = 0
        for p in paths:
            total += read_all(p)
        rates.append(len(paths) / ((clock() - t0) / 1e9))
        if total != len(paths) * cfg["file_bytes"]:
            raise SystemExit("read %d bytes, expected %d" % (total, len(paths) * cfg["file_bytes"]))
    out["read_per_s"] = rates
if "listdir" in ops:
    ms = []
    for _ in range(cfg["listings"]):
        t0 = clock()
        n = len(os.listdir(files))
        ms.append((clock() - t0) / 1e6)
        if n != cfg["entries"]:
            raise SystemExit("listed %d names, expected %d" % (n, cfg["entries"]))
    out["listdir_ms"] = ms
if "seq" in ops:
    buf = bytearray(1 << 20)
    rates = []
    for _ in range(cfg["seq_reads"]):
        fd = os.open(os.path.join(base, "big.bin"), os.O_RDONLY)
        try:
            total = 0
            t0 = clock()
            while k := os.readv(fd, [buf]):
                total += k
            dt = (clock() - t0) / 1e9
        finally:
            os.close(fd)
        if total != cfg["big_bytes"]:
            raise SystemExit("read %d bytes of big.bin, expected %d" % (total, cfg["big_bytes"]))
        rates.append(total / 2**20 / dt)
    out["seq_mib_s"] = rates
sys.stdout.write(json.dumps(out))
'''


def config(ops, **kw) -> dict:
    cfg = {"ops": ops, "n_files": N_FILES, "entries": N_FILES, "file_bytes": FILE_BYTES, "big_bytes": BIG_MIB << 20,
           "stat_passes": STAT_PASSES, "read_passes": READ_PASSES, "listings": LISTINGS,
           "seq_reads": SEQ_WARM}
    cfg.update(kw)
    return cfg


# --- the vault's content ---------------------------------------------------------------

def b26(i: int, width: int = 4) -> str:
    """i in letters (a word a tokenizer keeps whole)."""
    s = ""
    for _ in range(width):
        i, r = divmod(i, 26)
        s = chr(97 + r) + s
    return s


def vocabulary(rng: random.Random) -> list[str]:
    """VOCAB distinct pronounceable made-up words (none is an English stop word), in
    rank order: word i is drawn with weight 1/(i+1) (Zipf)."""
    cons, vows = "bcdfghjklmnprstvz", "aeiou"
    words, seen = [], set()
    while len(words) < VOCAB:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(2, 4)))
        if w not in seen and not w.startswith(("uniq", "fresh")):
            seen.add(w)
            words.append(w)
    return words


def make_vault(vault: Path, plain: Path) -> dict:
    """The vault; and plain/files, a copy of bench/files outside it (not watched by fs9)."""
    t0 = time.monotonic()
    for files in (vault / "bench" / "files", plain / "files"):
        files.mkdir(parents=True)
        for i in range(N_FILES):
            (files / f"f{i:04d}.md").write_bytes((f"file {i}\n".encode() * FILE_BYTES)[:FILE_BYTES])
    with open(vault / "bench" / "big.bin", "wb") as f:
        for _ in range(BIG_MIB):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    rng = random.Random(SEED)
    words = vocabulary(rng)
    cum, acc = [], 0.0
    for r in range(len(words)):
        acc += 1 / (r + 1)
        cum.append(acc)
    docs = vault / "docs"
    for i in range(N_DOCS):
        d = docs / f"d{i // DOCS_PER_DIR:02d}"
        if i % DOCS_PER_DIR == 0:
            d.mkdir(parents=True)
        body = rng.choices(words, cum_weights=cum, k=WORDS_PER_DOC)
        lines = [" ".join(body[j:j + 12]) for j in range(0, len(body), 12)]
        (d / f"doc{i:05d}.md").write_text(
            f"# {' '.join(body[:4])}\n\nid: uniq{b26(i)}\n\n" + "\n".join(lines) + "\n")
    (docs / "fresh").mkdir()  # change-to-searchable writes here (watched since the mount)
    for p in [vault, *vault.rglob("*")]:  # readable by agents' uids
        p.chmod(0o755 if p.is_dir() else 0o644)
    return {"words": words, "made_s": round(time.monotonic() - t0, 1)}


# --- mounts ------------------------------------------------------------------------------

class PassthroughMount:
    """pyfuse3's example passthroughfs.py over a source directory (root only)."""

    def __init__(self, root: Path, source: Path) -> None:
        self.path = root / "pt"
        self.path.mkdir()
        self.source = source
        self.script = root / "passthroughfs.py"
        self.proc: subprocess.Popen | None = None
        self.log = root / "pt.log"

    def mount(self) -> None:
        shutil.copy(PASSTHROUGH_SRC, self.script)
        # passthroughfs.py SOURCE MOUNTPOINT [--debug] [--debug-fuse]
        # [--enable-writeback-cache]: foreground, default_options (default_permissions),
        # entry and attribute timeouts 0, page cache used (no direct_io), keep_cache off
        self.proc = subprocess.Popen([PY, str(self.script), str(self.source), str(self.path)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        deadline = time.monotonic() + 15
        while not mounted(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"passthroughfs did not mount: {self.log.read_text()[-500:]}")
            time.sleep(0.05)

    def umount(self) -> None:
        if mounted(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        detach(self.path)


# --- running the timing program ----------------------------------------------------------

def run_as_root(script: Path, base: Path, cfg: dict) -> dict:
    r = subprocess.run([SYS_PY, str(script)], input=json.dumps({**cfg, "base": str(base)}).encode(),
                       capture_output=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"timing program on {base} failed: {r.stderr.decode()[-2000:]}")
    return json.loads(r.stdout)


def define_agent(fs: Fs9Mount) -> Path:
    folder = fs.agents / AGENT
    folder.mkdir()
    folder.chmod(0o755)
    (folder / "timeops.py").write_text(TIMEOPS)
    (folder / "timeops.py").chmod(0o644)
    (folder / "agent.toml").write_text(
        f'cmd = ["{SYS_PY}", "timeops.py"]\ntimeout_s = 120\npledge = ["read"]\n'
        '[unveil]\n"vault/bench" = "r"\n')
    fs.ctl("ctl", f"spawn {AGENT}\n")
    return folder / "timeops.py"


def run_in_view(fs: Fs9Mount, cfg: dict) -> dict:
    """The timing program as the confined agent's task: in through `in`, out via `out`."""
    tasks = fs.path / "agents" / AGENT / "tasks"
    before = set(os.listdir(tasks))
    with open(fs.path / "agents" / AGENT / "in", "w") as f:
        f.write(json.dumps({**cfg, "rel": "vault/bench"}))
    new = sorted(set(os.listdir(tasks)) - before, key=int)
    if len(new) != 1:
        raise RuntimeError(f"expected one new task, saw {new}")
    task = tasks / new[0]
    data = read_to_eof(task / "out")
    try:
        return json.loads(data)
    except ValueError:
        raise RuntimeError(f"timing program in the view failed: out {data[:300]!r}; err "
                           f"{read_to_eof(task / 'err')[:2000]!r}; "
                           f"status {(task / 'status').read_text()!r}")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) that process pid has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, max_s: float = 3.0) -> float:
    """Wait until the fs9 server is idle (under 10% of a CPU over 0.2 s): its vault
    watcher works through the inotify events of every open and close in the vault,
    which another base's run leaves behind. Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_s:
        c0 = cpu_s(pid)
        time.sleep(0.2)
        if cpu_s(pid) - c0 <= 0.02:
            break
    return time.monotonic() - t0


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def figure_files(runs: dict, log, fs9_pid: int) -> dict:
    """The timing program on every base, ROUNDS interleaved rounds; then cold reads."""
    ops = lambda k: ["stat", "read", "listdir"] + ([] if k == "plain" else ["seq"])
    cfgs = {k: config(ops(k), **(FAST if k in ON_DISK else {})) for k in runs}
    for k, run in runs.items():  # warm up (the agent's sandbox starts on its first task)
        run(config(ops(k), n_files=50, stat_passes=1, read_passes=1, listings=2, seq_reads=1))
    res: dict = {k: {"stat_first": [], "stat_rep": [], "read": [], "listdir_ms": [], "seq": [],
                     "fstype": None, "uid": None} for k in runs}
    last_fs9 = time.monotonic()
    settled: list[float] = []
    for i in range(ROUNDS):
        order = list(runs)
        order = order[i % len(order):] + order[:i % len(order)]  # rotate
        if "view" in runs:  # its figure is a ratio to native's: a second pair, close together
            order += ["native", "view"] if i % 2 else ["view", "native"]
        log(f"   round {i + 1}/{ROUNDS}: {' '.join(order)}")
        for k in order:
            settled.append(settle(fs9_pid))
            if k == "fs9":  # let the kernel's 1 s entry/attribute cache expire
                time.sleep(max(0.0, CACHE_GAP_S - (time.monotonic() - last_fs9)))
            out = runs[k](cfgs[k])
            if k == "fs9":
                last_fs9 = time.monotonic()
            r = res[k]
            r["stat_first"].append(out["stat_per_s"][0])
            r["stat_rep"] += out["stat_per_s"][1:]
            r["read"] += out["read_per_s"]
            r["listdir_ms"] += out["listdir_ms"]
            r["seq"] += out.get("seq_mib_s", [])
            r["fstype"], r["uid"] = out["fstype"], out["uid"]
    # an agent cannot drop caches (root could for it, but its cold read is native's)
    cold = {k: [] for k in runs if k not in ("view", "plain")}
    for i in range(COLD_ROUNDS):
        order = list(cold)
        order = order[i % len(order):] + order[:i % len(order)]
        log(f"   cold read {i + 1}/{COLD_ROUNDS}: {' '.join(order)}")
        for k in order:
            settle(fs9_pid)
            drop_caches()
            cold[k] += runs[k](config(["seq"], seq_reads=1))["seq_mib_s"]
    for k, r in res.items():
        if not isinstance(r, dict) or "stat_first" not in r:
            continue
        r["cold_seq"] = cold.get(k, [])
        r["summary"] = {
            "stat_first_per_s": statistics.median(r["stat_first"]),
            "stat_rep_per_s": statistics.median(r["stat_rep"]),
            "stat_all_per_s": statistics.median(r["stat_first"] + r["stat_rep"]),
            "read_per_s": statistics.median(r["read"]),
            "listdir_ms": statistics.median(r["listdir_ms"]),
            "seq_warm_mib_s": statistics.median(r["seq"]) if r["seq"] else None,
            "seq_cold_mib_s": statistics.median(r["cold_seq"]) if r["cold_seq"] else None,
        }
    res["settle_s"] = settled
    # what fs9's watcher of the backing directory costs: the server's CPU while root
    # reads the 1,000 files natively in the vault, and outside it
    if "plain" in runs:
        cfg = config(["read"], read_passes=8)
        watch = {}
        for k in ("native", "plain", "native", "plain"):
            settle(fs9_pid)
            c0 = cpu_s(fs9_pid)
            runs[k](cfg)
            settle(fs9_pid, max_s=5)
            watch.setdefault(k, []).append((cpu_s(fs9_pid) - c0) * 1000 / 8)  # ms per pass
        res["watch_cpu_ms_per_1000_reads"] = {k: statistics.median(v) for k, v in watch.items()}
    if "view" in res and (res["view"]["uid"] == 0 or not res["view"]["fstype"].startswith(
            ("ext", "xfs", "btrfs", "tmpfs", "overlay"))):
        raise RuntimeError(f"the view run was not a confined agent on a disk bind: {res['view']}")
    return res


# --- search -----------------------------------------------------------------------------

def timed_read(path: Path) -> tuple[float, bytes]:
    t0 = time.perf_counter_ns()
    data = read_to_eof(path)
    return (time.perf_counter_ns() - t0) / 1e6, data


def search_status(fs: Fs9Mount) -> dict:
    try:
        text = read_to_eof(fs.path / "search" / "status").decode()
    except OSError as e:
        return {"error": str(e)}
    return dict(w.split("=", 1) for w in text.split() if "=" in w)


def wait_search_ready(fs: Fs9Mount, mounted_at: float) -> dict:
    """Before any figure: the index over the 10,000 documents is built (it is built in
    the server's process at mount, and would otherwise run beside the file figures)."""
    search = fs.path / "search"
    if not search.exists():
        return {"available": False, "reason": f"{search.relative_to(fs.root)} does not exist "
                                              "(search not served yet)"}
    last = f"doc{N_DOCS - 1:05d}"
    while True:
        st = search_status(fs)
        try:
            if (st.get("ready") == "yes" and st.get("pending") == "0"
                    and last.encode() in read_to_eof(search / f"uniq{b26(N_DOCS - 1)}")):
                break
        except OSError:
            pass
        if time.monotonic() - mounted_at > INDEX_WAIT_S:
            return {"available": False, "reason": f"search/ exists; index not ready {INDEX_WAIT_S}"
                                                  f" s after the mount", "status": st}
        time.sleep(0.1)
    return {"available": True, "ready_after_mount_s": round(time.monotonic() - mounted_at, 2),
            "status_at_ready": st}


def fresh_wait(fs: Fs9Mount, target: Path, word: str, filler: str,
               timeout: float = FRESH_TIMEOUT_S) -> float:
    """ms from writing target (a new file holding word) until search/WORD lists it."""
    t0 = time.perf_counter()
    with open(target, "w") as f:
        f.write(f"# fresh\n\n{word} {filler}\n")
    while time.perf_counter() - t0 < timeout:
        try:
            if target.name.encode() in read_to_eof(fs.path / "search" / word):
                return (time.perf_counter() - t0) * 1000
        except OSError:
            pass
        time.sleep(0.005)
    return float("inf")


def figure_search(fs: Fs9Mount, vault: Path, words: list[str], ready: dict) -> dict:
    if not ready.get("available"):
        return ready
    search = fs.path / "search"
    out: dict = dict(ready)
    settle(fs.pid)
    # Queries round-robin: search.py keeps the last rendered query (a stat then a read of
    # one query cost one search), so no timed read is answered from that cache alone.
    queries = {  # common to rare; a needle; two words
        "rank3": words[3], "rank30": words[30], "rank300": words[300], "rank3000": words[3000],
        "needle": f"uniq{b26(1234)}", "two_words": f"{words[30]} {words[300]}",
    }
    first, lat, hits, errors = {}, {q: [] for q in queries}, {}, {}
    for q, text in list(queries.items()):  # first read of each (cold), then warm reads
        try:
            first[q], data = timed_read(search / text)
            hits[q] = data.count(b"\n")
        except OSError as e:
            errors[q] = f"{type(e).__name__}: {e}"
            del queries[q]
    for _ in range(SEARCH_REPEATS):
        for q, text in queries.items():
            lat[q].append(timed_read(search / text)[0])
    lat = {q: v for q, v in lat.items() if v}
    every = [x for v in lat.values() for x in v]
    out.update(queries=queries, errors=errors, lines_per_query=hits, first_ms=first,
               p50_by_query_ms={q: statistics.median(v) for q, v in lat.items()},
               p50_ms=statistics.median(every) if every else None,
               p99_ms=pct(every, 99) if every else None, n=len(every))
    # change to searchable: the backing directory directly (an editor behind fs9's
    # back), and through the mount; the server idle first (no watcher backlog)
    fresh = vault / "docs" / "fresh"  # made with the vault: watched since the mount
    rng = random.Random(SEED + 1)
    new_word = lambda: f"fresh{b26(rng.randrange(26 ** 6), 6)}"
    for how in ("disk", "mount"):
        where = fresh if how == "disk" else fs.path / "vault" / "docs" / "fresh"
        waits = []
        for i in range(FRESH_N if how == "disk" else FRESH_N // 2):
            settle(fs.pid)
            waits.append(fresh_wait(fs, where / f"{how}{i:02d}.md", new_word(), words[5]))
        out[f"fresh_{how}_ms"] = waits
        out[f"fresh_{how}_p50_ms"] = statistics.median(waits)
        out[f"fresh_{how}_max_ms"] = max(waits)
        out[f"fresh_{how}_missed"] = sum(w == float("inf") for w in waits)
    # baseline: grep -rlw over the same documents (no index), single-word queries
    grep = []
    for _ in range(GREP_REPEATS):
        for q, text in queries.items():
            if " " in text:
                continue
            t0 = time.perf_counter_ns()
            subprocess.run(["grep", "-rlw", text, str(vault / "docs")], capture_output=True)
            grep.append((time.perf_counter_ns() - t0) / 1e6)
    out["grep_p50_ms"] = statistics.median(grep)
    # the same right after a grep -r of the vault: some 20,000 open and close events for
    # the watcher (the kernel's inotify queue holds /proc/sys/fs/inotify/max_queued_events)
    after = []
    for i in range(2):
        settle(fs.pid)
        subprocess.run(["grep", "-rlw", words[30], str(vault / "docs")], capture_output=True)
        after.append(fresh_wait(fs, fresh / f"aftergrep{i}.md", new_word(), words[5]))
    out["fresh_after_grep_ms"] = after
    out["inotify_max_queued_events"] = int(Path("/proc/sys/fs/inotify/max_queued_events")
                                           .read_text())
    # a file written at once into a directory just made behind fs9's back (inotify must
    # add a watch for the new directory before the file's events can be seen)
    racy = []
    for i in range(3):
        settle(fs.pid)
        d = vault / "docs" / f"new{i}"
        t0 = time.perf_counter()
        d.mkdir()
        w = fresh_wait(fs, d / "a.md", new_word(), words[5])
        racy.append(None if w == float("inf") else (time.perf_counter() - t0) * 1000)
    out["new_dir_then_file_ms"] = racy
    out["status_at_end"] = search_status(fs)
    return out


# --- report ---------------------------------------------------------------------------

def row(figure, fs9, baseline, unit, target="info", passed=None, fmt="{:.0f}", ratio=None,
        fs9_text=None, baseline_text=None):
    if ratio is None and isinstance(fs9, (int, float)) and isinstance(baseline, (int, float)) \
            and baseline:
        ratio = fs9 / baseline
    return {"figure": figure, "fs9": fs9, "baseline": baseline, "unit": unit, "ratio": ratio,
            "target": target, "pass": passed,
            "fs9_text": fs9_text or (f"{fmt.format(fs9)} {unit}" if fs9 is not None else "-"),
            "baseline_text": baseline_text or (f"{fmt.format(baseline)} {unit}"
                                               if baseline is not None else "-")}


def table(rows: list[dict]) -> str:
    head = ("figure", "fs9", "baseline", "ratio", "target", "pass")
    cells = [head] + [(r["figure"], r["fs9_text"], r["baseline_text"],
                       f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
                       r["target"], {True: "PASS", False: "FAIL", None: "-"}[r["pass"]])
                      for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    line = lambda c: "  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip()
    return "\n".join([line(cells[0]), line(tuple("-" * w for w in widths))] +
                     [line(c) for c in cells[1:]])


def rows_of(f: dict, s: dict, pt_reason: str | None) -> list[dict]:
    n, v = f["native"]["summary"], f["fs9"]["summary"]
    pt = f["pt"]["summary"] if "pt" in f else None
    view = f["view"]["summary"] if "view" in f else None
    rows = []

    def vs_pt(figure, key, unit, target="info", fmt="{:.0f}", lower=False):
        if pt is None:
            rows.append(row(figure + " (vs passthroughfs)", v[key], None, unit, target,
                            None, fmt, baseline_text=f"skipped: {pt_reason}"))
            return
        ratio = v[key] / pt[key]
        passed = None
        if target != "info":
            passed = ratio <= 0.5 if lower else ratio >= 2
        rows.append(row(figure + " (vs passthroughfs)", v[key], pt[key], unit, target, passed, fmt))

    vs_pt("1. stat/s, first pass, kernel cache expired", "stat_first_per_s", "/s", ">= 2x")
    rows.append(row("   stat/s, first pass (vs native)", v["stat_first_per_s"],
                    n["stat_first_per_s"], "/s"))
    vs_pt("   stat/s, repeated within fs9's 1 s cache", "stat_rep_per_s", "/s", ">= 2x")
    rows.append(row("   stat/s, repeated (vs native)", v["stat_rep_per_s"], n["stat_rep_per_s"], "/s"))
    vs_pt("2. open+read+close 4 KiB files/s", "read_per_s", "/s", ">= 2x")
    rows.append(row("   open+read+close 4 KiB files/s (vs native)", v["read_per_s"],
                    n["read_per_s"], "/s"))
    if "plain" in f:  # what fs9's watcher of the backing directory costs others
        p = f["plain"]["summary"]
        rows.append(row("   native in the vault (vs outside it): open+read/s", n["read_per_s"],
                        p["read_per_s"], "/s"))
        rows.append(row("   native in the vault (vs outside it): stat/s", n["stat_all_per_s"],
                        p["stat_all_per_s"], "/s"))
        w = f["watch_cpu_ms_per_1000_reads"]
        rows.append(row("   fs9 server CPU per 1,000 native reads in vault (vs outside)",
                        w["native"], w["plain"], "ms", fmt="{:.1f}"))
    vs_pt("3. listdir of 1,000 entries, per listing", "listdir_ms", "ms", "<= 0.5x", "{:.2f}",
          lower=True)
    rows.append(row("   listdir of 1,000 entries (vs native)", v["listdir_ms"], n["listdir_ms"],
                    "ms", fmt="{:.2f}"))
    rows.append(row("4. sequential read 256 MiB, warm (vs native)", v["seq_warm_mib_s"],
                    n["seq_warm_mib_s"], "MiB/s", ">= 0.5x",
                    v["seq_warm_mib_s"] >= 0.5 * n["seq_warm_mib_s"]))
    if n["seq_cold_mib_s"]:
        rows.append(row("   sequential read, cold: drop_caches (vs native)", v["seq_cold_mib_s"],
                        n["seq_cold_mib_s"], "MiB/s", ">= 0.5x",
                        v["seq_cold_mib_s"] >= 0.5 * n["seq_cold_mib_s"]))
    if pt is not None:
        rows.append(row("   sequential read, warm (vs passthroughfs)", v["seq_warm_mib_s"],
                        pt["seq_warm_mib_s"], "MiB/s"))
        if pt["seq_cold_mib_s"]:
            rows.append(row("   sequential read, cold (vs passthroughfs)", v["seq_cold_mib_s"],
                            pt["seq_cold_mib_s"], "MiB/s"))
    if view is not None:
        for i, (key, text, unit, fmt, lower) in enumerate((
                ("stat_all_per_s", "stat/s", "/s", "{:.0f}", False),
                ("read_per_s", "open+read+close 4 KiB/s", "/s", "{:.0f}", False),
                ("listdir_ms", "listdir 1,000, per listing", "ms", "{:.3f}", True),
                ("seq_warm_mib_s", "sequential read warm", "MiB/s", "{:.0f}", False))):
            # the view's speed relative to native's: for a time, native / view
            speed = n[key] / view[key] if lower else view[key] / n[key]
            rows.append(row(("5. view: " if i == 0 else "   view: ") + text, view[key], n[key],
                            unit, ">= 0.90x speed", speed >= 0.9, fmt, ratio=speed))
    if s.get("available"):
        rows.append(row("6. search p50, 10,000 docs (vs grep -rlw)", s["p50_ms"], s["grep_p50_ms"],
                        "ms", "<= 50 ms", s["p50_ms"] <= 50, "{:.2f}"))
        rows.append(row("   search p99 (vs grep -rlw p50)", s["p99_ms"], s["grep_p50_ms"], "ms",
                        fmt="{:.2f}"))
        ms = lambda x: "missed (> 5 s)" if x == float("inf") else f"{x:.0f}"
        for how, text in (("disk", "written to the backing dir"), ("mount", "written via mount")):
            p50, mx = s[f"fresh_{how}_p50_ms"], s[f"fresh_{how}_max_ms"]
            ok = mx <= 1000 if how == "disk" else None
            rows.append(row(f"   change to searchable p50 / max, {text}", p50, None, "ms",
                            "<= 1 s" if how == "disk" else "info", ok,
                            fs9_text=f"{ms(p50)} / {ms(mx)} ms", baseline_text=
                            f"n={len(s[f'fresh_{how}_ms'])}, {s[f'fresh_{how}_missed']} missed"))
        rows.append(row("   change to searchable right after a grep -r", None, None, "",
                        fs9_text=" / ".join(ms(x) for x in s["fresh_after_grep_ms"]) + " ms",
                        baseline_text=f"inotify queue {s['inotify_max_queued_events']} events"))
        racy = s["new_dir_then_file_ms"]
        seen = [x for x in racy if x is not None]
        rows.append(row("   file written at once into a new dir, found in 5 s", None, None, "",
                        fs9_text=f"{len(seen)} of {len(racy)}"
                                 + (f" (max {max(seen):.0f} ms)" if seen else "")))
    else:
        for figure in ("6. search p50, 10,000 docs", "   change to searchable"):
            rows.append(row(figure, None, None, "", "<= 50 ms" if "p50" in figure else "<= 1 s",
                            None, fs9_text="not available yet",
                            baseline_text=s.get("reason", "")[:60]))
    return rows


def main() -> int:
    why = cannot_run("vault", root="drop_caches, a confined agent", program=SYS_PY)
    if why:
        print(why, file=sys.stderr)
        return 2

    guard_signals(WATCHDOG_S)

    global ROUNDS, COLD_ROUNDS, READ_PASSES, LISTINGS, SEARCH_REPEATS, FRESH_N
    if "--quick" in sys.argv[1:]:
        ROUNDS, COLD_ROUNDS, READ_PASSES, LISTINGS, SEARCH_REPEATS, FRESH_N = 1, 1, 1, 5, 3, 3
    started = time.monotonic()
    log = lambda msg: print(f"{msg} ({time.monotonic() - started:.0f} s)", file=sys.stderr,
                            flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="fs9-vault-"))
    tmp.chmod(0o711)  # agents' uids walk through it to the mount point and their folders
    fs = Fs9Mount(tmp)
    if "--no-kernel-audit" in sys.argv[1:]:  # fs9 leaves kernel audit alone
        fs.mount_args = ["--no-kernel-audit"]
    fs.agents.chmod(0o755)
    pt = PassthroughMount(tmp, fs.vault)
    pt_reason = None if PASSTHROUGH_SRC.exists() else f"{PASSTHROUGH_SRC} not found"
    try:
        log("making the vault: 1,000 x 4 KiB, 256 MiB, 10,000 documents ...")
        made = make_vault(fs.vault, tmp / "plain")
        for attempt in range(3):  # the mount may misbehave while ops.py is being changed
            try:
                mounted_at = time.monotonic()
                fs.mount()
                break
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                log(f"fs9 mount failed ({e}); retrying")
                fs.umount()
                time.sleep(2)
        else:
            raise RuntimeError("fs9 would not mount")
        if pt_reason is None:
            try:
                pt.mount()
            except RuntimeError as e:
                pt_reason = str(e)[:80]
        script = define_agent(fs)
        log("waiting for the search index (if search/ is served) ...")
        ready = wait_search_ready(fs, mounted_at)
        runs = {"native": lambda cfg: run_as_root(script, fs.vault / "bench", cfg),
                "plain": lambda cfg: run_as_root(script, tmp / "plain", cfg),
                "fs9": lambda cfg: run_as_root(script, fs.path / "vault" / "bench", cfg)}
        if pt_reason is None:
            runs["pt"] = lambda cfg: run_as_root(script, pt.path / "bench", cfg)
        runs["view"] = lambda cfg: run_in_view(fs, cfg)
        signal.alarm(WATCHDOG_S * 2)
        log("1-5 file operations: " + ", ".join(runs) + " ...")
        f = figure_files(runs, log, fs.pid)
        signal.alarm(WATCHDOG_S)
        log("6 search ...")
        s = figure_search(fs, fs.vault, made["words"], ready)
        signal.alarm(0)
        fs.ctl("ctl", f"kill {AGENT}\n")
    finally:
        signal.alarm(0)
        unmount_all(tmp, [pt, fs], "vault")

    rows = rows_of(f, s, pt_reason)
    print(table(rows))
    elapsed = time.monotonic() - started
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus; {ROUNDS} rounds interleaved, each a "
          f"run of one timing program ({SYS_PY}) per base (native and view twice): "
          f"{STAT_PASSES} stat passes, {READ_PASSES} read passes over {N_FILES} files, "
          f"{LISTINGS} listings, {SEQ_WARM} warm reads of {BIG_MIB} MiB in 1 MiB readv() "
          f"(on-disk bases: {FAST['stat_passes']}, {FAST['read_passes']}, {FAST['listings']}, "
          f"{FAST['seq_reads']}); cold: {COLD_ROUNDS} reads each after "
          f"drop_caches; medians. Mounts: "
          + ", ".join(f"{k} {f[k]['fstype']} uid {f[k]['uid']}" for k in f if "fstype" in f[k]) + ")")
    if not s.get("available"):
        print(f"(search: not available yet: {s.get('reason')})")
    return finish(RESULTS, rows, {"files": f, "search": s}, elapsed,
                  vault_made_s=made["made_s"], passthroughfs=pt_reason or "measured")


if __name__ == "__main__":
    sys.exit(main())
