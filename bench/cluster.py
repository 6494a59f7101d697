"""fs9 cluster benchmark: what a remote agent costs, and how long a node's loss takes.

    .venv/bin/python bench/cluster.py             (about 8 minutes)
    .venv/bin/python bench/cluster.py --quick     (smoke run, rough figures)
    .venv/bin/python bench/cluster.py --mail      (the mail throughput only, 3 rounds)
    ... --machines CPU                            (the mail also on emulated machines)

Needs root and nats-server (`make deps`). Starts three real nats-servers as one
JetStream cluster and three fs9 nodes on 127.0.0.1 (tests/natscluster.py, the tests'
Mount), places a `cat` agent on n1 (local to the asker) and one on n3 (remote), and
times from n1's mount, calls paired and their order alternating:
- ctl: a `priority normal|background` write to agents/X/ctl, local vs remote;
- out: `cat agents/X/out` of a finished task, to EOF, local vs remote;
- task: `in` then `out` to EOF, for the remote agent, the local one (both through
  JetStream), and the baseline: an agent of n1 outside the cluster (the single fs9).
- mail: durable mail msg/s (mail/new, each stored R3 in JetStream before the write
  returns) to 6 agents spread over 1, 2 and 3 nodes, one writer each writing through
  its agent's own node, 6 at once; the baseline: the same to 6 agents of n1 outside the
  cluster (the single fs9, its own log's durability).
With --machines CPU (a fraction of a core, e.g. 0.5), the mail rounds are measured
twice each, interleaved: unconstrained as above, and on three emulated machines
(bench/machines.py: a control group each with a quota of CPU cores; machine i holds
nats-server i and fs9 node i, whether or not that node's agents get mail; the writers
run outside them, as clients), with each machine's share of its quota used.
Then failovers (10; --quick 2): an agent on n2, tasks flowing to it through n1, kill -9
of n2's fs9 and nats-server: the longest gap between acknowledged writes (writable
again) and the time until the agent runs on a survivor, p50 and p95; n2 comes back
(fresh state) between runs. Prints the figures and writes bench/results/cluster.json.
"""
import contextlib
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import Mount, mounted, wait_for  # noqa: E402
from natscluster import NatsCluster  # noqa: E402
from machines import Machines  # noqa: E402

RESULTS = HERE / "results" / "cluster.json"


def p(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def joined(m, n=3):
    wait_for(lambda: f"nodes={n}/{n}" in m.read("nodes/ctl") and "joined=yes" in m.read("nodes/ctl"),
             90, "nodes joined")


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def task(m, agent):
    m.write(f"agents/{agent}/in", "x\n")
    assert m.read(f"agents/{agent}/out") == "x\n"


def paired(n, ways: dict) -> dict:
    got = {k: [] for k in ways}
    names = list(ways)
    for i in range(n):
        for k in (names if i % 2 else names[::-1]):
            got[k].append(timed(ways[k]))
    return got


def mail_rate(nodes, agents: list[str], per: int) -> float:
    """Messages/s: one writer per agent (through the node given), all at once."""
    def writer(m, agent):
        for i in range(per):
            m.write(f"agents/{agent}/mail/new", f"type: event\n\nm{i}\n")
    threads = [threading.Thread(target=writer, args=(m, a)) for m, a in zip(nodes, agents)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return len(agents) * per / (time.perf_counter() - t)


def spread(nodes, k: int, per: int, round_: str = "0", rate=mail_rate) -> float:
    """6 cluster agents round robin over the first k nodes; mail to each via its node
    (rate: mail_rate, or one that also measures it)."""
    names = [f"m{k}x{i}r{round_}" for i in range(6)]
    on = [nodes[i % k] for i in range(6)]
    for name, m in zip(names, on):
        nodes[0].write("nodes/ctl", f"spawn {name} def=echo node=n{nodes.index(m) + 1}\n")
    for name, m in zip(names, on):
        wait_for(lambda: name in m.read("status").split(), 60, f"{name} placed")
    got = rate(on, names, per)
    for name in names:  # gone before the next spread and the failovers
        nodes[0].write("nodes/ctl", f"kill {name}\n")
    return got


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def failover(nats, nodes, i) -> tuple[float, float]:
    n1, n2, n3 = nodes
    name = f"f{i}"
    n1.write("nodes/ctl", f"spawn {name} def=echo node=n2\n")
    wait_for(lambda: name in n2.read("status").split(), 60, f"{name} on n2")
    acks, stop = [], threading.Event()

    def write():
        while not stop.is_set():
            try:
                n1.write(f"agents/{name}/in", "x\n")
                acks.append(time.monotonic())
            except OSError:
                time.sleep(0.01)
    t = threading.Thread(target=write)
    t.start()
    wait_for(lambda: len(acks) > 10, 60, "writes")
    killed = time.monotonic()
    n2.kill9()
    nats.servers[1].kill9()
    back = wait_for(lambda: any(name in m.read("status").split() for m in (n1, n3))
                    and time.monotonic(), 90, "the agent on a survivor")
    wait_for(lambda: acks[-1] > back, 60, "writes after")
    stop.set()
    t.join()
    after = [a for a in acks if a > killed]
    gaps = [b - a for a, b in zip([killed] + after, after)]
    shutil.rmtree(n2.state)  # the machine comes back empty
    nats.servers[1].start()
    n2.mount("--cluster", nats.urls, "--node", "n2")
    joined(n1)
    return max(gaps), back - killed


def cpu_s(pids) -> float:
    """CPU seconds (user and system) the processes pids have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def mail_rounds(nodes, per: int, rounds: int, nats=None,
                machines: Machines | None = None) -> tuple[dict, dict, dict]:
    """Durable mail msg/s, single fs9 and 1, 2, 3 nodes, in interleaved rounds: the
    median of each (the single fs9's agents spawned once); and the CPU each message
    cost the fs9 nodes and the nats-servers (ms, median of the rounds: where the time
    goes, whatever else runs on the machine). With machines, each round again on them
    (keys "machines_..."), and each machine's share of its quota used (median)."""
    n1 = nodes[0]
    for i in range(6):
        n1.write("ctl", f"spawn s{i} def=echo\n")
    modes = [""] + (["machines_"] if machines else [])
    got = {m + k: [] for m in modes for k in ("single", "1_nodes", "2_nodes", "3_nodes")}
    cpu = {k: {"fs9": [], "nats": []} for k in got}
    busy = {k: [] for k in got if k.startswith("machines_")}
    groups = {"fs9": [m.pid for m in nodes],
              "nats": [s.proc.pid for s in nats.servers] if nats else []}

    def measured(key):
        """mail_rate, its rate and the CPU used meanwhile (not the spawns') noted."""
        def rate(on, names, per):
            before = {g: cpu_s(pids) for g, pids in groups.items()}
            used = machines.usage_s() if key in busy else []
            got[key].append(mail_rate(on, names, per))
            for g, pids in groups.items():
                cpu[key][g].append((cpu_s(pids) - before[g]) * 1000 / (6 * per))
            if key in busy:  # CPU used / (the writes' wall time x the quota)
                wall = 6 * per / got[key][-1]
                busy[key].append([(b - a) / (wall * machines.cpu)
                                  for a, b in zip(used, machines.usage_s())])
            return got[key][-1]
        return rate
    for r in range(rounds):
        for mode in modes:
            if machines:
                machines.limit(mode == "machines_")
            measured(mode + "single")([n1] * 6, [f"s{i}" for i in range(6)], per)
            for k in (1, 2, 3):
                spread(nodes, k, per, f"{r}{mode[:1]}", measured(f"{mode}{k}_nodes"))
        print({k: round(v[-1], 1) for k, v in got.items()}, file=sys.stderr)
    return ({k: statistics.median(v) for k, v in got.items()},
            {k: {g: round(statistics.median(v), 2) for g, v in c.items()} for k, c in cpu.items()},
            {k: [round(statistics.median(m), 2) for m in zip(*v)] for k, v in busy.items()})


@contextlib.contextmanager
def on_machines(nats, nodes, cpu: float | None):
    """Machine i holding nats-server i and fs9 node i (with its fork server), for the
    mail rounds; None without --machines. Everything back and the groups gone after."""
    if cpu is None:
        yield None
        return
    with Machines(len(nodes), cpu) as machines:
        for i, (server, node) in enumerate(zip(nats.servers, nodes), 1):
            machines.place(i, server.proc.pid)
            machines.place(i, node.pid)
        yield machines


def mail_figures(mail: dict, cpu: dict, busy: dict, cpu_each: float | None) -> dict:
    """mail_rounds' figures as printed: the unconstrained ones, and the machines' beside
    them (with --machines, each machine's cores cpu_each)."""
    figures = {"mail_msgs_per_s": {k: round(v, 1) for k, v in mail.items()
                                   if not k.startswith("machines_")},
               "mail_3_vs_1_node": round(mail["3_nodes"] / mail["1_nodes"], 2),
               "mail_cpu_ms_per_msg": {k: v for k, v in cpu.items()
                                       if not k.startswith("machines_")}}
    if cpu_each is not None:
        figures |= {
            "machines_cpu_each": cpu_each,
            "mail_machines_msgs_per_s": {k.removeprefix("machines_"): round(v, 1)
                                         for k, v in mail.items() if k.startswith("machines_")},
            "mail_machines_3_vs_1_node": round(mail["machines_3_nodes"]
                                               / mail["machines_1_nodes"], 2),
            "mail_machines_busy_of_quota_m1_m2_m3": {k.removeprefix("machines_"): v
                                                     for k, v in busy.items()},
            "mail_machines_cpu_ms_per_msg": {k.removeprefix("machines_"): v
                                             for k, v in cpu.items()
                                             if k.startswith("machines_")},
            "machines_note": MACHINES_NOTE.format(cpu=cpu_each)}
    return figures


def work_leader(nats) -> str:
    """The server leading FS9WORK (where all mail is stored): the machine doing the
    stream leader's part of every message, whichever node the writer writes on."""
    import asyncio

    import nats as client

    async def ask():
        nc = await client.connect(nats.urls.split(","))
        try:
            return (await nc.jetstream().stream_info("FS9WORK")).cluster.leader
        finally:
            await nc.close()
    return asyncio.run(ask())


MACHINES_NOTE = (
    "machines: 3 emulated machines of {cpu} core each (a cgroup CPU quota; machine i = "
    "nats-server i + fs9 node i), writers outside them; separate CPU only: one disk "
    "(every fsync), shared memory bandwidth and caches, loopback network")


@contextlib.contextmanager
def three_nodes():
    """Three nats-servers as one JetStream cluster and three fs9 nodes n1..n3 on it,
    joined; (nats, nodes), ended and unmounted after."""
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="fs9-bench-cluster-"))
    root.chmod(0o755)
    nats = NatsCluster(root / "nats").start()
    nodes = []
    try:
        for i in (1, 2, 3):
            nodes.append(Mount(root / f"node{i}").mount("--cluster", nats.urls, "--node", f"n{i}"))
        joined(nodes[0])
        yield nats, nodes
    finally:
        for m in nodes:
            m.umount()
        nats.stop()
        if not any(mounted(m.path) for m in nodes):  # never through a live mount
            shutil.rmtree(root, ignore_errors=True)


def mail_only(per: int, rounds: int, machines: float | None) -> None:
    with three_nodes() as (nats, nodes):
        with on_machines(nats, nodes, machines) as groups:
            figures = mail_figures(*mail_rounds(nodes, per, rounds, nats, groups), machines)
        figures["FS9WORK_leader"] = work_leader(nats)
        figures["load_avg"] = [round(x, 1) for x in os.getloadavg()]
        print(json.dumps(figures, indent=1))


def main(quick: bool, machines: float | None) -> None:
    with three_nodes() as (nats, nodes):
        n1, n2, n3 = nodes
        n1.write("nodes/ctl", "spawn near def=echo node=n1\n")
        n1.write("nodes/ctl", "spawn far def=echo node=n3\n")
        n1.write("ctl", "spawn alone def=echo\n")  # the single fs9's agent: no cluster
        try:
            wait_for(lambda: "near" in n1.read("status").split()
                     and "far" in n3.read("status").split(), 60, "agents placed")
        except AssertionError:
            for m in nodes:
                print(m.read("nodes/ctl"), m.read("status"), m.read("err"), sorted(
                    p.name for p in (m.path / "agents").iterdir()), file=sys.stderr)
            raise
        n = 20 if quick else 100
        for a in ("near", "far", "alone"):
            task(n1, a)  # warm
        prio = iter(["normal", "background"] * n * 2)
        ctl = paired(n, {"local": lambda: n1.write("agents/near/ctl", f"priority {next(prio)}\n"),
                         "remote": lambda: n1.write("agents/far/ctl", f"priority {next(prio)}\n")})
        out = paired(n, {"local": lambda: n1.read("agents/near/out"),
                         "remote": lambda: n1.read("agents/far/out")})
        tasks = paired(n, {"single": lambda: task(n1, "alone"), "local": lambda: task(n1, "near"),
                           "remote": lambda: task(n1, "far")})
        per = 20 if quick else 100
        with on_machines(nats, nodes, machines) as groups:
            mail = mail_figures(*mail_rounds(nodes, per, 1 if quick else 3, nats, groups),
                                machines)
        mail["FS9WORK_leader"] = work_leader(nats)
        fails = [failover(nats, nodes, i) for i in range(2 if quick else 10)]
        figures = {
            "ctl_p50_ms": {k: p(v, .5) for k, v in ctl.items()},
            "out_p50_ms": {k: p(v, .5) for k, v in out.items()},
            "task_p50_ms": {k: p(v, .5) for k, v in tasks.items()},
            **mail,
            "writable_again_s": [round(w, 2) for w, _ in fails],
            "agent_back_s": [round(b, 2) for _, b in fails],
            "load_avg": [round(x, 1) for x in os.getloadavg()],
        }
        for key, vals in (("writable_again", [w for w, _ in fails]),
                          ("agent_back", [b for _, b in fails])):
            figures[f"{key}_p50_p95_s"] = [round(pct(vals, .5), 2), round(pct(vals, .95), 2)]
        figures["added_ctl_p50_ms"] = statistics.median(
            r - l for l, r in zip(ctl["local"], ctl["remote"])) * 1000
        figures["added_out_p50_ms"] = statistics.median(
            r - l for l, r in zip(out["local"], out["remote"])) * 1000
        print(json.dumps(figures, indent=1))
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(figures, indent=1) + "\n")



def machines_arg() -> float | None:
    """--machines CPU: each machine's cores, a fraction; the three together must leave
    the box room (else the box, not a machine, would be the limit)."""
    if "--machines" not in sys.argv:
        return None
    cpu = float(sys.argv[sys.argv.index("--machines") + 1])
    if not 0 < 3 * cpu <= 0.9 * os.cpu_count():
        raise SystemExit(f"--machines {cpu}: 3 machines need at most 90% of the "
                         f"{os.cpu_count()} cores")
    return cpu


if __name__ == "__main__":
    if "--mail" in sys.argv:
        mail_only(100, 3, machines_arg())
    else:
        main("--quick" in sys.argv, machines_arg())
