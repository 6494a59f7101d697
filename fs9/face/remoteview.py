"""An agent of this node reading and driving a cluster agent through its view (walk.py
asks `resolve_as` for a path in an agent's view), as it would a twin on its own node.

Of a remote agent (run by another node) the view shows what it unveils of ctl, err, in,
mail/ (new, batch, next, the messages; ack is EACCES, as another agent's),
manifest, out, status and tasks/: each checked as that agent here (its view and pledges
by the face; the rest by kernel/cluster/proxy.py, mail by kernel/cluster/mail.py), then
carried to the agent's node (face/remote.py's requests) with the asker set by this node,
which checks the recipient's side (the asker's clearance for what it reads). Of an agent
placed in the cluster that this node runs, the agent's `in`, `ctl run`, `mail/batch` and
`mail/new` go through JetStream too (kernel/cluster/work.py), so that they outlive this
node; everything else of it is served as any local agent's files.
"""
import errno

from ..errors import Fs9Error
from .cursors import BatchCursor
from .batchfile import Batch
from .kinds import Ctl, Dir, StreamNode
from .remote import (MSG_RE, TASK_FILES, TASK_RE, AskedDir, Asker, RemoteBatch, RemoteNext,
                     RemoteOut, guarded)

VIEW_FILES = ("ctl", "err", "in", "mail", "manifest", "out", "status",
              "tasks")  # a remote agent, in a view


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
    ask = Asker(k, to, said["file"], said=said, asker=asker)
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
        return Ctl(lambda d: guarded(k, proxy.task(me, to, d), said), whole=True,
                   refused=lambda e: k.refused(e, **said))
    if rest == ("ctl",):
        return ask.ctl(lambda d: guarded(k, proxy.ctl(me, to, d), said))
    if rest in (("out",), ("err",)):
        fd = 1 if rest[0] == "out" else 2
        return StreamNode(lambda: RemoteOut(c.work, to, fd, notes=fd == 2, asker=asker))
    if rest in (("status",), ("manifest",)):
        return ask.text(rest[0])
    if rest == ("mail", "batch"):  # read as a twin's: there, its deliveries logged there
        return Batch(lambda: RemoteBatch(ask), lambda head, lines: guarded(
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
        return Ctl(lambda d: guarded(k, c.proxy.task(me, to, d), said), whole=True,
                   refused=lambda e: k.refused(e, **said))
    if rest == ("ctl",):  # (refusals of its verbs said as the agent's, as on one node)
        return Ctl(lambda d: guarded(k, c.proxy.ctl(me, to, d), dict(agent=to, file="ctl")),
                   k.agents[to].status_line)
    if rest == ("mail", "batch"):
        return Batch(lambda: BatchCursor(k, k.agents[to]), lambda head, lines: guarded(
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
    return Ctl(lambda d: guarded(k, mail.send(to, d, sender), said), whole=True,
               refused=lambda e: k.refused(e, **said),
               early=lambda d: k.guarded(mail.precheck, to, d, sender, **said),
               early_until=b"\n\n")
