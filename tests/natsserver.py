"""A real nats-server for the federation tests: JetStream on, every write fsynced
(`sync_interval: always`, so an acknowledged message is on disk), on 127.0.0.1 at a free
port, its store in a temporary directory. The binary is the pinned one `make deps`
installs into the venv (scripts/nats-server.sh)."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

READY_S = 30  # a busy machine may take a while to start it


def binary() -> str | None:
    beside = Path(sys.executable).parent / "nats-server"
    return str(beside) if beside.exists() else shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    def __init__(self, root: Path, port: int | None = None, more: str = "") -> None:
        """more: further configuration lines (a cluster's, natscluster.py; `fs9
        federation-keys`'s auth.conf: the members' users and permissions)."""
        self.root = root
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "nats.conf"
        self.conf.write_text(f'listen: "127.0.0.1:{self.port}"\n'
                             f'jetstream {{\n  store_dir: "{root / "js"}"\n'
                             f'  sync_interval: always\n}}\n' + more)

    def start(self) -> "NatsServer":
        self.launch()
        self.wait_ready()
        return self

    def launch(self) -> None:
        """Start the process, not waiting for it to be ready."""
        log = open(self.root / "nats.log", "ab")
        self.proc = subprocess.Popen([binary(), "-c", str(self.conf)], stdout=log, stderr=log)
        log.close()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        while b"Server is ready" not in (self.root / "nats.log").read_bytes():
            assert self.proc.poll() is None, (self.root / "nats.log").read_text()
            assert time.monotonic() < deadline, "nats-server not ready in time"
            time.sleep(0.05)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        # the next start logs afresh: readiness is read from the log
        os.replace(self.root / "nats.log", self.root / f"nats.log.{time.monotonic_ns()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
