"""Three real nats-servers joined as one JetStream cluster on 127.0.0.1 (free ports),
each its own store in a temporary directory, every write fsynced (`sync_interval:
always`): an acknowledged write is on disk on a quorum of servers. For the cluster
tests (test_cluster.py) and bench/cluster.py. A new meta leader is elected some
seconds after a kill -9 (4-9 s seen): callers wait on conditions with generous bounds."""
import os
import signal
import subprocess
import time
from pathlib import Path

from natsserver import READY_S, binary, free_port


class ClusterServer:
    def __init__(self, root: Path, name: str, port: int, route: int, routes: list[int]) -> None:
        self.root, self.name, self.port = root, name, port
        self.url = f"nats://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "nats.conf"
        others = ", ".join(f'"nats://127.0.0.1:{r}"' for r in routes)
        self.conf.write_text(
            f'server_name: "{name}"\nlisten: "127.0.0.1:{port}"\n'
            f'jetstream {{\n  store_dir: "{root / "js"}"\n  sync_interval: always\n}}\n'
            f'cluster {{\n  name: "fs9"\n  listen: "127.0.0.1:{route}"\n'
            f'  routes: [{others}]\n}}\n')

    def start(self) -> "ClusterServer":
        log = open(self.root / "nats.log", "ab")
        self.proc = subprocess.Popen([binary(), "-c", str(self.conf)], stdout=log, stderr=log)
        log.close()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        while b"Server is ready" not in (self.root / "nats.log").read_bytes():
            assert self.proc.poll() is None, (self.root / "nats.log").read_text()
            assert time.monotonic() < deadline, f"nats-server {self.name} not ready in time"
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)
        if (self.root / "nats.log").exists():  # the next start logs afresh
            os.replace(self.root / "nats.log", self.root / f"nats.log.{time.monotonic_ns()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class NatsCluster:
    """n servers (n1..nN), each routed to all the others."""

    def __init__(self, root: Path, n: int = 3) -> None:
        ports = [(free_port(), free_port()) for _ in range(n)]
        self.servers = [ClusterServer(root / f"n{i + 1}", f"n{i + 1}", port, route,
                                      [r for _, r in ports])
                        for i, (port, route) in enumerate(ports)]

    @property
    def urls(self) -> str:
        """Every server's URL, comma-separated (fs9 mount --cluster takes this)."""
        return ",".join(s.url for s in self.servers)

    def start(self) -> "NatsCluster":
        for s in self.servers:
            s.start()
        for s in self.servers:
            s.wait_ready()
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
