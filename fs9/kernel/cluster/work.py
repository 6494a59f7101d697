"""An agent's work across the cluster: its tasks and mail in JetStream, and requests
between nodes.

Tasks: `in` of an agent placed in the cluster, written on any node, is published to
FS9WORK (engine.py) and acknowledged to the writer once a quorum stored it. The node
that runs the agent reads them through the agent's consumer, queues each as a local
task whose correlation id is the message's id (so a message delivered again, after a
takeover or a restart, is the task it already is, not a second one), and holds the
message until the task has ended: then it stores the result in FS9RESULTS and acks the
message (work-queue retention drops it). A node lost with its state loses nothing
acknowledged: what it held was never acked, and the node that takes the agent over
reads it all again (at least once: a task whose result was stored but whose ack was
not re-runs, and its second result says so by its id). The operator's mail to such an
agent (`mail/new`) goes the same way: delivered to the mailbox of the node running the
agent, held until the agent has acked it (and, a work_request, until its task ended).
A message the recipient's node refuses (message.parse, clearance) is acked there and
its reason goes back to the writer's write.

Requests: another node's ctl, status and out of an agent run here are answered here,
for the operator of that node (a peer); agents' views never reach a remote agent.
"""
import base64
import errno
import json
import os
import re

import trio

from ...errors import Fs9Error
from ..names import OPERATOR
from ..stream import Changes
from ..task import FINAL
from .engine import MAX_TASK_BYTES, EngineError

OUT_CHUNK = 64 << 10  # bytes of a task's output per answer
RESULT_OUT = 64 << 10  # bytes of a finished task's output kept in its result
WAIT_OUT_S = 0.5  # an `out` request waits this long for more output before answering
# (the asker's read is that much slower to see a signal: RemoteOut shields the request)
SWEEP_S = 0.1
TAKEN_S = 5.0  # a write to `in` waits at most this long for the task to be queued
REFUSALS_KEPT = 1000  # refused mail's reasons kept for its writer to ask about
CORR_RE = re.compile(r"[0-9a-f]{16}")


class Work:
    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.kernel, self.engine = cluster.kernel, cluster.engine
        self.intakes: dict[str, trio.CancelScope] = {}  # agents whose work this node reads
        # what this node holds unacked: key -> (agent, its NATS message, ended(): True
        # once it may go (a task ended, a message acked); a task's key is its id)
        self.held: dict[object, tuple[str, object, object]] = {}
        self.refusals: dict[str, Fs9Error] = {}  # mail refused here, by its id (bounded)
        self.counts = dict(queued=0, results=0)
        self.corrs: dict[str, object] = {}  # correlation id -> the task queued here from it
        self.taken = Changes()  # a task was queued here from the work stream

    # --- `in`, from any node ------------------------------------------------------

    async def submit(self, name: str, data: bytes, kind: str = "task") -> None:
        """One task for agent name (placed in the cluster); returns once stored, and
        once the node running it has queued it (so `echo > in; cat out` reads this
        task, as on one node), or after TAKEN_S if it does not say so (it is down: the
        task, stored, waits for the node that takes the agent over)."""
        if len(data) > MAX_TASK_BYTES:
            raise Fs9Error(errno.EFBIG, f"a cluster task's input is at most {MAX_TASK_BYTES} bytes")
        if self.cluster.placed(name) is None:
            raise Fs9Error(errno.ENOENT, f"no such agent: {name}")
        corr = os.urandom(8).hex()
        try:
            await self.engine.queue(name, data, corr, kind)
        except EngineError as e:
            full = "maximum" in str(e).lower()  # the agent's cap in FS9WORK (engine.py)
            raise Fs9Error(errno.ENOSPC if full else errno.EAGAIN,
                           f"not stored in the cluster: {e}" + ("" if full else " (try again)"))
        with trio.move_on_after(TAKEN_S):
            if self.cluster.remote(name) is None:
                await self.wait_taken(corr)
            else:
                try:
                    await self.ask(name, "taken", corr=corr)
                except Fs9Error as e:
                    if e.errno != errno.EHOSTUNREACH:
                        raise  # refused there (mail): said to the writer
                    # (not answered: stored, the write stands)

    async def wait_taken(self, corr: str) -> None:
        """Until corr is queued here (or, refused, raise why)."""
        while corr not in self.corrs and corr not in self.refusals:
            await self.taken.wait_past(self.taken.version)
        if corr in self.refusals:
            raise self.refusals[corr]

    # --- running an agent placed here --------------------------------------------

    def run(self, name: str, placement: dict, nursery) -> None:
        """Spawn name here if it is not, and read its work (once per placement)."""
        k = self.kernel
        if name in self.intakes:
            return
        agent = k.agents.get(name)
        if agent is None or agent.killed:
            try:
                k.spawn(name, *placement.get("args", ()))
            except Fs9Error as e:
                k.diag(f"cluster: cannot run {name} placed here: {e.text}")
                self.intakes[name] = trio.CancelScope()  # said once, not every pass
                return
        scope = trio.CancelScope()
        self.intakes[name] = scope
        nursery.start_soon(self._intake, name, scope)

    def stop(self, name: str, kill: bool = False) -> None:
        """Stop reading name's work; kill: the agent too (killed in the cluster, or run by
        another node now)."""
        scope = self.intakes.pop(name, None)
        if scope is not None:
            scope.cancel()
        agent = self.kernel.agents.get(name)
        if agent is not None and not agent.killed:
            try:
                self.kernel.kill(name)
            except Fs9Error as e:
                self.kernel.diag(f"cluster: cannot stop {name}: {e.text}")
        for key in [key for key, (a, *_) in self.held.items() if a == name]:
            del self.held[key]  # never acked here: the node running it reads them again

    async def _intake(self, name: str, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    sub = await self.engine.intake(name, fresh=True)
                    break
                except EngineError as e:
                    self.cluster.error = f"cannot read {name}'s work: {e}"
                    await trio.sleep(1)
            by_corr = {t.corr: t for t in self.kernel.tasks.values() if t.agent == name}
            while True:
                try:
                    batch = await self.engine.fetch(sub)
                except EngineError as e:
                    self.cluster.error = f"reading {name}'s work: {e}"
                    await trio.sleep(1)
                    continue
                for msg_id, kind, data, handle in batch:
                    agent = self.kernel.agents.get(name)
                    if agent is None or agent.killed:
                        return
                    corr = msg_id if CORR_RE.fullmatch(msg_id) else os.urandom(8).hex()
                    if kind == "mail":
                        await self._mail(agent, corr, data, handle)
                        continue
                    task = by_corr.get(corr)
                    if task is None:
                        try:
                            task = by_corr[corr] = self.kernel.guarded(
                                lambda: self.kernel.submit(agent, data, corr=corr),
                                agent=name, file=f"agents/{name}/in (cluster)")
                        except Fs9Error as e:  # (a daemon, an open breaker...): refused
                            await self._refuse(corr, e, handle)  # for good, said to the
                            continue  # writer; never this node's end
                        self.counts["queued"] += 1
                    self.corrs[corr] = task
                    self.taken.bump()
                    self.held[task.id] = (name, handle, lambda t=task: t.state in FINAL)

    async def _mail(self, agent, corr: str, data: bytes, handle) -> None:
        """The operator's message to agent, from the work stream: into its mailbox, held
        until acked there; refused: acked at once, the reason kept for the writer."""
        k = self.kernel
        if corr in self.corrs:  # delivered again to this node, which has it already
            return
        try:
            msg = k.guarded(k.bus.send, agent, data, OPERATOR, agent=agent.name,
                            file=f"agents/{agent.name}/mail/new (cluster)")
        except Fs9Error as e:
            await self._refuse(corr, e, handle)
            return
        self.corrs[corr] = msg
        self.taken.bump()

        def ended() -> bool:
            return msg is None or (msg.name not in agent.mailbox.pending and all(
                t.state in FINAL for t in agent.tasks if t.request == msg.id))
        self.held[("mail", corr)] = (agent.name, handle, ended)

    async def _refuse(self, corr: str, e: Fs9Error, handle) -> None:
        """Work the agent's node refused: the reason kept for the writer, the message
        acked (taken off the stream: it would be refused again wherever it went)."""
        self.refusals[corr] = e
        while len(self.refusals) > REFUSALS_KEPT:
            del self.refusals[next(iter(self.refusals))]
        self.taken.bump()
        try:
            await self.engine.ack(handle)
        except EngineError:
            pass  # delivered again later, and refused again

    async def sweep(self) -> None:
        """Store each held task's result once it has ended, then ack its message (mail:
        ack it once the agent has)."""
        while True:
            for key, (name, handle, ended) in list(self.held.items()):
                if not ended():
                    continue
                if not isinstance(key, int):  # mail
                    try:
                        await self.engine.ack(handle)
                        del self.held[key]
                    except EngineError as e:
                        self.cluster.error = f"mail not acked yet: {e}"
                    continue
                tid, task = key, self.kernel.tasks[key]
                out = bytes(self.kernel.stream(task, 1).data[:RESULT_OUT])
                result = dict(agent=name, corr=task.corr, state=task.state, node=self.cluster.me,
                              task=tid, attempt=task.attempt, out=out.decode("utf-8", "replace"))
                try:
                    await self.engine.result(name, json.dumps(result).encode(), task.corr)
                    await self.engine.ack(handle)
                except EngineError as e:
                    self.cluster.error = f"result of task {tid} not stored yet: {e}"
                    break
                if self.held.get(tid, (None, None, None))[1] is handle:
                    del self.held[tid]
                    self.counts["results"] += 1
            await trio.sleep(SWEEP_S)

    # --- requests from other nodes -----------------------------------------------

    async def ask(self, name: str, op: str, **args) -> dict:
        """Ask the node running agent name to do op for this node's operator."""
        p = self.cluster.remote(name)
        if p is None:
            raise Fs9Error(errno.ENOENT, f"no such agent: {name}")
        if "data" in args:
            args["data"] = base64.b64encode(args["data"]).decode()
        try:
            answer = json.loads(await self.engine.ask(
                p["node"], json.dumps(dict(op=op, agent=name, **args)).encode()))
        except EngineError as e:
            raise Fs9Error(errno.EHOSTUNREACH, f"node {p['node']} did not answer: {e}")
        if answer.get("errno"):
            raise Fs9Error(getattr(errno, answer["errno"], errno.EIO), str(answer.get("text")))
        return answer

    async def answer(self, receive) -> None:
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
        k, name = self.kernel, str(req["agent"])
        p = self.cluster.placed(name)
        agent = k.agents.get(name)
        if p is None or p.get("node") != self.cluster.me or agent is None or agent.killed:
            raise Fs9Error(errno.ENOENT, f"no such agent here: {name}")
        said = dict(agent=name, file=f"{req['op']} (from node {p.get('by', '?')})")
        if req["op"] == "status":
            return dict(text=agent.status())
        if req["op"] == "line":
            return dict(text=agent.status_line())
        if req["op"] == "ctl":
            k.guarded(agent.ctl, base64.b64decode(req["data"]), None, **said)
            return {}
        if req["op"] == "taken":
            with trio.move_on_after(TAKEN_S):
                await self.wait_taken(str(req["corr"]))
            return {}
        if req["op"] == "out":
            return await self._out(agent, req.get("task"), int(req.get("pos", 0)))
        raise Fs9Error(errno.EINVAL, f"no such request: {req['op']}"[:200])

    async def _out(self, agent, task_id, pos: int) -> dict:
        """The shown task's stdout (task_id None: the one `out` follows now) from pos,
        waiting up to WAIT_OUT_S for some; ended: all of it has been given."""
        task = agent.shown_task() if task_id is None else self.kernel.tasks.get(int(task_id))
        if task is None or task.agent != agent.name:
            return dict(task=None, data="", ended=True)
        with trio.move_on_after(WAIT_OUT_S):
            if task.state == "queued":
                await task.wait_started()
            await self.kernel.stream(task, 1).wait_readable(pos)
        if task.state == "queued":
            return dict(task=task.id, data="", ended=False)
        stream = self.kernel.stream(task, 1)
        chunk = bytes(stream.data[pos:pos + OUT_CHUNK])
        return dict(task=task.id, data=base64.b64encode(chunk).decode(),
                    ended=stream.ended and pos + len(chunk) >= len(stream.data))
