"""This checkout's fs9 against another's, side by side in one run (issue 20: vault I/O
resolved beneath a directory fd, and mail with a clearance check at every delivery,
against the code before them).

    .venv/bin/python bench/versus.py --base DIR [--rounds 9] [--ops OP,...] [--strict]

DIR is a checkout of the commit to compare with, e.g.
`git worktree add /tmp/fs9-base 885ac1e` (the commit before fd-relative vault I/O), with
a venv of its own that imports fs9 from DIR (DIR/.venv; `make deps` there makes one; or
`git archive COMMIT | tar -x -C DIR` with DIR/.venv a link to this checkout's venv: `python
-m fs9` run in DIR imports DIR's fs9 first). This
checkout's fs9 and DIR's each mount a copy of the same vault: 1,000 files of 4 KiB and a 64 MiB file. Round by round, in an
alternating order, one timing program (run by /usr/bin/python3, as root) measures on
each mount:

    stat/s     lstat of the 1,000 files, over 1.1 s after the last touch (the kernel's
               1 s entry cache has expired: each stat is a LOOKUP to fs9)
    create/s   open(O_CREAT|O_EXCL)+close of 200 new files (removed after the round)
    read/s     open + read to EOF + close of the 1,000 files
    seq MiB/s  the 64 MiB file in 1 MiB reads, warm
    getattr/s  1,000 statx(AT_STATX_FORCE_SYNC) of the mount root, agents/, a task folder
               and their entries: each a GETATTR to fs9 (issue 22: each file's time)
    listings/s 1,000 listdir of the root, agents/ and a task folder, in turn
    mail/s     500 messages to an agent `box` (cmd=cat), each: open, write, close
               agents/box/mail/new (sent and committed at close), read mail/next to EOF,
               rm mail/ID; one process, one message in flight

and the fs9 server's CPU per operation (/proc/PID/stat). Medians over the rounds; the
ratio is this checkout over the base (>= 0.9x: within 10%). Writes
bench/results/versus.json.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from foundation import REPO, Fs9Mount, cannot_run, finish, row, table, unmount_all  # noqa: E402
from vault import cpu_s, settle  # noqa: E402

RESULTS = REPO / "bench" / "results" / "versus.json"
N_FILES, FILE_BYTES, BIG_MIB, N_CREATE, N_MAIL = 1000, 4096, 64, 200, 500
N_NS = 1000  # namespace getattrs or listings a round
OPS = ("stat", "read", "create", "seq", "mail", "getattr", "readdir")

TIMEOPS = r'''
import json, os, sys, time
base, op, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
clock = time.perf_counter_ns
files = [os.path.join(base, "files", "f%04d" % i) for i in range(n)]
t0 = clock()
if op == "stat":
    for p in files:
        os.lstat(p)
elif op == "read":
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        while os.read(fd, 65536):
            pass
        os.close(fd)
elif op == "create":
    for i in range(n):
        os.close(os.open(os.path.join(base, "new", "n%04d" % i),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
elif op == "seq":
    buf, total = bytearray(1 << 20), 0
    fd = os.open(os.path.join(base, "big.bin"), os.O_RDONLY)
    t0 = clock()
    while k := os.readv(fd, [buf]):
        total += k
    os.close(fd)
    n = total / 2**20
elif op == "mail":
    mail = os.path.join(os.path.dirname(base), "agents", "box", "mail")
    for i in range(n):
        fd = os.open(os.path.join(mail, "new"), os.O_WRONLY)
        os.write(fd, b"message %d\n" % i)
        os.close(fd)
        fd = os.open(os.path.join(mail, "next"), os.O_RDONLY)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        os.close(fd)
        head = data.split(b"\n\n", 1)[0].decode()
        os.unlink(os.path.join(mail, next(l[4:] for l in head.splitlines() if l.startswith("id: "))))
elif op in ("getattr", "readdir"):
    # the mount root, agents/ and a task folder: each getattr a GETATTR to fs9 (statx with
    # AT_STATX_FORCE_SYNC passes over the kernel's attribute cache), each listing an
    # OPENDIR, READDIRPLUS... and RELEASEDIR
    import ctypes
    mnt = os.path.dirname(base)
    tasks = os.path.join(mnt, "agents", "box", "tasks")
    dirs = [mnt, os.path.join(mnt, "agents"), os.path.join(tasks, sorted(os.listdir(tasks))[0])]
    libc, buf = ctypes.CDLL(None, use_errno=True), ctypes.create_string_buffer(256)
    AT_FDCWD, FORCE_SYNC, BASIC = -100, 0x2000, 0x7ff
    paths = [os.fsencode(d) for d in dirs]
    paths += [os.fsencode(os.path.join(d, e)) for d in dirs for e in os.listdir(d)]
    t0 = clock()
    for i in range(n):
        if op == "getattr":
            if libc.statx(AT_FDCWD, paths[i % len(paths)], FORCE_SYNC, BASIC, buf) != 0:
                raise OSError(ctypes.get_errno(), "statx")
        else:
            os.listdir(dirs[i % 3])
print(json.dumps(n / ((clock() - t0) / 1e9)))
'''


class Mount(Fs9Mount):
    """An fs9 mount served by checkout `code`, run by its own venv's python."""

    def __init__(self, root: Path, code: Path) -> None:
        super().__init__(root)
        self.code = code

    def fs9(self, *args, timeout=30) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.code / ".venv/bin/python"), "-m", "fs9", *args],
                              cwd=self.code, capture_output=True, text=True, timeout=timeout)


def make_vault(vault: Path) -> None:
    (vault / "files").mkdir(parents=True)
    (vault / "new").mkdir()
    block = os.urandom(FILE_BYTES)
    for i in range(N_FILES):
        (vault / "files" / f"f{i:04d}").write_bytes(block)
    with open(vault / "big.bin", "wb") as f:
        for _ in range(BIG_MIB):
            f.write(os.urandom(1 << 20))
        os.fsync(f.fileno())


def timed(mount: Mount, op: str, n: int) -> tuple[float, float]:
    """(operations or MiB per second, the server's CPU microseconds per operation)."""
    base = str(mount.path / "vault")
    c0 = cpu_s(mount.pid)
    r = subprocess.run(["/usr/bin/python3", "-c", TIMEOPS, base, op, str(n)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"{op} on {base}: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout), (cpu_s(mount.pid) - c0) * 1e6 / n


def one_round(mount: Mount, ops: set[str]) -> dict:
    settle(mount.pid)
    out = {}
    for op in ("getattr", "readdir"):
        if op in ops:
            out[op], out[f"{op}_cpu_us"] = timed(mount, op, N_NS)
    if not ops & {"stat", "read", "create", "seq", "mail"}:
        return out
    time.sleep(1.1)  # the kernel's entry cache (1 s) expires: each stat is a LOOKUP
    out["stat"], out["stat_cpu_us"] = timed(mount, "stat", N_FILES)
    out["read"], out["read_cpu_us"] = timed(mount, "read", N_FILES)
    out["create"], out["create_cpu_us"] = timed(mount, "create", N_CREATE)
    out["seq"], _ = timed(mount, "seq", 1)
    out["mail"], out["mail_cpu_us"] = timed(mount, "mail", N_MAIL)
    for name in os.listdir(mount.vault / "new"):  # on disk: the next round starts empty
        os.unlink(mount.vault / "new" / name)
    return out


def main() -> int:
    args = sys.argv[1:]
    if "--base" not in args:
        print(__doc__)
        return 2
    base = Path(args[args.index("--base") + 1]).resolve()
    rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else 9
    ops = set(args[args.index("--ops") + 1].split(",")) if "--ops" in args else set(OPS)
    why = cannot_run("versus", root="drop_caches, mounts") or (
        None if (base / ".venv/bin/python").exists() else f"{base} has no .venv")
    if why:
        print(f"SKIP: {why}")
        return 0
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fs9-versus-"))
    os.chmod(tmp, 0o711)
    for name in ("this", "base"):
        (tmp / name).mkdir()
    mounts = {"this": Mount(tmp / "this", REPO), "base": Mount(tmp / "base", base)}
    try:
        for m in mounts.values():
            make_vault(m.vault)
            m.mount(timeout=120)
            m.ctl("ctl", "spawn box cmd=cat\n")
            m.ctl("agents/box/in", "a task, for its folder\n")
            m.served_by = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=m.code,
                                         capture_output=True, text=True).stdout.strip()
        runs = {name: [] for name in mounts}
        for i in range(rounds):
            order = list(mounts) if i % 2 == 0 else list(reversed(mounts))
            for name in order:
                runs[name].append(one_round(mounts[name], ops))
    finally:
        unmount_all(tmp, list(mounts.values()), "versus")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for name, rs in runs.items()}
    this, was = med["this"], med["base"]
    for name, m in mounts.items():
        print(f"{name}: {m.code} at {m.served_by}")
    def rows_of(op, figure, unit, target, share, cpu=None, fmt="{:.0f}"):
        """The rows of op, if measured: its rate (>= share of the base's), its CPU."""
        if op not in ops:
            return []
        got = [row(figure, this[op], was[op], unit, target, this[op] >= share * was[op],
                   fmt=fmt)]
        if cpu:
            got.append(row(f"   server CPU per {cpu}", this[f"{op}_cpu_us"],
                           was[f"{op}_cpu_us"], "us", fmt="{:.1f}"))
        return got
    rows = [
        *rows_of("stat", "stat/s, each a LOOKUP", "/s", ">= 0.9x", 0.9, "stat"),
        *rows_of("create", "create/s", "/s", ">= 0.9x", 0.9, "create"),
        *rows_of("read", "open+read+close 4 KiB/s", "/s", ">= 0.9x", 0.9, "open+read+close"),
        *rows_of("seq", "sequential read, warm", "MiB/s", ">= 0.9x", 0.9),
        *rows_of("mail", "mail/s, send + next + rm", "/s", ">= 0.95x", 0.95, "message"),
        *rows_of("getattr", "getattr/s: root, agents/, a task folder", "/s", ">= 0.95x",
                 0.95, "getattr"),
        *rows_of("readdir", "listings/s: root, agents/, a task folder", "/s", ">= 0.95x",
                 0.95, "listing"),
    ]
    print(f"this checkout ({REPO}) against {base}: 'fs9' is this, 'baseline' the base")
    print(table(rows))
    # the two mounts of one round ran back to back, so a round's ratio is what the load of
    # the moment cancels best in: their median beside the ratio of medians above
    paired = {op: statistics.median(t[op] / b[op] for t, b in zip(runs["this"], runs["base"]))
              for op in sorted(ops)}
    print("median of the rounds' ratios: " + ", ".join(f"{op} {r:.2f}x"
                                                       for op, r in paired.items()))
    elapsed = time.monotonic() - started
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus; medians of {rounds} alternating rounds)")
    return finish(RESULTS, rows, runs, elapsed, base=str(base), paired=paired)


if __name__ == "__main__":
    sys.exit(main())
