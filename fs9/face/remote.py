"""An agent run by another node of the cluster (kernel/cluster/), as files on this one.

agents/NAME of a remote agent has ctl, in, out, status and mail/new: each request goes
to the node that runs it (Work.ask), for this node's operator only (a view never
resolves a remote agent: an agent sees the agents of its own node, as on a single fs9).
`in` and `mail/new` of any agent placed in the cluster, local or remote, go through
JetStream (kernel/cluster/work.py), so that they outlive the node that runs it.
"""
import base64
import errno

import trio

from ..errors import Fs9Error
from .kinds import Ctl, Dir, Status, StreamNode

FILES = ("ctl", "in", "mail", "out", "status")


def resolve(k, path: tuple[str, ...]):
    """The node for path when the cluster serves it (the operator asking), else None."""
    c = k.cluster
    if c is None or len(path) < 2 or path[0] != "agents":
        return None
    name = path[1]
    if path[2:] in (("in",), ("mail", "new")) and c.placed(name) is not None:
        return _queue(k, name, "task" if path[2] == "in" else "mail")
    if name in k.agents or c.remote(name) is None:
        return None
    if len(path) == 2:
        return Dir(names=lambda: list(FILES))
    if path[2:] == ("mail",):  # a new name here is one message, as mail/new
        return Dir(names=lambda: ["new"], create=lambda _: _queue(k, name, "mail"))
    said = dict(file=f"agents/{name}/{path[2]}")
    if path[2:] == ("ctl",):
        return Ctl(lambda d: _guarded(k, c.work.ask(name, "ctl", data=d), said))
    if path[2:] == ("status",):
        text = {}

        async def fetch():
            text["now"] = (await _guarded(k, c.work.ask(name, "status"), said))["text"]
        return Status(lambda: text.get("now", ""), prepare=fetch)
    if path[2:] == ("out",):
        return StreamNode(lambda: RemoteOut(c.work, name))
    raise Fs9Error(errno.ENOENT, "no such file (a remote agent has ctl, in, out, status)")


def _queue(k, name: str, kind: str) -> Ctl:
    """in (kind task) or mail/new (kind mail) of agent name: the bytes of one open, stored
    in JetStream at close (the write fails if they are not, or the agent's node refuses)."""
    said = dict(agent=name if name in k.agents else None,
                file=f"agents/{name}/{'in' if kind == 'task' else 'mail/new'}")
    return Ctl(lambda d: _guarded(k, k.cluster.work.submit(name, d, kind), said), whole=True,
               refused=lambda e: k.refused(e, **said))


async def _guarded(k, request, said: dict):
    """Await a request to the cluster; a refusal is said (root err, events) and raised."""
    try:
        return await request
    except Fs9Error as e:
        k.refused(e, **said)
        raise


class RemoteOut:
    """A reader's position in a remote agent's `out`: the task it followed at the first
    answer, fetched a chunk at a time (each request waits a while for more)."""

    def __init__(self, work, name: str) -> None:
        self.work, self.name = work, name
        self.task, self.pos = None, 0
        self.buf, self.ended = b"", False

    def readable(self) -> bool:
        return bool(self.buf) or self.ended

    def at_end(self) -> bool:
        return self.ended and not self.buf

    async def wait_readable(self) -> None:
        while not self.readable():
            # shielded: the face's read waits in slices of SLICE_S, shorter than an
            # answer may take (WAIT_OUT_S); a cancelled request would lose its answer
            with trio.CancelScope(shield=True):
                a = await self.work.ask(self.name, "out", task=self.task, pos=self.pos)
            self.task = a.get("task")
            chunk = base64.b64decode(a.get("data", ""))
            self.buf += chunk
            self.pos += len(chunk)
            self.ended = bool(a.get("ended"))

    def take(self, size: int) -> bytes:
        data, self.buf = self.buf[:size], self.buf[size:]
        return data
