"""An agent run by another node of the cluster (kernel/cluster/), as files on this one.

agents/NAME of a remote agent has ctl, err, in, mail/, manifest, out, outbox/, status and
tasks/ (and, unlisted, mail/batch and mail/ack): each request goes to the node that runs
it (Work.ask), for this node's operator. `in`, `mail/new` and `ctl run` of any agent
placed in the cluster, local or remote, go through JetStream (kernel/cluster/work.py),
so that they outlive the node that runs it. An agent's view of them: remoteview.py,
which asks with the requests here.
Lookups are answered here without asking (FUSE's lookup does not wait on the network):
a task number or a message name is a file whose reads ask, and ENOENT comes at the
read when the agent's node has no such task or message.
"""
import base64
import errno
import re

import trio

from ..errors import Fs9Error
from ..kernel.names import NAME_RE, OPERATOR
from .batchfile import Batch
from .kinds import Ctl, Dir, Status, StreamNode

FILES = ("ctl", "err", "in", "mail", "manifest", "out", "outbox", "status", "tasks")
TASK_FILES = ("err", "input", "out", "status")
TASK_RE = re.compile(r"[1-9][0-9]{0,17}")  # one name per task: 0005 is not 5
MSG_RE = re.compile(r"[0-9]-[a-z]+-[0-9]{10}")  # Message.name


def resolve(k, path: tuple[str, ...]):
    """The node for path when the cluster serves it (the operator asking), else None."""
    c = k.cluster
    if c is None or len(path) < 2 or path[0] != "agents":
        return None
    name = path[1]
    if path[2:] in (("in",), ("mail", "new")) and c.placed(name) is not None:
        return _queue(k, name, "task" if path[2] == "in" else "mail")
    if path[2:] == ("ctl",) and c.placed(name) is not None:  # (`run` through JetStream)
        local = k.agents.get(name)
        said = dict(agent=name, file="ctl") if local else dict(file=f"agents/{name}/ctl")

        def apply(data: bytes):
            return guarded(k, c.work.ctl(name, data), said)
        return Ctl(apply, local.status_line) if local is not None else \
            Asker(k, name, said["file"]).ctl(apply)
    if name in k.agents or c.remote(name) is None:
        return None
    ask = Asker(k, name, f"agents/{name}/{'/'.join(path[2:])}")
    rest = path[2:]
    if not rest:
        return Dir(names=lambda: list(FILES))
    if rest == ("status",):
        return ask.text("status")
    if rest == ("manifest",):
        return ask.text("manifest")
    if rest in (("out",), ("err",)):
        fd = 1 if rest[0] == "out" else 2
        return StreamNode(lambda: RemoteOut(c.work, name, fd, notes=fd == 2))
    if rest == ("tasks",):
        return ask.listing("tasks")
    if rest[0] == "tasks" and TASK_RE.fullmatch(rest[1]):
        task = int(rest[1])
        if len(rest) == 2:
            return Dir(names=lambda: list(TASK_FILES))
        if rest[2:] in (("out",), ("err",)):
            fd = 1 if rest[2] == "out" else 2
            return StreamNode(lambda: RemoteOut(c.work, name, fd, task=task))
        if rest[2:] in (("input",), ("status",)):
            return ask.text("task", task=task, what=rest[2])
    if rest == ("mail",):  # a new name here is one message, as mail/new
        return ask.listing("mail", ["dead", "new", "next"],
                           create=lambda _: _queue(k, name, "mail"))
    if rest == ("mail", "next"):
        return StreamNode(lambda: RemoteNext(ask))
    if rest == ("outbox",):  # outbox/TO: sent as the agent, by its node (answers.py)
        return Dir(names=list, create=lambda to: _outbox(k, ask, name, to))
    if rest == ("mail", "dead"):
        return ask.listing("mail", dead=True)
    if rest == ("mail", "batch"):  # read: as on its node; written: one stored batch a write
        return Batch(lambda: RemoteBatch(ask), lambda head, lines: guarded(
            k, c.proxy.batch(OPERATOR, name, head, lines), ask.said))
    if rest == ("mail", "ack"):
        return Ctl(lambda d: ask("acks", data=d))
    dead = rest[:2] == ("mail", "dead")
    if rest[0] == "mail" and len(rest) == 2 + dead and MSG_RE.fullmatch(rest[-1]):
        node = ask.text("msg", msg=rest[-1], dead=dead)
        if not dead:  # rm: the operator acknowledges it, as on the agent's node
            node.remove = lambda: ask("ack", msg=rest[-1])
        return node
    raise Fs9Error(errno.ENOENT, f"no such file: {'/'.join(path)}")

class Asker:
    """Requests about one remote agent for one path: a refusal is said (root err,
    events) and raised with its errno."""

    def __init__(self, k, name: str, file: str, said: dict | None = None,
                 asker: dict | None = None) -> None:
        self.k, self.name, self.said = k, name, said or dict(file=file)
        self.asker = asker or {}  # an agent of this node asking (proxy.py): who

    async def __call__(self, op: str, **args) -> dict:
        return await guarded(self.k, self.k.cluster.work.ask(self.name, op, **args,
                                                              **self.asker), self.said)

    async def whole(self, op: str, **args) -> bytes:
        """What op answers, asked a chunk at a time (a request's payload is bounded)."""
        data, pos = b"", 0
        while True:
            a = await self(op, pos=pos, **args)
            chunk = base64.b64decode(a.get("data", ""))
            data, pos = data + chunk, pos + len(chunk)
            if not a.get("more") or not chunk:
                return data

    def fetched(self, op: str, **args):
        """(render, prepare) of a text the agent's node renders at each read from its
        start (fetched whole)."""
        got = {}

        async def fetch():
            got["now"] = await self.whole(op, **args)
        return (lambda: got.get("now", b"")), fetch

    def text(self, op: str, **args) -> Status:
        """A file whose text the agent's node renders at open."""
        render, fetch = self.fetched(op, **args)
        return Status(render, prepare=fetch)

    def ctl(self, apply) -> Ctl:
        """ctl: written, apply; read, the agent's state line, as its node renders it."""
        render, fetch = self.fetched("state")
        return Ctl(apply, render, prepare=fetch)

    def listing(self, op: str, more=(), keep=list, create=None, **args) -> "AskedDir":
        """A directory whose names (a line each) the agent's node gives at each listing,
        and `more` names; those `keep` keeps (an agent's: what its view shows)."""
        async def ask():
            return keep((await self.whole(op, **args)).decode("utf-8", "replace").split()
                        + list(more))
        return AskedDir(ask, create)


class AskedDir(Dir):
    """A directory listed by a request (ask: async () -> its names)."""

    def __init__(self, ask, create=None) -> None:
        super().__init__(names=list, create=create)
        self.ask = ask

    async def listing(self, child) -> list:
        names = await self.ask()
        self.names = lambda: names
        return await super().listing(child)


def _outbox(k, ask, name: str, to: str) -> Ctl:
    """outbox/TO of remote agent name: one message from it, asked of its node at close."""
    if not NAME_RE.fullmatch(to):
        raise Fs9Error(errno.ENOENT, f"no such agent: {to[:100]}")
    said = dict(file=f"agents/{name}/outbox/{to}")
    return Ctl(lambda d: ask("outbox", to=to, data=d), whole=True,
               refused=lambda e: k.refused(e, **said))


def _queue(k, name: str, kind: str) -> Ctl:
    """in (kind task) or mail/new (kind mail) of agent name: the bytes of one open, stored
    in JetStream at close (the write fails if they are not, or the agent's node refuses)."""
    said = dict(agent=name if name in k.agents else None,
                file=f"agents/{name}/{'in' if kind == 'task' else 'mail/new'}")
    return Ctl(lambda d: guarded(k, k.cluster.work.submit(name, d, kind), said), whole=True,
               refused=lambda e: k.refused(e, **said))


async def guarded(k, request, said: dict):
    """Await a request to the cluster; a refusal is said (root err, events) and raised."""
    try:
        return await request
    except Fs9Error as e:
        k.refused(e, **said)
        raise


class Buffered:
    """What a remote stream's reader has fetched and not yet handed on (`buf` from
    `at`), and whether its source has ended; the face reads it as it reads a local
    stream. Filled only when all of it was handed on."""
    buf: bytes
    ended: bool
    at = 0  # how much of buf was handed on (a read copies its own size, not the rest)

    def readable(self) -> bool:
        return bool(self.buf) or self.ended

    def at_end(self) -> bool:
        return self.ended and not self.buf

    def kept(self) -> int:
        return len(self.buf)

    def take(self, size: int) -> bytes:
        data = self.buf[self.at:self.at + size]
        self.at += len(data)
        if self.at >= len(self.buf):
            self.buf, self.at = b"", 0
        return data


class RemoteOut(Buffered):
    """A reader's position in a remote agent's `out` or `err` (fd 1 or 2) of the task
    it follows (the one shown at the first answer) or of the task named, fetched a chunk
    at a time (each request waits a while for more); notes: the agent's notes on refused
    commands follow the task's stderr, as in a local agent's `err`."""

    def __init__(self, work, name: str, fd: int = 1, task: int | None = None,
                 notes: bool = False, asker: dict | None = None) -> None:
        self.work, self.name, self.fd, self.notes = work, name, fd, notes
        self.asker = asker or {}  # an agent of this node reading (proxy.py): who
        self.task, self.pos = task, 0
        self.buf, self.ended = b"", False

    async def wait_readable(self) -> None:
        while not self.readable():
            # shielded: the face's read waits in slices of SLICE_S, shorter than an
            # answer may take (WAIT_OUT_S); a cancelled request would lose its answer
            with trio.CancelScope(shield=True):
                a = await self.work.ask(self.name, "out", task=self.task, pos=self.pos,
                                        fd=self.fd, notes=self.notes, **self.asker)
            self.task = a.get("task")
            chunk = base64.b64decode(a.get("data", ""))
            self.buf += chunk
            self.pos += len(chunk)
            self.ended = bool(a.get("ended"))
            if self.ended:
                self.buf += base64.b64decode(a.get("notes", ""))


class RemoteNext(Buffered):
    """A reader of a remote agent's `mail/next`: asks its node for the mailbox's head
    (each request waits a while for one), then reads that message (a read there, as a
    local one is: a delivery)."""

    def __init__(self, ask) -> None:
        self.ask, self.buf, self.ended = ask, b"", False

    async def wait_readable(self) -> None:
        while not self.readable():
            with trio.CancelScope(shield=True):  # (as RemoteOut: an answer is not lost)
                head = (await self.ask("next")).get("msg")
                if not head:
                    continue
                try:
                    self.buf = await self.ask.whole("msg", msg=str(head))
                except Fs9Error as e:
                    if e.errno != errno.ENOENT:
                        raise
                    continue  # acknowledged meanwhile by another reader: the next head
            self.ended = True


class RemoteBatch(Buffered):
    """A reader of a remote agent's `mail/batch`: asks its node for the pending
    messages (each request waits a while for one), read there as a local read is (a
    line each, their deliveries logged there), fetched a chunk at a time."""

    def __init__(self, ask) -> None:
        self.ask, self.buf, self.ended = ask, b"", False

    async def wait_readable(self) -> None:
        while not self.readable():
            with trio.CancelScope(shield=True):  # (as RemoteOut: an answer is not lost)
                a = await self.ask("batch")
                data = base64.b64decode(a.get("data", ""))
                while a.get("more") and a.get("token"):
                    a = await self.ask("batch", token=str(a["token"]), pos=len(data))
                    chunk = base64.b64decode(a.get("data", ""))
                    if not chunk:
                        break
                    data += chunk
            if data:
                self.buf, self.ended = data, True
