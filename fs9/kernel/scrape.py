"""`fs9 mount --metrics 127.0.0.1:PORT`: the operator's exposition over HTTP, for a
Prometheus scraper, answered to the operator's programs only.

The address must be a loopback one (the exposition names every agent), but loopback is
not the operator's alone: an agent that pledged `inet` shares the host's network, and
so may other users of the host. So each connection's peer is looked up before anything
is read from it: the socket at the other end is in the kernel's table of TCP sockets
(/proc/net/tcp, tcp6: the peer's address and port as its local ones) with the uid that
made it, and only root and fs9's own uid (those the mount admits as the operator) are
answered; any other connection is closed unread, and an agent's is a `refused` event
(and a line in its err), as its refusals through the mount are.

prometheus-client's WSGI app renders (make_wsgi_app: also what start_http_server
serves); wsgiref's threading server runs it, with socketserver's own hook for refusing
a connection (verify_request).
"""
import errno
import ipaddress
import os
import socket
import struct
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import trio
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.parser import text_string_to_metric_families

from ..errors import Fs9Error
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kernel import Kernel

TIME_WAIT = "06"  # a closed socket's row: its uid is 0, whoever made it


def http_address(text: str) -> tuple[str, int]:
    """HOST:PORT of --metrics, a loopback address (the exposition names every agent);
    ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9109")
    if not loopback:
        raise ValueError(f"--metrics {text!r}: serve it on a loopback address (127.0.0.1, "
                         "::1): it names every agent; put a proxy in front to reach it")
    return host, int(port)


def _row_address(family: int, host: str, port: int) -> str:
    """An address as /proc/net/tcp* prints it: the address's 32-bit words in the host's
    byte order, then the port, all in hex."""
    raw = socket.inet_pton(family, host)
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def peer_uid(conn: socket.socket) -> int | None:
    """The uid that made the socket at the other end of conn (a TCP connection on this
    host), or None if it is not found (gone, closed, or not on this host)."""
    family = conn.family
    mine, theirs = conn.getsockname()[:2], conn.getpeername()[:2]
    want = (_row_address(family, *theirs), _row_address(family, *mine))
    table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
    with open(table) as f:
        next(f)  # the heading
        for line in f:
            fields = line.split()  # sl local remote st queues tr retrnsmt uid ...
            if (fields[1], fields[2]) == want:
                return None if fields[3] == TIME_WAIT else int(fields[7])
    return None


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:
        pass  # a scrape every few seconds is not news


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    admitted: frozenset[int] = frozenset()
    turned_away = staticmethod(lambda uid: None)  # (uid or None): said where it belongs

    def verify_request(self, request, client_address) -> bool:
        try:
            uid = peer_uid(request)
        except OSError:
            uid = None
        if uid in self.admitted:
            return True
        self.turned_away(uid)
        return False


async def serve_http(kernel: "Kernel", host: str, port: int, *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the operator's exposition at http://HOST:PORT/ until cancelled."""
    token = trio.lowlevel.current_trio_token()

    class OnTrioThread:  # a scrape (the server's thread) renders on the trio thread
        def collect(self):
            text = trio.from_thread.run_sync(kernel.metrics.text, trio_token=token)
            return list(text_string_to_metric_families(text))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OnTrioThread())

    def turned_away(uid: int | None) -> None:  # (the server's thread)
        try:
            token.run_sync_soon(_refused, kernel, uid)
        except trio.RunFinishedError:
            pass

    class Server(_Server):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        admitted = frozenset({0, os.getuid()})
    Server.turned_away = staticmethod(turned_away)
    server = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        task_status.started()
        await trio.sleep_forever()
    finally:
        server.shutdown()
        server.server_close()


def _refused(kernel: "Kernel", uid: int | None) -> None:
    """Trio thread: a connection to the metrics address from someone not the operator;
    an agent's is its refusal (coalesced like the rest), anyone else's is not logged
    (a host user's probes are not fs9's to count)."""
    holder = kernel.uids.get(uid)  # (an index: a walk of every agent was a connection's cost)
    agent = holder.name if holder is not None and not holder.killed else None
    if agent is not None:
        kernel.refused(Fs9Error(errno.EACCES, "the metrics address answers the operator "
                                              "only"), agent=agent, file="metrics (http)")
