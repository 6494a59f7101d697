"""Requests from other nodes about the agents this node runs, answered here.

Another node's operator reads and drives an agent placed here through its own mount
(face/remote.py): each file it opens there is a request on fs9.rpc.NODE (engine.py),
answered within this kernel as the operator's own request here would be: ctl verbs and
their errors, its state line, status, manifest, the tasks and their input, status, out and err, the
mailbox's listing, a message (read: delivered, as a local open is; rm: acked), its head
(mail/next), many messages read (mail/batch) or acknowledged (mail/ack), a message
sent as the agent (outbox/TO, checked as the agent here). A node is a peer (the
operator's machine). An agent of the asking node reads or drives an agent here through
its view (proxy.py): its node checked its view and pledges and says who asks (`by`,
`clearance`); here `ctl` is checked as Agent.ctl checks an agent's, and what it reads
(AGENTS_ASK: ctl's state line, out, err, status, manifest, tasks, the mailbox, a
message, mail/next, mail/batch)
needs its clearance (EACCES); nothing else is answered to an agent.
Bounded: a blob goes back OUT_CHUNK bytes an answer (NATS's
payload is 1 MiB), the asker asks again from where it got to.
"""
import base64
import collections
import errno
import json
import os

import trio

from ...errors import Fs9Error
from ..agents import manifest as manifests
from .. import finished
from ..bus import batch
from ..task import Task
from .work import TAKEN_S

OUT_CHUNK = 64 << 10  # bytes of a blob (output, input, a message) per answer
STASHED = 16  # mail/batch reads longer than an answer, kept for their asker to go on
# what an agent of another node may ask through its view (proxy.py), as it reads and
# drives a local twin: its mail is acked and sent as it only by it
AGENTS_ASK = frozenset({"ctl", "state", "out", "status", "manifest", "tasks", "task",
                        "mail", "msg", "next", "batch"})
WAIT_OUT_S = 0.5  # an `out` request waits this long for more output before answering
# (the asker's read is that much slower to see a signal: RemoteOut shields the request)


class Answers:
    def __init__(self, cluster) -> None:
        self.cluster, self.kernel = cluster, cluster.kernel
        self.stash: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    async def serve(self, receive) -> None:
        """Answer each (request, reply) from the engine; until cancelled."""
        async with trio.open_nursery() as nursery:
            async for data, reply in receive:
                nursery.start_soon(self._answer, data, reply)

    async def _answer(self, data: bytes, reply) -> None:
        try:
            answer = await self._op(json.loads(data))
        except Fs9Error as e:
            answer = dict(errno=errno.errorcode.get(e.errno, "EIO"), text=e.text)
        except (ValueError, KeyError, TypeError) as e:
            answer = dict(errno="EINVAL", text=f"bad request: {type(e).__name__}")
        except Exception:  # a defect of ours costs this answer, not the node
            self.kernel.log.bug("cluster request")
            answer = dict(errno="EIO", text="internal error on the agent's node (its bug event)")
        reply(json.dumps(answer).encode())

    async def _op(self, req: dict) -> dict:
        k, name, op = self.kernel, str(req["agent"]), req["op"]
        if op == "taken":  # (asked by a writer as soon as its work is stored: the agent,
            # just moved here, may not run yet; its work waits, and the write stands)
            with trio.move_on_after(TAKEN_S):
                await self.cluster.work.wait_taken(str(req["corr"]))
            return {}
        p = self.cluster.placed(name)
        agent = k.agents.get(name)
        if p is None or p.get("node") != self.cluster.me or agent is None or agent.killed:
            raise Fs9Error(errno.ENOENT, f"no such agent here: {name}")
        said = dict(agent=name, file=f"{op} (from node {p.get('by', '?')})")
        pos = int(req.get("pos", 0))
        by = self.cluster.proxy.check_reader(agent, req)  # (an agent of the asking node)
        if by is not None and op not in AGENTS_ASK:
            raise Fs9Error(errno.EACCES, f"{op} of a remote agent is the operator's")
        if op == "status":
            return _chunk(agent.status(), pos)
        if op == "state":  # (ctl read: its state line)
            return _chunk(agent.status_line(), pos)
        if op == "manifest":
            return _chunk(manifests.text(agent.manifest), pos)
        if op == "ctl":
            k.guarded(agent.ctl, base64.b64decode(req["data"]), by, **said)
            return {}
        if op == "out":
            task = agent.shown_task() if req.get("task") is None else self._task(agent, req)
            return await self._out(agent, task, pos, 2 if req.get("fd") == 2 else 1,
                                   bool(req.get("notes")))
        if op == "tasks":  # (listings as lines, in chunks too: a list may be long)
            return _chunk("".join(f"{t.id}\n" for t in agent.tasks), pos)
        if op == "task":
            task = self._task(agent, req)
            return _chunk(k.task_input(task) if req.get("what") == "input" else task.status(),
                          pos)
        if op == "mail":
            box = sorted(agent.mailbox.dead) if req.get("dead") else agent.mailbox.order
            return _chunk("".join(f"{name}\n" for name in box), pos)
        if op == "msg":
            msg = (agent.mailbox.dead if req.get("dead") else agent.mailbox.pending).get(
                str(req["msg"]))
            if msg is None:
                raise Fs9Error(errno.ENOENT, f"no such message: {str(req['msg'])[:100]}")
            if not req.get("dead") and pos == 0:
                k.bus.delivered(agent, msg)  # read, as a local open of it is
            return _chunk(msg.render(), pos)
        if op == "ack":
            k.guarded(k.bus.ack, agent, str(req["msg"]), **said)
            return {}
        if op == "acks":  # mail/ack: many at once, as on its node
            k.guarded(batch.ack, k.bus, agent, base64.b64decode(req["data"]), **said)
            return {}
        if op == "batch":  # mail/batch read: the pending messages, once there is one
            return await self._batch(agent, req.get("token"), pos)
        if op == "next":  # mail/next: the head of the mailbox, once there is one
            with trio.move_on_after(WAIT_OUT_S):
                await agent.mailbox.wait_pending()
            return dict(msg=agent.mailbox.head().name if agent.mailbox.order else None)
        if op == "outbox":  # outbox/TO: the operator sends as the agent, as on its node
            return await self._outbox(agent, str(req["to"]), base64.b64decode(req["data"]),
                                      said)
        raise Fs9Error(errno.EINVAL, f"no such request: {op}"[:200])

    async def _outbox(self, agent, to: str, data: bytes, said: dict) -> dict:
        """One message from agent to `to`, the other node's operator acting for it (as
        `outbox/TO` on this node): to a cluster agent through JetStream (mail.py), checked
        as agent; to an agent of this node only, into its mailbox."""
        k = self.kernel
        if self.cluster.placed(to) is not None:
            try:
                await self.cluster.mail.send(to, data, agent.name)
            except Fs9Error as e:
                k.refused(e, **said)
                raise
        else:
            k.guarded(k.bus.send, k.guarded(k.agent, to, **said), data, agent.name, **said)
        return {}

    async def _batch(self, agent, token, pos: int) -> dict:
        """What agent's mail/batch reads (its deliveries logged here), a chunk an
        answer; one longer than an answer is kept (STASHED at most) under a token its
        asker goes on with. Nothing is acknowledged by reading: a batch dropped from the
        stash is read again."""
        if token is None:
            with trio.move_on_after(WAIT_OUT_S):
                await agent.mailbox.wait_pending()
            blob, token = batch.take(self.kernel.bus, agent), os.urandom(8).hex()
        else:
            blob = self.stash.pop(str(token), None)
            if blob is None:
                raise Fs9Error(errno.ENOENT, "a mail/batch read no longer kept: read again")
        answer = _chunk(blob, pos)
        if answer["more"]:
            self.stash[str(token)] = blob
            while len(self.stash) > STASHED:
                self.stash.popitem(last=False)
            answer["token"] = token
        return answer

    def _task(self, agent, req: dict) -> Task:
        task = finished.of(self.kernel, agent, int(req["task"]))
        if task is None:
            raise Fs9Error(errno.ENOENT, f"no such task of {agent.name}: {int(req['task'])}")
        return task

    async def _out(self, agent, task: Task | None, pos: int, fd: int, notes: bool) -> dict:
        """task's stdout or stderr (fd) from pos, waiting up to WAIT_OUT_S for some;
        ended: all of it has been given (then, notes: the agent's notes, as `err` ends)."""
        after = dict(notes=base64.b64encode(bytes(agent.notes)).decode()) if notes else {}
        if task is None:
            return dict(task=None, data="", ended=True, **after)
        with trio.move_on_after(WAIT_OUT_S):
            if task.state == "queued":
                await task.wait_started()
            await self.kernel.stream(task, fd).wait_readable(pos)
        if task.state == "queued":
            return dict(task=task.id, data="", ended=False)
        stream = self.kernel.stream(task, fd)
        chunk = bytes(stream.data[pos:pos + OUT_CHUNK])
        ended = stream.ended and pos + len(chunk) >= len(stream.data)
        return dict(task=task.id, data=base64.b64encode(chunk).decode(), ended=ended,
                    **(after if ended else {}))


def _chunk(blob: str | bytes, pos: int) -> dict:
    """blob from pos, at most OUT_CHUNK bytes; more: there is more after it."""
    data = blob.encode() if isinstance(blob, str) else bytes(blob)
    return dict(data=base64.b64encode(data[pos:pos + OUT_CHUNK]).decode(),
                more=pos + OUT_CHUNK < len(data))
