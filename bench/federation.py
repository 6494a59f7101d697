"""fs9 federation benchmark (issue 13): two fs9 members on one nats-server, against
same-run baselines.

    .venv/bin/python bench/federation.py           (about a minute)
    .venv/bin/python bench/federation.py --quick   (smoke run, rough figures)

Needs root and the pinned nats-server (`make deps`). Mounts alpha and beta for real
(bench/foundation.py's Fs9Mount), each with a `cat` agent `echo`, joined as each other's
peers through a nats-server on 127.0.0.1 (JetStream, every write fsynced), and times:
1. a work_request -> result round trip: the operator of alpha writes the request to
   federation/outbox/echo@beta and reads the result from its mail/next (then rm), vs
   the same round trip with alpha's own echo (local mail), vs a bare nats-py
   request/reply on the same server (core NATS, not durable);
2. durable messages/s, one sender one receiver: N events written to
   federation/outbox/echo@beta until beta has recorded all N, vs N local mails written
   to alpha's agents/echo/mail/new (each durable at its write), vs bare nats-py
   JetStream publishes, each awaiting its ack;
3. catch-up: beta killed -9, 1,000 messages sent meanwhile, beta mounted again: the time
   from its mount until it has recorded all 1,000;
4. events across OSs: N events written to alpha's topics/ticks, exported, until beta
   (subscribed, its echo a durable subscriber of ticks@alpha) has recorded all N, vs N
   events written to alpha's topics/local, whose durable subscriber is alpha's echo
   (the same publish and mail, with no OS between).
Rounds of each figure interleave with their baselines. Writes bench/results/federation.json.
"""
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from foundation import (Fs9Mount, cannot_run, finish, guard_signals, pct, row,  # noqa: E402
                        table, unmount_all)
from natsserver import NatsServer, binary  # noqa: E402

import nats  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "federation.json"
TRIPS, MESSAGES, CATCH_UP = 60, 400, 1000
WATCHDOG_S = 900


def status(m: Fs9Mount) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (m.path / "federation/status").read_text()
                .splitlines())


def until(predicate, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waiting for {what}")
        time.sleep(0.02)  # (each look is a FUSE request to a busy member)


def write(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def next_mail(m: Fs9Mount) -> str:
    """Block on mail/next for the head of the operator's mail; acknowledge it."""
    with open(m.path / "mail/next") as f:
        text = f.read()
    mid = next(line[4:] for line in text.splitlines() if line.startswith("id: "))
    os.unlink(m.path / "mail" / mid)
    return text


def round_trip(m: Fs9Mount, target: Path) -> float:
    t = time.perf_counter()
    write(target, "type: work_request\nclassification: public\n\nping\n")
    text = next_mail(m)
    elapsed = time.perf_counter() - t
    assert text.endswith("\n\nping\n"), text
    return elapsed


def nats_round_trips(url: str, n: int) -> list[float]:
    async def go():
        nc = await nats.connect(url)
        try:
            async def answer(msg):
                await msg.respond(msg.data)
            await nc.subscribe("bench.echo", cb=answer)
            samples = []
            for _ in range(n + 5):
                t = time.perf_counter()
                await nc.request("bench.echo", b"ping", timeout=5)
                samples.append(time.perf_counter() - t)
            return samples[5:]
        finally:
            await nc.close()
    return asyncio.run(go())


def nats_publish_rate(url: str, n: int) -> float:
    async def go():
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="BENCH", subjects=["bench.js"])
            t = time.perf_counter()
            for i in range(n):
                await js.publish("bench.js", b"x" * 100, timeout=5)
            rate = n / (time.perf_counter() - t)
            await js.delete_stream("BENCH")
            return rate
        finally:
            await nc.close()
    return asyncio.run(go())


def cross_rate(a: Fs9Mount, b: Fs9Mount, n: int) -> float:
    start = int(status(b)["received"])
    t = time.perf_counter()
    for i in range(n):
        write(a.path / "federation/outbox/echo@beta", f"classification: public\n\nm{i}\n")
    until(lambda: int(status(b)["received"]) >= start + n, what="beta receiving all")
    return n / (time.perf_counter() - t)


def local_rate(a: Fs9Mount, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        write(a.path / "agents/echo/mail/new", f"classification: public\n\nm{i}\n")
    return n / (time.perf_counter() - t)


def topic_received(m: Fs9Mount, name: str) -> int:
    for line in (m.path / "federation/topics").read_text().splitlines():
        if line.startswith(f"subscription {name} "):
            return int(line.split("received=")[1].split()[0])
    return 0


def cross_events(a: Fs9Mount, b: Fs9Mount, n: int) -> float:
    start = topic_received(b, "ticks@alpha")
    t = time.perf_counter()
    for i in range(n):
        write(a.path / "topics/ticks", f"e{i}\n")
    until(lambda: topic_received(b, "ticks@alpha") >= start + n, what="beta's events")
    return n / (time.perf_counter() - t)


def local_events(a: Fs9Mount, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        write(a.path / "topics/local", f"e{i}\n")
    return n / (time.perf_counter() - t)


def drain(m: Fs9Mount, agent: str) -> None:
    """Acknowledge what waits in agent's mailbox (the throughput figures leave it full)."""
    folder = m.path / "agents" / agent / "mail"
    for name in os.listdir(folder):
        if name[0].isdigit():
            os.unlink(folder / name)


def main() -> int:
    global TRIPS, MESSAGES, CATCH_UP
    why = cannot_run("federation", root="agents are confined") or (
        None if binary() else "federation: no nats-server (make deps installs it)")
    if why:
        print(why, file=sys.stderr)
        return 2
    guard_signals(WATCHDOG_S)
    if "--quick" in sys.argv[1:]:
        TRIPS, MESSAGES, CATCH_UP = 10, 50, 100
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fs9-bench-fed-"))
    os.chmod(tmp, 0o755)
    server = NatsServer(tmp / "nats").start()
    members = []
    try:
        for name, peer in (("alpha", "beta"), ("beta", "alpha")):
            (tmp / name).mkdir()
            m = Fs9Mount(tmp / name)
            (m.agents / "echo").mkdir()
            (m.agents / "echo/agent.toml").write_text(  # (durably subscribed: figure 4)
                'driver = "exec"\ncmd = ["cat"]\nsubscribe = ["local", "ticks@alpha"]\n')
            m.mount()
            members.append(m)
            m.ctl("ctl", "spawn echo\n")
            m.ctl("federation/ctl", f"join {server.url} AS {name}\n")
            m.ctl("federation/ctl", f"peer {peer} ceiling=internal auth=delegated rate=100000\n")
        a, b = members
        until(lambda: all(status(m)["connection"] == "connected" for m in members),
              what="connected")
        a.ctl("federation/ctl", "export ticks\n")
        write(a.path / "topics/local", "warm\n")
        b.ctl("federation/ctl", "subscribe alpha ticks\n")
        until(lambda: "state=active" in (b.path / "federation/topics").read_text(),
              what="beta subscribed to ticks@alpha")
        for _ in range(5):  # sandboxes started, connections warm
            round_trip(a, a.path / "federation/outbox/echo@beta")
            round_trip(a, a.path / "agents/echo/mail/new")
        cross, local = [], []
        for i in range(TRIPS):  # interleaved: load hits both alike
            cross.append(round_trip(a, a.path / "federation/outbox/echo@beta"))
            local.append(round_trip(a, a.path / "agents/echo/mail/new"))
        bare = nats_round_trips(server.url, TRIPS)
        ms = lambda xs, p: pct([x * 1000 for x in xs], p)  # noqa: E731
        rates = {"cross": [], "local": [], "nats": []}
        for _ in range(3):
            rates["cross"].append(cross_rate(a, b, MESSAGES))
            rates["local"].append(local_rate(a, MESSAGES))
            rates["nats"].append(nats_publish_rate(server.url, MESSAGES))
            drain(a, "echo")
            drain(b, "echo")
        for _ in range(3):
            rates.setdefault("events_cross", []).append(cross_events(a, b, MESSAGES))
            rates.setdefault("events_local", []).append(local_events(a, MESSAGES))
            drain(a, "echo")
            drain(b, "echo")
        med = {k: statistics.median(v) for k, v in rates.items()}
        # catch-up: beta away while alpha sends CATCH_UP, then back
        start = int(status(b)["received"])  # (a remount counts them again from its log)
        b.umount()
        for i in range(CATCH_UP):
            write(a.path / "federation/outbox/echo@beta", f"classification: public\n\nc{i}\n")
        until(lambda: status(a)["outbox"] == "0", what="alpha's outbox in JetStream")
        before = time.perf_counter()
        b.mount()
        mounted_at = time.perf_counter()
        until(lambda: int(status(b)["received"]) >= start + CATCH_UP, timeout=300,
              what="beta catching up")
        catch_up_s = time.perf_counter() - mounted_at
        rows = [
            row("1. cross-OS round trip p50 (vs local mail)", ms(cross, 50), ms(local, 50),
                "ms", "<= 3x", ms(cross, 50) <= 3 * ms(local, 50)),
            row("   cross-OS round trip p99 (vs local mail)", ms(cross, 99), ms(local, 99), "ms"),
            row("   cross-OS round trip p50 (vs bare nats-py request)", ms(cross, 50),
                ms(bare, 50), "ms"),
            row("2. cross-OS durable msg/s (vs local mail)", med["cross"], med["local"], "/s",
                ">= 0.5x", med["cross"] >= 0.5 * med["local"], fmt="{:.0f}"),
            row("   cross-OS durable msg/s (vs nats-py publish+ack)", med["cross"], med["nats"],
                "/s", fmt="{:.0f}"),
            row(f"3. catch-up of {CATCH_UP} after a remount (vs 2 s)", catch_up_s, 2.0, "s",
                "<= 2 s", catch_up_s <= 2.0),
            row("4. cross-OS topic events/s, durable (vs local topic fan-out)",
                med["events_cross"], med["events_local"], "/s", fmt="{:.0f}"),
        ]
        print(table(rows))
        elapsed = time.monotonic() - started
        print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus; {TRIPS} round trips each way, "
              f"interleaved; rates: median of 3 x {MESSAGES}; beta's remount took "
              f"{mounted_at - before:.2f} s before the catch-up)")
        return finish(RESULTS, rows, {"cross_s": cross, "local_s": local, "nats_s": bare,
                                      "rates": rates, "catch_up_s": catch_up_s}, elapsed)
    finally:
        unmount_all(tmp, members, "federation")
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
