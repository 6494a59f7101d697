"""What an events cut costs (kernel/event_retention.py), beside plain SQLite in the same run.

    .venv/bin/python bench/retention.py              (a 200,000-event log)
    .venv/bin/python bench/retention.py --events N

Builds a log the way bench/bigmount.py does (a worker's finished tasks and acknowledged
mail, through fs9's kernel offline), snapshots it, and copies it four times. On each
copy, timed alone (the kernel opened and replayed from the snapshot first, untimed):

1. fs9's events cut, `events_days = 0`, no archive (`cut_events`: the candidates read in
   a worker thread, the live work checked, each batch of 20,000 one transaction with its
   trigger dropped and made again and an `events_retired` record), and its longest
   transaction (what a server's requests would wait for);
2. the same, with `archive` (the cut events copied to a synced file first);
3. baseline: a plain `DELETE FROM events WHERE seq = ?` of exactly the seqs (1) cut, one
   transaction, trigger dropped, nothing else (no search, no archive, no record);
4. for reference, the outputs cut (`outputs_days = 0`) of the same log.

The log's size before and after: the file (SQLite keeps freed pages without a VACUUM, so
it does not shrink) and its pages in use. Prints a table, writes
bench/results/retention.json, and removes what it made.
"""
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import REPO, finish, row, table  # noqa: E402
from bigmount import build  # noqa: E402

sys.path.insert(0, str(REPO))
import trio  # noqa: E402
from fs9.kernel import event_retention, retention, snapshot  # noqa: E402
from fs9.kernel.kernel import Kernel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "retention.json"
EVENTS = int(sys.argv[sys.argv.index("--events") + 1]) if "--events" in sys.argv else 200_000


def sizes(state: Path) -> tuple[int, int]:
    """(the file's bytes, bytes of its pages in use)."""
    db = sqlite3.connect(state / "log.sqlite")
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages, free, size = (db.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_count", "freelist_count", "page_size"))
    finally:
        db.close()
    return (state / "log.sqlite").stat().st_size, (pages - free) * size


def seqs(state: Path) -> set[int]:
    db = sqlite3.connect(state / "log.sqlite")
    try:
        return {r[0] for r in db.execute("SELECT seq FROM events")}
    finally:
        db.close()


PAUSES: list[float] = []  # each transaction of a cut: the serving thread waits for it


def with_kernel(root: Path, cut) -> tuple[float, int]:
    """Open the kernel on root's state (replayed from its snapshot), time `cut(k)`."""
    k = Kernel(str(root / "state"), str(root / "agents"))
    inner = k.log.cut

    def timed(*args, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kw)
        finally:
            PAUSES.append(time.perf_counter() - t0)
    k.log.cut = timed
    try:
        k._replay()
        t0 = time.perf_counter()
        n = trio.run(cut, k)
        return time.perf_counter() - t0, n
    finally:
        k.log.close()


def main() -> int:
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fs9-bench-retention-", dir="/tmp"))
    try:
        base = tmp / "base"
        (base / "agents").mkdir(parents=True)
        b = build(base, EVENTS)
        k = Kernel(str(base / "state"), str(base / "agents"))
        k._replay()
        snapshot.write_now(k)  # (the plan the cut reads: at the last event)
        k.log.close()
        copies = {}
        for name in ("events", "archived", "delete", "outputs"):
            shutil.copytree(base, tmp / name)
            copies[name] = tmp / name
        before = sizes(base / "state")
        all_seqs = seqs(base / "state")
        later = time.time() + 1
        m = {}
        def events_cut(archive: str):
            return lambda k: event_retention.cut_events(
                k, retention.Policy(events_days=0, archive=archive), now=later)
        m["events_s"], cut = with_kernel(copies["events"], events_cut(""))
        gone = sorted(all_seqs - seqs(copies["events"] / "state"))
        m["pause_s"] = max(PAUSES)  # (the longest transaction of the cut, of BATCH events)
        m["archived_s"], cut_a = with_kernel(copies["archived"],
                                             events_cut(str(tmp / "archive")))
        m["outputs_s"], tasks = with_kernel(copies["outputs"], lambda k: retention.cut_outputs(
            k, retention.Policy(outputs_days=0), now=later))
        db = sqlite3.connect(copies["delete"] / "state" / "log.sqlite", isolation_level=None)
        try:
            t0 = time.perf_counter()
            db.execute("BEGIN")
            db.execute("DROP TRIGGER events_no_delete")
            db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in gone])
            db.execute("COMMIT")
            m["delete_s"] = time.perf_counter() - t0
        finally:
            db.close()
        after, after_delete = sizes(copies["events"] / "state"), sizes(copies["delete"] / "state")
        mib = 1 << 20
        rows = [
            row(f"events cut, {cut:,} of {len(all_seqs):,} events (vs plain DELETE)",
                m["events_s"], m["delete_s"], "s"),
            row("events cut with archive (vs plain DELETE)", m["archived_s"], m["delete_s"], "s"),
            row(f"its longest transaction, {event_retention.BATCH:,} events (vs plain DELETE"
                " of them all)", m["pause_s"], m["delete_s"], "s"),
            row(f"outputs cut, {tasks:,} tasks (vs plain DELETE of events)", m["outputs_s"],
                m["delete_s"], "s"),
            row("log pages in use after the cut (vs before)", after[1] / mib, before[1] / mib,
                "MiB", fmt="{:.1f}"),
            row("log file after the cut, no VACUUM (vs before)", after[0] / mib,
                before[0] / mib, "MiB", fmt="{:.1f}"),
            row("log pages in use after plain DELETE (vs before)", after_delete[1] / mib,
                before[1] / mib, "MiB", fmt="{:.1f}"),
        ]
        print(f"retention: {b['events']:,} events ({b['tasks']:,} tasks, {b['messages']:,} "
              f"messages); {cut:,} cut ({cut_a:,} with archive)", file=sys.stderr)
        print(table(rows))
        return finish(RESULTS, rows, {**m, "cut": cut, "cut_archived": cut_a, "tasks": tasks,
                                      "before": before, "after": after,
                                      "after_delete": after_delete, "build": b},
                      time.monotonic() - started)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
