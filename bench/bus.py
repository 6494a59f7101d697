"""fs9 bus benchmark: mail and topics, each figure beside a baseline measured in the same run.

    .venv/bin/python bench/bus.py           (about 5 minutes)
    .venv/bin/python bench/bus.py --quick   (under a minute: one repeat, 100,000-event logs)
    .venv/bin/python bench/bus.py --strict  (exit 1 when a target is missed)
    .venv/bin/python bench/bus.py --mail    (figure 1 only)
    .venv/bin/python bench/bus.py --fanout  (figure 2 only: fan-out and topic delivery)
    .venv/bin/python bench/bus.py --fanout --vs TREE  (and TREE's fs9 in the same runs:
        a worktree, or `git archive` of a commit; without a .venv, this one's python)

Mounts fs9 for real (bench/foundation.py's Fs9Mount: a temporary directory, the
mount point beside the state directory, never inside it) and measures:

1. mail, one sender, one receiver, durable, beside its peers (bench/peers.py: NATS
   JetStream and Redis Streams, servers started for this run; autogen-core when
   installed; a named pipe and a Maildir on tmpfs as floors), every kind carrying
   MSG_BYTES-byte messages (fs9: a body of that size). fs9's sender is this process;
   each message is an open/write/close of agents/box/mail/new, and close returns once
   the message is committed to the event log. The receiver is a child process
   looping: read mail/next to EOF, take the id from its headers, rm mail/ID (which
   returns once the acknowledgement is committed).
   - throughput: N messages sent back to back while the receiver runs; messages/s
     from the first send until the receiver has acknowledged the last. Median of
     repeats, each interleaved with the peers.
   - delivery latency: one message at a time to a receiver blocked waiting for it,
     from just before the send until that wait returns (CLOCK_MONOTONIC in both
     processes, nothing subtracted).
   - in batches: BATCH_N messages sent BATCH_K lines a write of mail/batch; the
     receiver reads mail/batch (all that is pending) and acknowledges what it read in
     one write of mail/ack; beside Redis Streams one by one and pipelined (BATCH_K
     XADDs a round trip, XREADGROUP of all pending, one XACK).
   Every fs9 figure is printed as a ratio to each peer, and what an acknowledged
   message survives in each is printed under the table (peers.GUARANTEES).
2. topic fan-out: one publisher writes events (one write, one event) to
   topics/fan for a few seconds, with 1, 10 and 100 subscriber processes each
   reading topics/fan and counting lines; events/s delivered, summed over the
   subscribers and per subscriber (median of repeats). A subscriber more than
   fs9's ring behind is told how many it missed; those are counted as dropped,
   not delivered. Baseline: the publisher writes each event into one pipe per
   subscriber (which never drops: a full pipe blocks the publisher). Target: 10
   subscribers >= FAN_TARGET events/s, none dropped. Also the delivery latency of
   one event at a time to one blocked subscriber, events LAT_GAPS apart (a quiet
   topic; a stream, whose events fs9 holds for a batch), beside a pipe.
3. log scale: figure 1's mail throughput with about 1,000 and about 1,000,000
   events already in the log. Two big logs, each on its own mount: one filled
   by writing `run x` lines (many per write) to a stopped agent's ctl, so the
   kernel also holds a million queued tasks in memory; one filled by publishing
   to a topic nobody reads, so it holds next to nothing. Each small log is a
   fresh mount filled with 1,000 `run x`. Runs interleaved; msg/s is messages
   over time summed across the runs, since a big server pauses now and then;
   during each run a probe process reads the root ctl every 10 ms and the
   longest wait is shown. The fill pauses every FILL_BURST events so that the
   server's checkpointer catches up and the WAL restarts (under a steady stream
   of writes it never does and grows by ~9 KB an event). Also the time to mount
   each log again (replay).

Prints a table and writes bench/results/bus.json. Every mount is unmounted at
the end (fusermount3 -u -z as a fallback) and every child process is killed.
"""
import errno
import os
import re
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (REPO, SETTLE_S, Fs9Mount, cannot_run, finish, mounted, pct,  # noqa: E402
                        row, table)
from peers import (GUARANTEES, Child, Fifo, Maildir, NatsPeer,  # noqa: E402
                   RedisPeer, autogen_missing, autogen_run, ends, message)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "bus.json"

MAIL_N, MAIL_REPEATS = 1000, 5  # messages in one throughput run; runs per kind
BATCH_N, BATCH_K = 20_000, 100  # messages in one batch run; sent in one call
LAT_ROUNDS, LAT_PER_ROUND, LAT_WARM = 5, 100, 10
FAN_SUBS, FAN_S, FAN_REPEATS = (1, 10, 100), 2.0, 3
FAN_TARGET = 30_000  # events/s delivered in total to 10 subscribers (issue 17)
# topic delivery latency: events this far apart (a quiet topic wakes its reader at once;
# events closer than topic.py's QUIET_S are held for a batch, HOLD_S at most)
LAT_GAPS = {"quiet": 0.01, "stream": 0.001}
VS = ""  # --fanout --vs TREE: the other tree's name, in the rows
LOG_SMALL, LOG_BIG, LOG_REPEATS = 1_000, 1_000_000, 4
LOG_FILLS = ("tasks", "events")  # what fills a big log (see fill())
PROBE_S = 0.01  # figure 3: a ctl read this often during each run, to see the server stall
FILL_BUDGET_S = 150  # each big log gets what fits in this; the output says so if short
FILL_LINES = 4000  # `run x` lines in one write
FILL_BURST, FILL_PAUSE_S = 200_000, 2.5  # pause between bursts: the checkpointer catches up
WATCHDOG_S = 150  # no single figure may take longer (figure 3: plus the fill budget)
RUN = b"run x\n"
OVERFLOW = re.compile(rb"fs9: overflow: (\d+) events dropped\n")


body = message  # fs9's message i: a MSG_BYTES body ending in its number


# --- fs9's mail ------------------------------------------------------------------

class Fs9Mail:
    name = "fs9"

    def __init__(self, fs: Fs9Mount, agent: str = "box") -> None:
        fs.ctl("ctl", f"spawn {agent} cmd=cat\n")
        self.dir = fs.path / "agents" / agent / "mail"
        self.new = self.dir / "new"

    def send(self, i: int) -> None:
        fd = os.open(self.new, os.O_WRONLY)
        try:
            os.write(fd, body(i))
        finally:
            os.close(fd)  # the message is sent (and committed) at close

    def receiver(self, n: int, each: bool) -> Child:
        mail, nxt = self.dir, self.dir / "next"

        def loop(ready_w, result_w):
            backlog = bad = 0
            if not each:
                os.write(ready_w, b"r")
            for i in range(n):
                if each:
                    os.write(ready_w, b"r")
                fd = os.open(nxt, os.O_RDONLY)
                try:
                    data = os.read(fd, 65536)  # blocks until a message is pending
                    t1 = time.perf_counter_ns()
                    while chunk := os.read(fd, 65536):
                        data += chunk
                finally:
                    os.close(fd)
                if each:
                    os.write(result_w, struct.pack("q", t1))
                head = data.split(b"\n\n", 1)[0].decode()
                msg_id = next(ln[4:] for ln in head.splitlines() if ln.startswith("id: "))
                os.unlink(mail / msg_id)  # rm mail/ID: acknowledged without listing
                backlog += 0  # (no listing any more: the backlog is not observed)
                bad += not ends(data, i)
            os.write(result_w, struct.pack("qqq", time.perf_counter_ns(), backlog, bad))
        return Child(loop)



class Fs9Held:
    """fs9's mail with its files held open (kernel/bus/mailstream.py), as a socket's
    client holds its connection: the sender writes each message as one line to
    mail/batch, open for the whole run (each write returns once its message is
    committed); the receiver holds mail/stream and mail/ack open: one read gives it a
    message, one write of its id acknowledges it (returning once committed)."""
    name = "fs9 held open"

    def __init__(self, fs: Fs9Mount, agent: str = "held") -> None:
        fs.ctl("ctl", f"spawn {agent} cmd=cat\n")
        self.dir = fs.path / "agents" / agent / "mail"
        self.fd = os.open(self.dir / "batch", os.O_WRONLY)

    def send(self, i: int) -> None:
        os.write(self.fd, body(i))  # one line, one message

    def close(self) -> None:
        """Close the sender's file (before its mount goes: once only)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def receiver(self, n: int, each: bool) -> Child:
        box = self.dir

        def loop(ready_w, result_w):
            stream = os.open(box / "stream", os.O_RDONLY)
            ack = os.open(box / "ack", os.O_WRONLY)
            got = bad = 0
            rest = b""
            if not each:
                os.write(ready_w, b"r")
            while got < n:
                if each:
                    os.write(ready_w, b"r")
                chunk = os.read(stream, 65536)  # blocks until a message is pending
                t1 = time.perf_counter_ns()
                if each:
                    os.write(result_w, struct.pack("q", t1))
                *rows, rest = (rest + chunk).split(b"\n")
                for line in rows:
                    msg_id, _, text = line.split(b"\t", 2)
                    os.write(ack, msg_id)  # acknowledged (committed) when it returns
                    bad += not ends(text + b"\n", got)
                    got += 1
            os.write(result_w, struct.pack("qqq", time.perf_counter_ns(), 0, bad))
        return Child(loop)



# --- figure 1: mail -----------------------------------------------------------------

def mail_rate(box, n: int) -> dict:
    """Messages/s of n sends to box while its receiver takes and acknowledges them."""
    child = box.receiver(n, each=False)
    try:
        child.announced()
        time.sleep(SETTLE_S)
        t0 = time.perf_counter_ns()
        for i in range(n):
            box.send(i)
        ts = time.perf_counter_ns()
        t_end, backlog, bad = child.report("qqq")
    finally:
        child.close()
    if bad:
        raise RuntimeError(f"{box.name}: {bad} of {n} messages out of order")
    return {"per_s": n / ((t_end - t0) / 1e9), "send_per_s": n / ((ts - t0) / 1e9),
            "mean_backlog": backlog / n}


class Fs9Batch:
    """fs9's batch path (kernel/bus/batch.py): BATCH_K messages, one line each, in one
    write of mail/batch (returning once all are committed); the receiver reads
    mail/batch (every pending message, a line each) and acknowledges what it read in
    one write of mail/ack."""
    name = "fs9 batch"

    def __init__(self, fs: Fs9Mount, agent: str = "bulk") -> None:
        fs.ctl("ctl", f"spawn {agent} cmd=cat\n")
        self.dir = fs.path / "agents" / agent / "mail"

    def send_batch(self, first: int, k: int) -> None:
        fd = os.open(self.dir / "batch", os.O_WRONLY)
        try:
            os.write(fd, b"".join(body(i) for i in range(first, first + k)))
        finally:
            os.close(fd)

    def receiver(self, n: int) -> Child:
        batch, ack = self.dir / "batch", self.dir / "ack"

        def loop(ready_w, result_w):
            got = bad = 0
            os.write(ready_w, b"r")
            while got < n:
                fd = os.open(batch, os.O_RDONLY)
                try:
                    data = b""
                    while chunk := os.read(fd, 1 << 20):  # blocks until mail is pending
                        data += chunk
                finally:
                    os.close(fd)
                ids = []
                for line in data.splitlines():
                    msg_id, _, text = line.split(b"\t", 2)
                    bad += not ends(text + b"\n", got)
                    ids.append(msg_id)
                    got += 1
                fd = os.open(ack, os.O_WRONLY)
                try:
                    os.write(fd, b" ".join(ids))
                finally:
                    os.close(fd)
            os.write(result_w, struct.pack("qqq", time.perf_counter_ns(), 0, bad))
        return Child(loop)


class RedisBatch:
    """Redis Streams the batch way: a pipeline of BATCH_K XADDs; XREADGROUP of all that
    is pending, one XACK of it all."""
    name = "Redis Streams batched"

    def __init__(self, redis: RedisPeer) -> None:
        self.redis = redis

    def send_batch(self, first: int, k: int) -> None:
        self.redis.send_batch(first, k)

    def receiver(self, n: int) -> Child:
        return self.redis.batch_receiver(n)


def batch_rate(box, n: int) -> dict:
    """Messages/s of n messages sent BATCH_K a call while the receiver takes them in
    batches and acknowledges each batch at once."""
    child = box.receiver(n)
    try:
        child.announced()
        time.sleep(SETTLE_S)
        t0 = time.perf_counter_ns()
        for first in range(0, n, BATCH_K):
            box.send_batch(first, min(BATCH_K, n - first))
        t_end, _, bad = child.report("qqq")
    finally:
        child.close()
    if bad:
        raise RuntimeError(f"{box.name}: {bad} of {n} messages out of order")
    return {"per_s": n / ((t_end - t0) / 1e9)}


def figure_batch_rate(boxes: list) -> dict:
    runs = {b.name: [] for b in boxes}
    for box in boxes:  # warm up
        batch_rate(box, BATCH_K)
    for r in range(MAIL_REPEATS):
        for box in boxes[r % len(boxes):] + boxes[:r % len(boxes)]:
            runs[box.name].append(batch_rate(box, BATCH_N))
    return {name: {"per_s": statistics.median(x["per_s"] for x in rs), "runs": rs}
            for name, rs in runs.items()}


def figure_mail_rate(boxes: list, autogen: bool) -> dict:
    runs = {b.name: [] for b in boxes}
    if autogen:
        runs["autogen-core"] = []
    for box in boxes:  # warm up
        mail_rate(box, 50)
    if autogen:
        autogen_run(50)
    for r in range(MAIL_REPEATS):
        order = boxes[r % len(boxes):] + boxes[:r % len(boxes)]
        for box in order:
            runs[box.name].append(mail_rate(box, MAIL_N))
        if autogen:
            runs["autogen-core"].append({"per_s": MAIL_N / autogen_run(MAIL_N)["elapsed_s"]})
    return {name: {"per_s": statistics.median(x["per_s"] for x in rs), "runs": rs}
            for name, rs in runs.items()}


def figure_mail_latency(boxes: list, autogen: bool) -> dict:
    total = LAT_WARM + LAT_ROUNDS * LAT_PER_ROUND
    kinds = {b.name: ([], []) for b in boxes}  # (delivery ms, send ms)
    if autogen:
        kinds["autogen-core"] = ([], [])
    readers = {}
    try:
        for box in boxes:
            readers[box.name] = box.receiver(total, each=True)
        sent = dict.fromkeys(readers, 0)

        def samples(box, k, lat, slat):
            reader = readers[box.name]
            for _ in range(k):
                reader.wait_blocked()
                t0 = time.perf_counter_ns()
                box.send(sent[box.name])
                ts = time.perf_counter_ns()
                t1 = reader.woke_at()
                sent[box.name] += 1
                lat.append((t1 - t0) / 1e6)
                slat.append((ts - t0) / 1e6)

        for box in boxes:
            samples(box, LAT_WARM, [], [])
        if autogen:
            autogen_run(LAT_WARM)
        for _ in range(LAT_ROUNDS):
            for box in boxes:
                samples(box, LAT_PER_ROUND, *kinds[box.name])
            if autogen:
                a = autogen_run(LAT_PER_ROUND)
                kinds["autogen-core"][0].extend(a["lat_ms"])
                kinds["autogen-core"][1].extend(a["send_ms"])
        for name, reader in readers.items():
            _, _, bad = reader.report("qqq", timeout=10)
            if bad:
                raise RuntimeError(f"{name}: {bad} messages out of order")
    finally:
        for reader in readers.values():
            reader.close()
    return {name: {"n": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                   "send_p50_ms": pct(slat, 50), "send_p99_ms": pct(slat, 99)}
            for name, (lat, slat) in kinds.items()}


# --- figure 2: topic fan-out ----------------------------------------------------------

def subscriber(opener):
    """Count event lines until the `end` event; report (time, events, notes, dropped)."""
    def loop(ready_w, result_w):
        fd = opener()
        os.write(ready_w, b"r")
        lines = notes = dropped = 0
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("EOF on a subscription")
            lines += chunk.count(b"\n")
            if b"fs9: overflow" in chunk:  # a note starts a read: never split
                for m in OVERFLOW.finditer(chunk):
                    notes += 1
                    dropped += int(m.group(1))
            tail = (tail + chunk)[-4:]
            if tail == b"end\n":
                break
        os.write(result_w, struct.pack("qqqq", time.perf_counter_ns(), lines - notes - 1,
                                       notes, dropped))
    return loop


def fanout_run(k: int, topic: Path | None, seconds: float) -> dict:
    """One publisher, k subscribers for `seconds`: to fs9's topic, or (topic None)
    through one pipe per subscriber."""
    children, pipes = [], []
    try:
        if topic is None:
            pipes = [os.pipe() for _ in range(k)]

            def opener(j):
                def open_mine():
                    for n, (r, w) in enumerate(pipes):
                        os.close(w)
                        if n != j:
                            os.close(r)
                    return pipes[j][0]
                return open_mine
            for j in range(k):
                children.append(Child(subscriber(opener(j))))
            for r, _ in pipes:
                os.close(r)
            fds = [w for _, w in pipes]
        else:
            for _ in range(k):
                children.append(Child(subscriber(lambda: os.open(topic, os.O_RDONLY))))
        for c in children:
            c.announced()  # subscribed: a subscription starts at open
        if topic is not None:
            fds = [os.open(topic, os.O_WRONLY)]
        try:
            i = 0
            t0 = time.perf_counter_ns()
            end = t0 + int(seconds * 1e9)
            while True:
                ev = b"ev %010d\n" % i
                for fd in fds:
                    os.write(fd, ev)
                i += 1
                if i % 16 == 0 and time.perf_counter_ns() >= end:
                    break
            tp = time.perf_counter_ns()
            for fd in fds:
                os.write(fd, b"end\n")
        finally:
            for fd in fds:
                os.close(fd)
        reports = [c.report("qqqq") for c in children]
    finally:
        for c in children:
            c.close()
    delivered = sum(r[1] for r in reports)
    dropped = sum(r[3] for r in reports)
    t_last = max(r[0] for r in reports)
    lost = k * i - delivered - dropped
    if lost:
        raise RuntimeError(f"fan-out to {k}: {lost} events neither delivered nor reported dropped")
    per_s = delivered / ((t_last - t0) / 1e9)
    return {"published": i, "publish_per_s": i / ((tp - t0) / 1e9), "delivered": delivered,
            "dropped": dropped, "notes": sum(r[2] for r in reports), "per_s": per_s,
            "per_sub_per_s": per_s / k, "drain_s": (t_last - tp) / 1e9}


def topic_latency(topic: Path | None, n: int, gap_s: float) -> list[float]:
    """ms from just before each of n writes, gap_s apart, until one subscriber's read
    returns that event: fs9's topic, or (topic None) a pipe."""
    r = w = None
    if topic is None:
        r, w = os.pipe()

    def loop(ready_w, result_w):
        if w is not None:
            os.close(w)
        fd = os.open(topic, os.O_RDONLY) if topic is not None else r
        os.write(ready_w, b"r")
        got, at = 0, []
        while got < n:
            chunk = os.read(fd, 65536)
            now = time.perf_counter_ns()
            k = chunk.count(b"\n")
            at += [now] * k
            got += k
        os.write(result_w, struct.pack(f"{n}q", *at[:n]))
    child = Child(loop)
    try:
        if r is not None:
            os.close(r)
        child.announced()
        fd = os.open(topic, os.O_WRONLY) if topic is not None else w
        try:
            time.sleep(SETTLE_S * 5)  # its first read waits (and the topic is quiet)
            sent = []
            for i in range(n):
                sent.append(time.perf_counter_ns())
                os.write(fd, b"lat %06d\n" % i)
                time.sleep(gap_s)
        finally:
            os.close(fd)
        got = child.report(f"{n}q")
    finally:
        child.close()
    return [(b - a) / 1e6 for a, b in zip(sent, got)]


def rotated(kinds: list, r: int) -> list:
    """kinds in turn, starting one further each round (each meets the same drift)."""
    return kinds[r % len(kinds):] + kinds[:r % len(kinds)]


def figure_topic_latency(fs: Fs9Mount, vs: Fs9Mount | None = None) -> dict:
    """One subscriber, events one at a time: LAT_GAPS apart (a quiet topic: each wakes it
    at once; a stream: each held for a batch, topic.py's HOLD_S); vs: another tree's fs9
    in the same rounds."""
    kinds = [("fs9", fs.path / "topics" / "lat"), ("pipe", None)]
    if vs is not None:
        kinds.insert(1, ("vs", vs.path / "topics" / "lat"))
    for _, topic in kinds:
        if topic is not None:
            topic.touch()
    out = {}
    for name, gap in LAT_GAPS.items():
        runs = {kind: [] for kind, _ in kinds}
        for r in range(LAT_ROUNDS):
            for kind, t in rotated(kinds, r):
                runs[kind] += topic_latency(t, LAT_PER_ROUND, gap)
        out[name] = {kind: {"p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "n": len(ms)}
                     for kind, ms in runs.items()}
    return out


def figure_fanout(fs: Fs9Mount, vs: Fs9Mount | None = None) -> dict:
    """vs: another tree's fs9 (--vs TREE), a run of it beside each of this tree's."""
    kinds = [("fs9", fs.path / "topics" / "fan"), ("pipes", None)]
    if vs is not None:
        kinds.insert(1, ("vs", vs.path / "topics" / "fan"))
    for _, topic in kinds:
        if topic is not None:
            topic.touch()
            fanout_run(1, topic, 0.2)  # warm up
    fanout_run(1, None, 0.2)
    out = {"latency": figure_topic_latency(fs, vs)}
    for k in FAN_SUBS:
        runs = {kind: [] for kind, _ in kinds}
        for r in range(FAN_REPEATS):
            for name, t in rotated(kinds, r):
                runs[name].append(fanout_run(k, t, FAN_S))
        out[k] = {name: {"per_s": statistics.median(x["per_s"] for x in rs),
                         "per_sub_per_s": statistics.median(x["per_sub_per_s"] for x in rs),
                         "dropped_frac": sum(x["dropped"] for x in rs) /
                         max(1, sum(x["published"] * k for x in rs)),
                         "runs": rs}
                  for name, rs in runs.items()}
    return out


# --- figure 3: log scale -------------------------------------------------------------

def log_events(fs: Fs9Mount) -> int:
    with open(fs.path / "ctl") as f:
        return int(dict(w.split("=", 1) for w in f.read().split() if "=" in w)["events"])


def wal_bytes(fs: Fs9Mount) -> int:
    try:
        return (fs.state / "log.sqlite-wal").stat().st_size
    except OSError:
        return 0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fill(fs: Fs9Mount, target: int, budget_s: float, how: str = "tasks") -> dict:
    """Grow the log to ~target events. tasks: `run x` lines (many per write) to
    stopped agents, so each is a queued task the kernel keeps in memory (a queue takes
    at most 20,000 of the operator's: EDQUOT, then the next agent); events: one write
    per event to a topic nobody reads (the kernel keeps the last 1024)."""
    if how == "tasks":
        fillers = iter(range(1 << 30))

        def new_filler() -> int:
            name = f"filler{next(fillers)}"
            fs.ctl("ctl", f"spawn {name} cmd=cat\n")
            fs.ctl(f"agents/{name}/ctl", "stop\n")  # queued tasks start nothing
            return os.open(fs.path / "agents" / name / "ctl", os.O_WRONLY)
        fd = new_filler()

        def write(k):
            nonlocal fd
            try:
                os.write(fd, RUN * k)  # one task_queued event per line
            except OSError as e:
                if e.errno != errno.EDQUOT:
                    raise
                os.close(fd)
                fd = new_filler()
                os.write(fd, RUN * k)
    else:
        topic = fs.path / "topics" / "filler"
        topic.touch()
        fd = os.open(topic, os.O_WRONLY)

        def write(k):
            for _ in range(k):
                os.write(fd, b"x\n")  # one published event per write
    have = start_events = log_events(fs)
    start = time.monotonic()
    paused = 0.0
    since_pause = 0
    try:
        while have < target and time.monotonic() - start < budget_s:
            k = min(FILL_LINES, target - have)
            write(k)
            have += k
            since_pause += k
            if since_pause >= FILL_BURST and have < target:
                time.sleep(FILL_PAUSE_S)  # the checkpointer catches up; the WAL restarts
                paused += FILL_PAUSE_S
                since_pause = 0
    finally:
        os.close(fd)
    elapsed = time.monotonic() - start
    events = log_events(fs)
    return {"how": how, "events": events, "target": target, "seconds": elapsed,
            "paused_s": paused, "per_s": (events - start_events) / max(1e-9, elapsed - paused),
            "short": events < target * 0.99, "rss_bytes": rss_bytes(fs.pid),
            "wal_bytes": wal_bytes(fs)}


def wait_exit(pid: int | None, timeout: float) -> float:
    """Seconds until pid has exited (or timeout)."""
    t0 = time.monotonic()
    while pid and time.monotonic() - t0 < timeout:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.05)
    return time.monotonic() - t0


class Prober:
    """A child reading the root ctl every PROBE_S while a run goes on: how long the
    server stopped answering (a ctl read normally takes a fraction of a ms)."""

    def __init__(self, fs: Fs9Mount) -> None:
        self.stop_r, self.stop_w = os.pipe()
        ctl, stop_r = fs.path / "ctl", self.stop_r

        def loop(ready_w, result_w):
            worst, slow, times = 0, 0, []
            os.write(ready_w, b"r")
            while not select.select([stop_r], [], [], PROBE_S)[0]:
                t0 = time.perf_counter_ns()
                with open(ctl, "rb") as f:
                    f.read()
                dt = time.perf_counter_ns() - t0
                worst = max(worst, dt)
                slow += dt > 100_000_000
                times.append(dt)
            os.write(result_w, struct.pack("qqq", worst, slow, len(times)))
        self.child = Child(loop)
        self.child.announced()

    def stop(self) -> dict:
        try:
            os.write(self.stop_w, b"s")
            worst, slow, n = self.child.report("qqq", timeout=30)
        finally:
            self.child.close()
            os.close(self.stop_r)
            os.close(self.stop_w)
        return {"worst_ms": worst / 1e6, "over_100ms": slow, "probes": n}


def probed_rate(fs: Fs9Mount, box: Fs9Mail, n: int) -> dict:
    before = log_events(fs)
    probe = Prober(fs)
    try:
        r = mail_rate(box, n)
    finally:
        p = probe.stop()
    return {**r, **p, "events_before": before}


def total_rate(runs: list[dict]) -> float:
    """Messages over time summed across runs (the harmonic mean of equal-sized runs):
    a server that pauses now and then is charged its pauses, whichever run they hit."""
    return len(runs) / sum(1 / x["per_s"] for x in runs)


def replay_time(fs: Fs9Mount) -> dict:
    """Unmount, wait for the server to exit, mount again: seconds for each."""
    pid = fs.pid
    t0 = time.monotonic()
    fs.umount()
    umount_s = time.monotonic() - t0
    exit_s = umount_s + wait_exit(pid, 120)
    t0 = time.monotonic()
    fs.mount(timeout=300)
    return {"umount_s": umount_s, "exit_s": exit_s, "mount_s": time.monotonic() - t0}


def figure_log_scale(new_mount, budget_s: float) -> dict:
    big = {}
    for how in LOG_FILLS:
        fs = new_mount(f"big-{how}")
        fs.mount()
        print(f"    filling a log with {LOG_BIG:,} events ({how}) ...", file=sys.stderr,
              flush=True)
        big[how] = {"fs": fs, "fill": fill(fs, LOG_BIG, budget_s, how), "runs": []}
        big[how]["box"] = Fs9Mail(fs)
    time.sleep(FILL_PAUSE_S)  # let the checkpointers catch up, as between bursts
    for b in big.values():
        mail_rate(b["box"], 50)  # warm up
    small_runs, small_fills, small_replays = [], [], []
    kinds = ["small", *LOG_FILLS]
    for r in range(LOG_REPEATS):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            if kind != "small":
                b = big[kind]
                b["runs"].append(probed_rate(b["fs"], b["box"], MAIL_N))
                continue
            small = new_mount(f"small{r}")
            small.mount()
            try:
                small_fills.append(fill(small, LOG_SMALL, 30))
                box = Fs9Mail(small)
                mail_rate(box, 50)  # warm up, as on the big logs
                small_runs.append(probed_rate(small, box, MAIL_N))
                small_replays.append(replay_time(small))
            finally:
                small.umount()
    out = {"small": {"per_s": total_rate(small_runs),
                     "median_per_s": statistics.median(x["per_s"] for x in small_runs),
                     "runs": small_runs, "fills": small_fills, "replays": small_replays,
                     "mount_s": statistics.median(x["mount_s"] for x in small_replays)}}
    for how, b in big.items():
        b["events"] = log_events(b["fs"])
        b["replay"] = replay_time(b["fs"])
        b["fs"].umount()
        out[how] = {"per_s": total_rate(b["runs"]),
                    "median_per_s": statistics.median(x["per_s"] for x in b["runs"]),
                    "runs": b["runs"], "fill": b["fill"], "events": b["events"],
                    "replay": b["replay"], "mount_s": b["replay"]["mount_s"]}
    return out


# --- report ---------------------------------------------------------------------------

PEERS = ("NATS JetStream", "Redis Streams", "autogen-core", "fifo", "Maildir+inotify")


HELD, CLASSIC = "fs9 held open", "fs9"  # the two one-by-one protocols (Fs9Held, Fs9Mail)
SAID = {HELD: "held open: batch line->stream read->ack write",
        CLASSIC: "classic: mail/new->cat next->rm"}


def mail_rows(rate: dict, lat: dict) -> list[dict]:
    """fs9's mail, each of its one-by-one protocols, as a ratio to each peer: msg/s,
    delivery p50 and p99, send p50. Targets: NATS's msg/s and delivery p50 (issue 17),
    for the held-open protocol (what a program holding a socket would be compared with);
    the classic one (a process per step from a shell) is shown beside them."""
    rows, first = [], True
    for kind in (HELD, CLASSIC):
        if kind not in rate:
            continue
        f, fr = lat[kind], rate[kind]["per_s"]
        for name in (p for p in PEERS if p in rate):
            nats = name == "NATS JetStream" and kind == HELD
            label = "1. mail" if first else "   mail"
            first = False
            rows.append(row(f"{label} msg/s, {SAID[kind]} (vs {name})", fr,
                            rate[name]["per_s"], "/s", ">= 1.0x" if nats else "info",
                            fr >= rate[name]["per_s"] if nats else None, fmt="{:.0f}"))
        for name in (p for p in PEERS if p in lat):
            b, nats = lat[name], name == "NATS JetStream" and kind == HELD
            rows.append(row(f"   delivery p50, {kind} (vs {name})", f["p50_ms"], b["p50_ms"],
                            "ms", "<= 1.0x" if nats else "info",
                            f["p50_ms"] <= b["p50_ms"] if nats else None))
            rows.append(row(f"   delivery p99, {kind} (vs {name})", f["p99_ms"], b["p99_ms"],
                            "ms"))
    fb = rate["batch"]["fs9 batch"]["per_s"]
    for name in ("Redis Streams", "Redis Streams batched", "NATS JetStream"):
        peer = rate["batch"].get(name) or rate.get(name)
        if peer is not None:
            redis = name == "Redis Streams"
            rows.append(row(f"   mail msg/s, fs9 batches of {BATCH_K} (vs {name})", fb,
                            peer["per_s"], "/s", ">= 1.0x" if redis else "info",
                            fb >= peer["per_s"] if redis else None, fmt="{:.0f}"))
    for kind in (k for k in (HELD, CLASSIC) if k in lat):
        for name in ("NATS JetStream", "Redis Streams", "Maildir+inotify"):
            if name in lat:
                rows.append(row(f"   send acknowledged p50, {kind} (vs {name})",
                                lat[kind]["send_p50_ms"], lat[name]["send_p50_ms"], "ms"))
    return rows


def fan_rows(fan: dict) -> list[dict]:
    rows = []
    for n, k in enumerate(FAN_SUBS):
        a, b = fan[k]["fs9"], fan[k]["pipes"]
        label = "2. topic" if n == 0 else "   topic"
        ten = k == 10
        rows.append(row(f"{label} events/s delivered, {k} subs (vs pipes)", a["per_s"], b["per_s"],
                        "/s", f">= {FAN_TARGET}/s" if ten else "info",
                        a["per_s"] >= FAN_TARGET and a["dropped_frac"] == 0 if ten else None,
                        fmt="{:.0f}"))
        rows.append(row(f"   per subscriber, {k} subs (vs pipes)", a["per_sub_per_s"],
                        b["per_sub_per_s"], "/s", fmt="{:.0f}"))
        if "vs" in fan[k]:
            rows.append(row(f"   topic events/s delivered, {k} subs (vs {VS}'s fs9)", a["per_s"],
                            fan[k]["vs"]["per_s"], "/s", fmt="{:.0f}"))
    for name, gap in LAT_GAPS.items():
        f, p = fan["latency"][name]["fs9"], fan["latency"][name]["pipe"]
        for q in ("p50", "p99"):
            rows.append(row(f"   topic delivery {q}, events {gap * 1000:g} ms apart (vs pipe)",
                            f[f"{q}_ms"], p[f"{q}_ms"], "ms"))
            if "vs" in fan["latency"][name]:
                rows.append(row(f"   topic delivery {q}, events {gap * 1000:g} ms apart (vs "
                                f"{VS}'s fs9)", f[f"{q}_ms"], fan["latency"][name]["vs"][f"{q}_ms"],
                                "ms"))
    return rows


def rows_of(rate: dict, lat: dict, fan: dict, log: dict) -> list[dict]:
    rows = mail_rows(rate, lat) + fan_rows(fan)
    s = log["small"]
    s_ev = s["runs"][0]["events_before"]
    what = {"tasks": "queued tasks", "events": "topic events"}
    for n, how in enumerate(LOG_FILLS):
        g = log[how]
        g_ev = g["runs"][0]["events_before"]
        label = "3. mail" if n == 0 else "   mail"
        rows.append(row(f"{label} msg/s, log of {g_ev:,} ({what[how]}) (vs {s_ev:,})",
                        g["per_s"], s["per_s"], "/s", ">= 0.8x", g["per_s"] >= 0.8 * s["per_s"],
                        fmt="{:.0f}"))
    for how in LOG_FILLS:
        rows.append(row(f"   longest server stall, {what[how]} log (vs small)",
                        max(x["worst_ms"] for x in log[how]["runs"]),
                        max(x["worst_ms"] for x in s["runs"]), "ms", fmt="{:.0f}"))
    for how in LOG_FILLS:
        rows.append(row(f"   mount (log replay), {what[how]} log (vs small)",
                        log[how]["mount_s"], s["mount_s"], "s", fmt="{:.2f}"))
    return rows


def fan_notes(fan: dict) -> list[str]:
    drops = ", ".join(f"{k} subs {100 * fan[k]['fs9']['dropped_frac']:.1f}%" for k in FAN_SUBS)
    pub = ", ".join(f"{k} subs {statistics.median(x['publish_per_s'] for x in fan[k]['fs9']['runs']):.0f}"
                    f" vs {statistics.median(x['publish_per_s'] for x in fan[k]['pipes']['runs']):.0f}"
                    for k in FAN_SUBS)
    runs = ", ".join(f"{x['per_s']:.0f}" for x in fan[10]["fs9"]["runs"]) if 10 in fan else ""
    if 10 in fan and "vs" in fan[10]:
        runs += f" ({VS}'s: " + ", ".join(f"{x['per_s']:.0f}" for x in fan[10]["vs"]["runs"]) + ")"
    return [f"topic events dropped by fs9 (subscribers over the ring behind): {drops}; "
            "the pipes drop none (a full pipe blocks the publisher)",
            f"topic events/s published (fs9 vs pipes): {pub}; 10 subs, each run: {runs}",
            f"topic delivery: one subscriber, {LAT_ROUNDS} x {LAT_PER_ROUND} events each way; "
            "events closer than 2 ms are held for a batch (at most 0.5 ms: kernel/bus/topic.py)"]


def notes_of(rate: dict, fan: dict, log: dict, missing: dict) -> list[str]:
    notes = [f"{name} left out: {why}" for name, why in missing.items()]
    notes += [f"what an acknowledged message survives: {name}: {GUARANTEES[name]}"
              for name in ("fs9", *PEERS) if name in rate]
    runs = rate["fs9"]["runs"]
    notes.append(
        "fs9 mail: the sender got its messages out at {:.0f} msg/s (median) while the receiver "
        "ran; the receiver acknowledges each message with rm mail/ID after reading next".format(
            statistics.median(x["send_per_s"] for x in runs)))
    if HELD in rate:
        notes.append(
            "fs9 held open: a message is 3 FUSE requests (a write of a line to mail/batch, a "
            "read of mail/stream, a write of its id to mail/ack) and 2 commits (the send's; "
            "the acknowledgement's, its delivery record riding with it); the sender got its "
            "messages out at {:.0f} msg/s (median)".format(
                statistics.median(x["send_per_s"] for x in rate[HELD]["runs"])))
    if fan is None:
        return notes  # --mail
    notes += fan_notes(fan)
    notes.append("log scale: msg/s are total messages over total time of the runs (the big "
                 "logs' servers pause now and then); medians: " + ", ".join(
                     f"{k} {log[k]['median_per_s']:.0f}" for k in ("small", *LOG_FILLS)))
    for how in LOG_FILLS:
        g = log[how]
        fl, rp = g["fill"], g["replay"]
        short = (f"; SHORT of {fl['target']:,}: the fill stopped at its {FILL_BUDGET_S} s budget"
                 if fl["short"] else "")
        notes.append(
            f"{how} log: filled to {fl['events']:,} events at {fl['per_s']:.0f}/s ({fl['seconds']:.0f} s, "
            f"{fl['paused_s']:.0f} s of it paused){short}; server RSS then "
            f"{fl['rss_bytes'] / 2**20:.0f} MiB, WAL file {fl['wal_bytes'] / 2**20:.0f} MiB; "
            f"probe reads over 100 ms during its runs: {sum(x['over_100ms'] for x in g['runs'])}; "
            f"umount took {rp['umount_s']:.1f} s, the server exited after {rp['exit_s']:.1f} s")
    return notes


class FanOnly(Exception):
    """--fanout: figure 2 is done; the rest is skipped."""


def fan_report(fan: dict, elapsed: float, quick: bool) -> int:
    rows = fan_rows(fan)
    print(table(rows))
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus{', --quick' if quick else ''}; "
          f"fan-out: median of {FAN_REPEATS} x {FAN_S:g} s, interleaved with the pipes)")
    notes = fan_notes(fan)
    for note in notes:
        print(f"- {note}")
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "fs9"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return finish(RESULTS.with_name("bus-fanout.json"), rows,
                  {"fanout": {str(k): v for k, v in fan.items()}}, elapsed, quick=quick,
                  git_dirty=bool(dirty), notes=notes)


def main() -> int:
    why = cannot_run("bus")
    if why:
        print(why, file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise SystemExit(128 + signum)  # run the finally blocks: kill children, unmount

    def on_alarm(signum, frame):
        raise TimeoutError("a figure took too long (watchdog)")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGALRM, on_alarm)

    global MAIL_N, MAIL_REPEATS, LAT_ROUNDS, FAN_S, FAN_REPEATS, LOG_BIG, LOG_REPEATS
    global FILL_BUDGET_S, BATCH_N
    quick = "--quick" in sys.argv[1:]
    if quick:  # a smoke run; figures are rough
        MAIL_N, MAIL_REPEATS, LAT_ROUNDS, FAN_S, FAN_REPEATS = 500, 1, 1, 0.5, 1
        LOG_BIG, LOG_REPEATS, FILL_BUDGET_S, BATCH_N = 100_000, 1, 15, 5000
    mail_only = "--mail" in sys.argv[1:]
    fan_only = "--fanout" in sys.argv[1:]
    missing = {"autogen-core": autogen_missing()}
    missing.update({p.name: p.missing() for p in (NatsPeer, RedisPeer)})
    missing = {name: why for name, why in missing.items() if why}
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fs9-bus-"))
    tmp.chmod(0o711)  # the agents' uids walk through it to the mount point
    mounts: list[Fs9Mount] = []
    peers: list = []  # what is closed at the end
    closing: list = []  # and this too (the held-open sender's file)

    def new_mount(name: str) -> Fs9Mount:
        (tmp / name).mkdir()
        (tmp / name).chmod(0o711)
        fs = Fs9Mount(tmp / name)  # mount point tmp/NAME/mnt beside tmp/NAME/state
        fs.agents.chmod(0o755)
        mounts.append(fs)
        return fs

    fan = log = None
    try:
        fs = new_mount("main")
        fs.mount()
        if fan_only:
            vs = None
            if "--vs" in sys.argv:  # another tree's fs9 (an archive of a commit, say)
                global VS
                tree = Path(sys.argv[sys.argv.index("--vs") + 1]).resolve()
                VS = tree.name
                vs = new_mount("vs")
                py = tree / ".venv" / "bin" / "python"
                vs.py, vs.repo = str(py) if py.exists() else vs.py, tree
                vs.mount()
            signal.alarm(WATCHDOG_S * (2 if vs else 1))
            print("2/3 topic fan-out ...", file=sys.stderr, flush=True)
            fan = figure_fanout(fs, vs)
            raise FanOnly
        peers += [Fifo(tmp), Maildir()]
        for peer in (NatsPeer, RedisPeer):
            if peer.name not in missing:
                peers.append(peer(tmp))
        held = Fs9Held(fs)
        closing.append(held)
        boxes = [held, Fs9Mail(fs), *peers]
        ag = "autogen-core" not in missing
        signal.alarm(WATCHDOG_S)
        print("1/3 mail latency ...", file=sys.stderr, flush=True)
        lat = figure_mail_latency(boxes, ag)
        signal.alarm(WATCHDOG_S)
        print(f"1/3 mail throughput ... ({time.monotonic() - started:.0f} s)", file=sys.stderr,
              flush=True)
        rate = figure_mail_rate(boxes, ag)
        signal.alarm(WATCHDOG_S)
        print(f"1/3 mail in batches ... ({time.monotonic() - started:.0f} s)",
              file=sys.stderr, flush=True)
        redis = [RedisBatch(p) for p in peers if isinstance(p, RedisPeer)]
        rate["batch"] = figure_batch_rate([Fs9Batch(fs), *redis])
        held.close()  # (the mount goes before figure 3)
        if not mail_only:
            signal.alarm(WATCHDOG_S)
            print(f"2/3 topic fan-out ... ({time.monotonic() - started:.0f} s)",
                  file=sys.stderr, flush=True)
            fan = figure_fanout(fs)
            fs.umount()
            signal.alarm(WATCHDOG_S + len(LOG_FILLS) * FILL_BUDGET_S + 300)
            print(f"3/3 log scale ... ({time.monotonic() - started:.0f} s)", file=sys.stderr,
                  flush=True)
            log = figure_log_scale(new_mount, FILL_BUDGET_S)
        signal.alarm(0)
    except FanOnly:
        pass
    finally:
        signal.alarm(0)
        for child in list(Child.live):
            try:
                child.close()
            except Exception as e:
                print(f"bus: child {child.pid}: {e}", file=sys.stderr)
        for peer in closing + peers:
            try:
                peer.close()
            except Exception as e:
                print(f"bus: closing {peer.name}: {e}", file=sys.stderr)
        for m in mounts:
            try:
                m.umount()
            except Exception as e:
                print(f"bus: umount {m.path}: {e}", file=sys.stderr)
        left = [str(m.path) for m in mounts if mounted(m.path)]
        if not left:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"bus: still mounted: {left}", file=sys.stderr)

    if fan_only:
        return fan_report(fan, time.monotonic() - started, quick)
    rows = mail_rows(rate, lat) if mail_only else rows_of(rate, lat, fan, log)
    print(table(rows))
    elapsed = time.monotonic() - started
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus{', --quick' if quick else ''}; "
          f"throughput: median of {MAIL_REPEATS} x {MAIL_N} messages; latency: percentiles of "
          f"{lat['fs9']['n']} messages each; fan-out: median of {FAN_REPEATS} x {FAN_S:g} s; "
          f"log scale: {LOG_REPEATS} runs each; all interleaved with their baselines)")
    notes = notes_of(rate, fan, log, missing)
    for note in notes:
        print(f"- {note}")
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "fs9"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    raw = {"mail_rate": rate, "mail_latency": lat}
    if not mail_only:
        raw.update(fanout={str(k): v for k, v in fan.items()}, log_scale=log)
    return finish(RESULTS.with_name("bus-mail.json") if mail_only else RESULTS, rows, raw,
                  elapsed, quick=quick, git_dirty=bool(dirty), missing=missing, notes=notes)

if __name__ == "__main__":
    sys.exit(main())
