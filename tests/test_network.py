"""A confined agent reaches no network unless it pledged `inet` (issue 12, item 1), and
shares no IPC or process view with anyone (issue 20, item 4). Real confined agents
on a real mount; listeners the test starts on 127.0.0.1 (and an abstract unix socket
of the host) must receive nothing from an agent without `inet`."""
import json
import os
import socket
import threading
import time

import pytest

from fs9.drivers import confine, netrules

pytestmark = pytest.mark.skipif(confine.unavailable() is not None,
                                reason=f"cannot confine here: {confine.unavailable()}")

PROBE = r'''
import socket, sys
def tcp(port):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=3)
        s.sendall(b"secret-tcp"); s.close(); return "sent"
    except OSError as e:
        return f"refused {e.errno}"
def udp(port):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"secret-udp", ("127.0.0.1", port)); return "sent"
    except OSError as e:
        return f"refused {e.errno}"
def abstract(name):
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect("\0" + name); s.sendall(b"secret-unix"); return "sent"
    except OSError as e:
        return f"refused {e.errno}"
args = sys.stdin.read().split()
print("tcp", tcp(int(args[0])), "tcp2", tcp(int(args[1])), "udp", udp(int(args[2])),
      "unix", abstract(args[3]))
'''


class Listeners:
    """A TCP listener on two ports, a UDP socket and an abstract unix socket, each
    recording what it receives."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.socks = []
        self.tcp = [self._tcp() for _ in range(2)]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        u.settimeout(0.2)
        self.udp = u.getsockname()[1]
        self.socks.append(u)
        self.unix = f"fs9-test-{os.getpid()}-{time.monotonic_ns()}"
        x = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        x.bind("\0" + self.unix)
        x.listen()
        x.settimeout(0.2)
        self.socks.append(x)
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _tcp(self) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        s.settimeout(0.2)
        self.socks.append(s)
        return s.getsockname()[1]

    def _serve(self) -> None:
        while self.running:
            for s in self.socks:
                try:
                    if s.type == socket.SOCK_DGRAM:
                        self.got.append(s.recv(100))
                    else:
                        conn, _ = s.accept()
                        conn.settimeout(2)
                        self.got.append(conn.recv(100))
                        conn.close()
                except OSError:
                    pass

    def words(self) -> str:
        return f"{self.tcp[0]} {self.tcp[1]} {self.udp} {self.unix}\n"

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        for s in self.socks:
            s.close()


@pytest.fixture
def listeners():
    ls = Listeners()
    yield ls
    ls.close()


def run(mount, agent: str, manifest: str, stdin: str) -> str:
    mount.define(agent, manifest, {"probe.py": PROBE})
    mount.sh(f"echo 'spawn {agent}' > ctl", check=True)
    mount.write(f"agents/{agent}/in", stdin)
    mount.wait_for(lambda: mount.status(agent)["done"] == "1" or
                   mount.status(agent)["failed"] == "1", 60, f"{agent}'s task")
    return mount.read(f"agents/{agent}/out")


def test_no_inet_no_network(mount, listeners):
    out = run(mount, "quiet", 'cmd = ["python3", "probe.py"]\npledge = ["read"]\n',
              listeners.words())
    assert "sent" not in out.replace("udp refused", ""), out
    deadline = time.monotonic() + 2  # a datagram in flight would have arrived by now
    while time.monotonic() < deadline and not listeners.got:
        time.sleep(0.05)
    assert listeners.got == [], listeners.got
    def denied(syscall):
        return any(e["kind"] == "escape_denied" and e.get("agent") == "quiet"
                   and e.get("syscall") == syscall
                   for e in map(json.loads, mount.read("log/audit").splitlines()))
    if netrules.abi() >= 4:  # TCP is refused by Landlock: audited, naming the agent
        mount.wait_for(lambda: denied("connect"), 20, "an escape_denied event for connect")
    mount.wait_for(lambda: denied("sendto"), 20, "an escape_denied event for the datagram")
    assert "network reach: none" in mount.read("agents/quiet/manifest")
    assert "net=none" in mount.read("registry/quiet")


def test_inet_reaches_and_net_connect_narrows(mount, listeners):
    out = run(mount, "online", 'cmd = ["python3", "probe.py"]\npledge = ["read", "inet"]\n',
              listeners.words())
    assert out.startswith("tcp sent tcp2 sent udp sent"), out
    mount.wait_for(lambda: b"secret-tcp" in listeners.got, 10, "the listener to receive")
    narrow = ('cmd = ["python3", "probe.py"]\npledge = ["read", "inet"]\n'
              f'[net]\nconnect = [{listeners.tcp[0]}]\n')
    listeners.got.clear()
    out = run(mount, "narrow", narrow, listeners.words())
    assert out.startswith("tcp sent tcp2 refused 13"), out  # EACCES: Landlock
    assert f"tcp connect {listeners.tcp[0]}" in mount.read("agents/narrow/manifest")


def test_no_shared_ipc_and_only_own_processes(mount):
    mount.define("a", 'cmd = ["sh", "-c", "ipcmk -Q >/dev/null; ipcs -q | grep -c 0x; '
                      'ls /proc | grep -c \'^[0-9]\'"]\npledge = ["read"]\n')
    mount.define("b", 'cmd = ["sh", "-c", "ipcs -q | grep -c 0x; ls /proc | grep -c \'^[0-9]\'"]'
                      '\npledge = ["read"]\n')
    for name in ("a", "b"):
        mount.sh(f"echo 'spawn {name}' > ctl; echo go > agents/{name}/in", check=True)
        mount.wait_for(lambda: mount.status(name)["latest_state"] in ("done", "failed"), 60,
                       f"{name}'s task")
    a, b = mount.read("agents/a/out").split(), mount.read("agents/b/out").split()
    assert a[0] == "1" and b[0] == "0", (a, b)  # b does not see a's queue
    assert int(a[1]) < 10 and int(b[1]) < 10, (a, b)  # its own few processes, not the host's
