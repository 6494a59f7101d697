"""An agent run by another node of the cluster (kernel/cluster/), as files on this one.

agents/NAME of a remote agent has ctl, err, in, mail/, manifest, out, outbox/, status and
tasks/ (and, unlisted, mail/batch and mail/ack): each request goes to the node that runs
it (Work.ask), for this node's operator. In an agent's view (resolve_as), a remote
cluster agent the view shows has what the view shows of ctl, err, in, mail/ (new,
batch written, next, its messages; ack is EACCES, as another agent's), manifest, out,
status and tasks/: each checked as that agent here (its view and pledges by the face;
the rest by kernel/cluster/proxy.py, mail by kernel/cluster/mail.py), then carried to
the agent's node with the asker set by this node, which checks the recipient's side
(the asker's clearance for what it reads); an agent sees the other agents of its own
node as on a single fs9. `in`, `mail/new` and
`ctl run` of any agent placed in the cluster, local or remote, go through JetStream
(kernel/cluster/work.py), so that they outlive the node that runs it.
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
from .cursors import BatchCursor
from .kinds import Batch, Ctl, Dir, Status, StreamNode

FILES = ("ctl", "err", "in", "mail", "manifest", "out", "outbox", "status", "tasks")
TASK_FILES = ("err", "input", "out", "status")
VIEW_FILES = ("ctl", "err", "in", "mail", "manifest", "out", "status",
              "tasks")  # a remote agent, in a view
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
        return Ctl(lambda d: _guarded(k, c.work.ctl(name, d), said),
                   local.status_line if local is not None else None)
    if name in k.agents or c.remote(name) is None:
        return None
    ask = _Asker(k, name, f"agents/{name}/{'/'.join(path[2:])}")
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
        return Batch(lambda: RemoteBatch(ask), lambda head, lines: _guarded(
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


def resolve_as(k, path: tuple[str, ...], me: str):
    """The node for path in agent me's view when the cluster serves it, else None:
    `agents/TO/mail/new` of an agent TO placed in the cluster (here or on another node)
    is mail from me through JetStream (kernel/cluster/mail.py); of a remote TO, what a
    twin of TO on this node would show me, asked of TO's node as me. (The view already
    let me reach path.)"""
    c = k.cluster
    if c is None or len(path) < 2 or path[0] != "agents" or c.placed(path[1]) is None:
        return None
    to, rest = path[1], path[2:]
    if rest == ("mail", "new"):
        if not c.mail.knows(me, to):
            raise Fs9Error(errno.ENOENT, "no such file")
        return agent_mail(k, to, me, dict(agent=me, file=f"agents/{to}/mail/new"))
    if to in k.agents:  # run here: served as any local agent's files, but its work
        return _local_work(k, to, rest, me)
    if not c.mail.knows(me, to):
        raise Fs9Error(errno.ENOENT, "no such file")
    said, proxy = dict(agent=me, file=f"agents/{to}/{'/'.join(rest)}"), c.proxy
    asker = proxy.asker(me)
    ask = _Asker(k, to, said["file"], said=said, asker=asker)
    view = k.agents[me].view

    def shown(names) -> list:  # (what the view shows of a directory, as the tree lists)
        return [n for n in names if view.access(path + (n,)) is not None]
    if rest == ():  # listed once its node says me is cleared for it (as a local twin's)
        async def files() -> list:
            await ask("status")
            return shown(VIEW_FILES)
        return AskedDir(files)
    if rest == ("mail",):  # a new name here is one message, as mail/new
        return ask.listing("mail", ["dead", "new", "next"], shown,
                           create=lambda _: agent_mail(k, to, me, said))
    if rest == ("in",):  # a task, its result mailed back to me (proxy.py)
        return Ctl(lambda d: _guarded(k, proxy.task(me, to, d), said), whole=True,
                   refused=lambda e: k.refused(e, **said))
    if rest == ("ctl",):
        return Ctl(lambda d: _guarded(k, proxy.ctl(me, to, d), said))
    if rest in (("out",), ("err",)):
        fd = 1 if rest[0] == "out" else 2
        return StreamNode(lambda: RemoteOut(c.work, to, fd, notes=fd == 2, asker=asker))
    if rest in (("status",), ("manifest",)):
        return ask.text(rest[0])
    if rest == ("mail", "batch"):  # written only (reading another's mail: on its node)
        return Batch(_WriteOnly, lambda head, lines: _guarded(
            k, proxy.batch(me, to, head, lines), said))
    if rest == ("mail", "ack"):
        raise Fs9Error(errno.EACCES, f"only {to} acknowledges its mail")
    return _read_as(c, ask, rest, shown, asker) or _not_found()


def _local_work(k, to: str, rest: tuple[str, ...], me: str):
    """`in`, `ctl` and mail/batch written by agent me of cluster agent `to` this node
    runs: its tasks and batches go through JetStream as to a remote one (proxy.py), so
    that they outlive this node (ctl's other verbs act here, as on one node; a batch is
    read here). None: any other file, served as a local agent's."""
    c, said = k.cluster, dict(agent=me, file=f"agents/{to}/{'/'.join(rest)}")
    if rest == ("in",):  # a task, its result mailed back to me (proxy.py)
        return Ctl(lambda d: _guarded(k, c.proxy.task(me, to, d), said), whole=True,
                   refused=lambda e: k.refused(e, **said))
    if rest == ("ctl",):  # (refusals of its verbs said as the agent's, as on one node)
        return Ctl(lambda d: _guarded(k, c.proxy.ctl(me, to, d), dict(agent=to, file="ctl")),
                   k.agents[to].status_line)
    if rest == ("mail", "batch"):
        return Batch(lambda: BatchCursor(k, k.agents[to]), lambda head, lines: _guarded(
            k, c.proxy.batch(me, to, head, lines), said))
    return None


def _read_as(c, ask, rest: tuple[str, ...], shown, asker: dict):
    """What an agent of this node reads of remote agent ask.name through its view, as
    of a local twin (its view and pledges checked by the face; its clearance by the
    agent's node, answers.py): tasks/, a task's files, the mailbox, a message (read: a
    delivery there, as a local read is) and mail/next. None: no such file."""
    name = ask.name
    if rest == ("tasks",):
        return ask.listing("tasks", keep=shown)
    if rest[0] == "tasks" and TASK_RE.fullmatch(rest[1]):
        task = int(rest[1])
        if len(rest) == 2:
            return Dir(names=lambda: shown(TASK_FILES + ("progress",)))
        if rest[2:] in (("out",), ("err",)):
            fd = 1 if rest[2] == "out" else 2
            return StreamNode(lambda: RemoteOut(c.work, name, fd, task=task, asker=asker))
        if rest[2:] in (("input",), ("status",)):
            return ask.text("task", task=task, what=rest[2])
        if rest[2:] == ("progress",):  # (the face refuses it first: only name reports)
            return Ctl(_only_its_own(name))
    if rest == ("mail", "next"):
        return StreamNode(lambda: RemoteNext(ask))
    if rest == ("mail", "dead"):
        return ask.listing("mail", keep=shown, dead=True)
    dead = rest[:2] == ("mail", "dead")
    if rest[0] == "mail" and len(rest) == 2 + dead and MSG_RE.fullmatch(rest[-1]):
        return ask.text("msg", msg=rest[-1], dead=dead)
    return None


def _only_its_own(name: str):
    def refuse(_data: bytes) -> None:
        raise Fs9Error(errno.EACCES, f"only agent {name} reports on its tasks")
    return refuse


def _not_found():
    raise Fs9Error(errno.ENOENT, "no such file")


def agent_mail(k, to: str, sender: str, said: dict) -> Ctl:
    """One message from agent sender to cluster agent `to` (mail/new in its view, or its
    outbox/TO): checked here as sender, stored in JetStream at close."""
    mail = k.cluster.mail
    return Ctl(lambda d: _guarded(k, mail.send(to, d, sender), said), whole=True,
               refused=lambda e: k.refused(e, **said),
               early=lambda d: k.guarded(mail.precheck, to, d, sender, **said),
               early_until=b"\n\n")


class _Asker:
    """Requests about one remote agent for one path: a refusal is said (root err,
    events) and raised with its errno."""

    def __init__(self, k, name: str, file: str, said: dict | None = None,
                 asker: dict | None = None) -> None:
        self.k, self.name, self.said = k, name, said or dict(file=file)
        self.asker = asker or {}  # an agent of this node asking (proxy.py): who

    async def __call__(self, op: str, **args) -> dict:
        return await _guarded(self.k, self.k.cluster.work.ask(self.name, op, **args,
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

    def text(self, op: str, **args) -> Status:
        """A file whose text the agent's node renders at open (fetched whole)."""
        got = {}

        async def fetch():
            got["now"] = await self.whole(op, **args)
        return Status(lambda: got.get("now", b""), prepare=fetch)

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
    return Ctl(lambda d: _guarded(k, k.cluster.work.submit(name, d, kind), said), whole=True,
               refused=lambda e: k.refused(e, **said))


async def _guarded(k, request, said: dict):
    """Await a request to the cluster; a refusal is said (root err, events) and raised."""
    try:
        return await request
    except Fs9Error as e:
        k.refused(e, **said)
        raise


class Buffered:
    """What a remote stream's reader has fetched and not yet handed on (`buf`), and
    whether its source has ended; the face reads it as it reads a local stream."""
    buf: bytes
    ended: bool

    def readable(self) -> bool:
        return bool(self.buf) or self.ended

    def at_end(self) -> bool:
        return self.ended and not self.buf

    def take(self, size: int) -> bytes:
        data, self.buf = self.buf[:size], self.buf[size:]
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


class _WriteOnly:
    """The read side of another node's agent's mail/batch in a view: refused."""

    def readable(self) -> bool:
        return True

    async def wait_readable(self) -> None:
        pass

    def take(self, size: int) -> bytes:
        raise Fs9Error(errno.EACCES, "another node's agent's mail is read on its node")
