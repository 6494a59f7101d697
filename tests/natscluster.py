"""Three real nats-servers joined as one JetStream cluster on 127.0.0.1 (free ports),
each a natsserver.NatsServer with its own store in a temporary directory, every write
fsynced (`sync_interval: always`): an acknowledged write is on disk on a quorum of
servers. For the cluster tests (test_cluster.py) and bench/cluster.py. A new meta leader
is elected some seconds after a kill -9 (4-9 s seen): callers wait on conditions with
generous bounds."""
import json
from pathlib import Path

from natsserver import NatsServer, free_port


class ClusterServer(NatsServer):
    """One server of the cluster: named, routed to every server (itself included: it
    skips its own route)."""

    def __init__(self, root: Path, name: str, port: int, route: int, routes: list[int],
                 more: str = "") -> None:
        others = ", ".join(f'"nats://127.0.0.1:{r}"' for r in routes)
        super().__init__(root, port, f'server_name: "{name}"\n'
                                     f'cluster {{\n  name: "fs9"\n  listen: "127.0.0.1:{route}"\n'
                                     f'  routes: [{others}]\n}}\n' + more)
        self.name = name


class NatsCluster:
    """n servers (n1..nN), each routed to all the others."""

    def __init__(self, root: Path, n: int = 3, users: dict[str, str] | None = None) -> None:
        """users: clients' user -> password (none: anyone connects). Each user may not
        subscribe to another user's fs9.rpc.NAME: one node cannot answer for another."""
        ports = [(free_port(), free_port()) for _ in range(n)]
        auth = "" if not users else "authorization {\n  users = [\n" + "".join(
            _user(u, pw, [o for o in users if o != u]) for u, pw in users.items()) + "  ]\n}\n"
        self.servers = [ClusterServer(root / f"n{i + 1}", f"n{i + 1}", port, route,
                                      [r for _, r in ports], auth)
                        for i, (port, route) in enumerate(ports)]

    @property
    def urls(self) -> str:
        """Every server's URL, comma-separated (fs9 mount --cluster takes this)."""
        return ",".join(s.url for s in self.servers)

    def urls_as(self, user: str, password: str) -> str:
        return ",".join(s.url.replace("//", f"//{user}:{password}@") for s in self.servers)

    def start(self) -> "NatsCluster":
        for s in self.servers:  # side by side: all launched, then each waited for
            s.launch()
        for s in self.servers:
            s.wait_ready()
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


def _user(user: str, password: str, others: list[str]) -> str:
    deny = json.dumps([f"fs9.rpc.{o}" for o in others])  # (a JSON list is a NATS one)
    return (f'    {{user: "{user}", password: "{password}", '
            f'permissions: {{subscribe: {{deny: {deny}}}}}}}\n')
