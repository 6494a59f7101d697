"""fs9 cluster benchmark: what a remote agent costs, and how long a node's loss takes.

    .venv/bin/python bench/cluster.py             (about 3 minutes)
    .venv/bin/python bench/cluster.py --quick     (smoke run, rough figures)

Needs root and nats-server (`make deps`). Starts three real nats-servers as one
JetStream cluster and three fs9 nodes on 127.0.0.1 (tests/natscluster.py, the tests'
Mount), places a `cat` agent on n1 (local to the asker) and one on n3 (remote), and
times from n1's mount, calls paired and their order alternating:
- ctl: a `priority normal|background` write to agents/X/ctl, local vs remote;
- out: `cat agents/X/out` of a finished task, to EOF, local vs remote;
- task: `in` then `out` to EOF, for the remote agent, the local one (both through
  JetStream), and the baseline: an agent of n1 outside the cluster (the single fs9).
Then failovers: an agent on n2, tasks flowing to it through n1, kill -9 of n2's fs9 and
nats-server: the longest gap between acknowledged writes (writable again) and the time
until the agent runs on a survivor; n2 comes back (fresh state) between runs.
Prints a table and writes bench/results/cluster.json.
"""
import json
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import Mount, wait_for  # noqa: E402
from natscluster import NatsCluster  # noqa: E402

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
    nats.servers[1].start().wait_ready()
    n2.mount("--cluster", nats.urls, "--node", "n2")
    joined(n1)
    return max(gaps), back - killed


def main(quick: bool) -> None:
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="fs9-bench-cluster-"))
    root.chmod(0o755)
    nats = NatsCluster(root / "nats").start()
    nodes = []
    try:
        for i in (1, 2, 3):
            m = Mount(root / f"node{i}")
            nodes.append(m.mount("--cluster", nats.urls, "--node", f"n{i}"))
        n1, n2, n3 = nodes
        joined(n1)
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
        fails = [failover(nats, nodes, i) for i in range(2 if quick else 5)]
        figures = {
            "ctl_p50_ms": {k: p(v, .5) for k, v in ctl.items()},
            "out_p50_ms": {k: p(v, .5) for k, v in out.items()},
            "task_p50_ms": {k: p(v, .5) for k, v in tasks.items()},
            "writable_again_s": [round(w, 2) for w, _ in fails],
            "agent_back_s": [round(b, 2) for _, b in fails],
        }
        figures["added_ctl_p50_ms"] = statistics.median(
            r - l for l, r in zip(ctl["local"], ctl["remote"])) * 1000
        figures["added_out_p50_ms"] = statistics.median(
            r - l for l, r in zip(out["local"], out["remote"])) * 1000
        print(json.dumps(figures, indent=1))
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(figures, indent=1) + "\n")
    finally:
        for m in nodes:
            m.umount()
        nats.stop()


if __name__ == "__main__":
    main("--quick" in sys.argv)
