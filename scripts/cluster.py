"""`make cluster`: a 3-node fs9 cluster on this machine (docs/cluster.md), for trying it.

    .venv/bin/python scripts/cluster.py start   three nats-servers (one JetStream cluster,
                                                tests/natscluster.py's configuration) and
                                                three fs9 nodes at mountpoints/n1..n3
    .venv/bin/python scripts/cluster.py stop    unmount them and stop the servers
State in .cluster/ (each server's store, each node's state); the agents are ./agents and
the vault examples/vault, shared by the three nodes.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from natscluster import NatsCluster  # noqa: E402

ROOT = REPO / ".cluster"
FS9 = [sys.executable, "-m", "fs9"]


def start() -> None:
    if (ROOT / "running.json").exists():
        sys.exit("a cluster is running (make cluster-stop)")
    nats = NatsCluster(ROOT / "nats").start()
    (ROOT / "running.json").write_text(json.dumps(
        dict(pids=[s.proc.pid for s in nats.servers], urls=nats.urls)))
    for i in (1, 2, 3):
        subprocess.run(FS9 + ["mount", str(REPO / f"mountpoints/n{i}"), "--agents", "agents",
                              "--vault", "examples/vault", "--state", str(ROOT / f"n{i}"),
                              "--cluster", nats.urls, "--node", f"n{i}", "--background"],
                       cwd=REPO, check=True)
    print(f"""three fs9 nodes at mountpoints/n1, n2, n3 (NATS: {nats.urls}). Try:
  cd mountpoints
  cat n1/nodes/n2                                   # a node: address, state, agents, load
  echo 'spawn c def=counter node=n3' > n1/nodes/ctl # placed on n3, from n1
  ls n2/agents                                      # every node lists it
  echo 5 > n2/agents/c/in; cat n1/agents/c/out      # runs on n3, streams on n1
Stop it with: make cluster-stop""")


def stop() -> None:
    for i in (1, 2, 3):
        subprocess.run(FS9 + ["umount", str(REPO / f"mountpoints/n{i}")], cwd=REPO)
    running = ROOT / "running.json"
    if running.exists():
        for pid in json.loads(running.read_text())["pids"]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        running.unlink()


if __name__ == "__main__":
    {"start": start, "stop": stop}[sys.argv[1] if len(sys.argv) > 1 else "start"]()
