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
An agent's mail to it (mail.py, checked as the sender on its node) and what another
node's kernel composed for it (forward.py) go the same way. A message the recipient's
node refuses (message.parse, clearance) is acked there and its reason goes back to the
writer's write. Work written on the node that runs its agent is taken there at once
(`_arrived`); the consumer's delivery of it then brings only the handle to ack it with.

Requests: another node's operator asks (`ask`) the node that runs an agent to read or
drive it; that node answers (answers.py).
"""
import base64
import errno
import json
import os

import trio

from ...errors import Fs9Error
from .. import cmd
from ..agents.agent import CMDS as AGENT_CMDS
from ..bus.message import CLASSIFICATIONS
from ..names import NAME_RE, OPERATOR
from ..stream import Changes
from ..task import FINAL
from .mail import CORR_RE, composed
from ...errors import EngineError

MAX_TASK_BYTES = 900 << 10  # a task in the stream: under NATS's 1 MiB payload, with headers
RESULT_OUT = 64 << 10  # bytes of a finished task's output kept in its result
SWEEP_S = 0.1
TAKEN_S = 5.0  # a write to `in` waits at most this long for the task to be queued
REFUSALS_KEPT = 1000  # refused mail's reasons kept for its writer to ask about
DONE_KEPT = 10_000  # ids of work acked here lately: a writer's "taken" may come after
NO_HOLDER = "-"  # Fs9-Asker of work whose answer is for no cluster agent (never empty)


def verbs(data: bytes) -> list[str]:
    """The verbs of a ctl write, a line each."""
    lines = (line.strip(" \t\r") for line in data.decode("utf-8", "replace").split("\n"))
    return [(line.split() or [""])[0] for line in lines if line and not line.startswith("#")]


def runs(data: bytes, said: list[str]) -> list[bytes]:
    """The tasks of a ctl write of `run` lines (said: its verbs); one mixing them with
    other verbs would apply half (EINVAL)."""
    if set(said) != {"run"}:
        raise Fs9Error(errno.EINVAL, "in a cluster, `run` lines go in a write of their "
                                     "own (each a task stored in JetStream)")
    return [(p.args[0] + "\n").encode() for p in cmd.parse(AGENT_CMDS, data)]


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
        # correlation id -> the task or message taken here from it, until acked (then
        # in `done`, bounded: what this node took is not kept for ever)
        self.corrs: dict[str, object] = {}
        self.done: dict[str, None] = {}
        self.taken = Changes()  # a task was queued here from the work stream

    # --- `in`, from any node ------------------------------------------------------

    async def submit(self, name: str, data: bytes, kind: str = "task",
                     sender: str = OPERATOR, label: str | None = None,
                     asker: str = "") -> None:
        """One task or message (kind) for agent name (placed in the cluster), from the
        operator or (mail) from agent sender, whose node checked it (label: its
        clearance; asker: which holder of the name its answer is for, Bus.stamp, as
        the sender's node saw it when it sent: mail.py, proxy.py); returns once stored,
        and once the node running it has queued it (so `echo x > in; cat out` reads this
        task, as on one node), or after TAKEN_S if it does not say so (it is down: the
        work, stored, waits for the node that takes the agent over)."""
        if len(data) > MAX_TASK_BYTES:
            raise Fs9Error(errno.EFBIG, f"a cluster task's input is at most {MAX_TASK_BYTES} bytes")
        if self.cluster.placed(name) is None:
            raise Fs9Error(errno.ENOENT, f"no such agent: {name}")
        corr = os.urandom(8).hex()
        more = {} if sender == OPERATOR else {"Fs9-From": sender, "Fs9-Label": label or "",
                                              "Fs9-Node": self.cluster.me,
                                              "Fs9-Asker": asker or NO_HOLDER}
        try:
            await self.engine.queue(name, data, corr, kind, **more)
        except EngineError as e:
            full = "maximum" in str(e).lower()  # the agent's cap in FS9WORK (engine.py)
            raise Fs9Error(errno.ENOSPC if full else errno.EAGAIN,
                           f"not stored in the cluster: {e}" + ("" if full else " (try again)"))
        agent = self.kernel.agents.get(name)
        if name in self.intakes and agent is not None and not agent.killed \
                and self.cluster.remote(name) is None and name not in self.cluster.fenced:
            # run here: taken at once from what was stored, not after the round trip of
            # the agent's consumer (whose delivery of it then only brings the handle to
            # ack it with): a JetStream fetch and two thread hops less a message
            await self._arrived(agent, corr, kind, data, sender, label, None, self.cluster.me,
                                None if sender == OPERATOR else asker)
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

    async def ctl(self, name: str, data: bytes) -> None:
        """agents/NAME/ctl of an agent placed in the cluster, the operator's, on any node:
        `run TEXT` lines are tasks stored in JetStream, as `in` (one a line, in order);
        other verbs act on the agent where it runs, which checks them (its notes say a
        refusal, as on one node). A write mixing `run` with other verbs would apply half:
        refused."""
        said = verbs(data)
        if "run" not in said:
            if self.cluster.remote(name) is None:
                self.kernel.agent(name).ctl(data)
            else:
                await self.ask(name, "ctl", data=data)
            return
        for line in runs(data, said):
            await self.submit(name, line)

    async def wait_taken(self, corr: str) -> None:
        """Until corr is queued here (or, refused, raise why)."""
        while corr not in self.corrs and corr not in self.refusals and corr not in self.done:
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

    def fence(self, name: str, reason: str) -> bool:
        """Stop agent name (its running task re-queued, its work held, not acked) while
        this node cannot show it is alive; True if it ran and is stopped now."""
        agent = self.kernel.agents.get(name)
        if agent is None or agent.killed or agent.stopped:
            return False  # (stopped by the operator: not the fence's to start again)
        self.kernel.log.append("cluster_fenced", agent=name, reason=reason)
        agent.fence(reason)
        return True

    def unfence(self, name: str) -> None:
        """Start agent name again, the fence over and its placement still this node's."""
        agent = self.kernel.agents.get(name)
        if agent is not None and not agent.killed and agent.stopped:
            self.kernel.log.append("cluster_unfenced", agent=name)
            agent.start()

    async def _intake(self, name: str, scope: trio.CancelScope) -> None:
        subs: list = []  # the consumer's subscriptions: dropped when the intake ends
        try:
            await self._read(name, scope, subs)
        finally:
            for sub in subs:
                # (else its pull request, still waiting on the server, could take a
                # message for a subscription nobody reads: held unacked until the next
                # takeover, e.g. this node's old one after it saw its agent moved)
                self.engine.drop(sub)

    async def _read(self, name: str, scope: trio.CancelScope, subs: list) -> None:
        with scope:
            while True:
                try:
                    sub = await self.engine.intake(name, fresh=True)
                    subs.append(sub)
                    break
                except EngineError as e:
                    self.cluster.error = f"cannot read {name}'s work: {e}"
                    await trio.sleep(1)
            by_corr = {t.corr: t for t in self.kernel.tasks.values() if t.agent == name}
            while True:
                try:
                    batch = await self.engine.fetch(sub)
                except EngineError as e:  # (not a timeout: fetch says [] for that)
                    self.cluster.error = f"reading {name}'s work: {e}"
                    await trio.sleep(1)
                    try:  # its consumer gone (its state is in memory: all its servers
                        # restarted): made afresh, every message not acked comes again
                        # (each the work it already is here: self.corrs)
                        if not await self.engine.has_intake(name):
                            self.engine.drop(sub)
                            sub = await self.engine.intake(name, fresh=False)
                            subs.append(sub)
                    except EngineError:
                        pass
                    continue
                for headers, data, handle in batch:
                    agent = self.kernel.agents.get(name)
                    if agent is None or agent.killed:
                        return
                    msg_id = headers.get("Nats-Msg-Id", "")
                    corr = msg_id if CORR_RE.fullmatch(msg_id) else os.urandom(8).hex()
                    sender, label = headers.get("Fs9-From", OPERATOR), headers.get("Fs9-Label")
                    if sender != OPERATOR and (not NAME_RE.fullmatch(sender)
                                               or label not in CLASSIFICATIONS):
                        # (written by a node: a peer; still, a bad one is refused, not run)
                        await self._refuse(corr, Fs9Error(errno.EINVAL, "bad sender"), handle)
                        continue
                    if corr in by_corr and corr not in self.corrs:
                        self.corrs[corr] = by_corr[corr]  # queued here before a restart
                    await self._arrived(agent, corr, headers.get("Fs9-Kind", ""), data,
                                        sender, label, handle, headers.get("Fs9-Node", ""),
                                        _holder(headers.get("Fs9-Asker")))

    async def _arrived(self, agent, corr: str, kind: str, data: bytes, sender: str,
                       label: str | None, handle, node: str, asker: str | None) -> None:
        """Work for agent, run here: queued (a task) or put in its mailbox (mail), once,
        whether it comes from the agent's consumer (handle: to ack it with) or from a
        write on this node (handle None: its consumer's delivery brings it later); held
        until it ended, then acked (sweep). node: the writer's (an agent's work); asker:
        the holder its answer is for, as that node stamped it (None: the operator's)."""
        name = agent.name
        if corr in self.done:  # (taken, ended and acked before a write's own turn came)
            return
        if corr in self.refusals:  # refused at the write: taken off the stream
            if handle is not None:
                await self._refuse(corr, self.refusals[corr], handle)
            return
        key = ("mail", corr) if kind in ("mail", "composed", "batch") else None
        if key is not None:
            if corr not in self.corrs:
                try:
                    self.corrs[corr] = self._mail(agent, data, sender, label, asker) \
                        if kind == "mail" else composed(self.kernel, agent, data, sender,
                                                        asker) \
                        if kind == "composed" else self.kernel.guarded(
                            self.cluster.proxy.take_batch, agent, data, sender, label,
                            agent=name, file=f"agents/{name}/mail/batch (cluster)")
                except Fs9Error as e:
                    await self._refuse(corr, e, handle)
                    return
            msg, waiting = self.corrs[corr], self.cluster.forward.pending
            # (a work_request: until its tasks ended and their answers are stored; a
            # batch: until each of its messages is acked)
            ended = self.held.get(key, (None, None, (lambda: not any(
                m.name in agent.mailbox.pending for m in msg)) if isinstance(msg, list)
                else lambda: msg is None or (
                msg.name not in agent.mailbox.pending and all(
                    t.state in FINAL for t in agent.tasks if t.request == msg.id)
                and not waiting.get(msg.headers.get("correlation-id")))))[2]
        else:
            task = self.corrs.get(corr)
            if task is None:
                try:
                    task = self.corrs[corr] = self.kernel.guarded(
                        self.cluster.proxy.take_task, agent, data, kind, sender, label,
                        corr, node, asker, agent=name, file=f"agents/{name}/in (cluster)")
                except Fs9Error as e:  # (a daemon, an open breaker...): refused for good,
                    await self._refuse(corr, e, handle)  # said to the writer; never
                    return  # this node's end
                self.counts["queued"] += 1
            key, ended = task.id, lambda t=task: t.state in FINAL
        old = self.held.get(key)
        self.held[key] = (name, handle if handle is not None else old and old[1], ended)
        self.taken.bump()

    def _mail(self, agent, data: bytes, sender: str, label: str | None, asker: str | None):
        """A message to agent from the work stream into its mailbox: the operator's, or
        agent sender's (its node checked what it may say: mail.py; checked here: what
        the recipient takes)."""
        k = self.kernel
        return k.guarded(k.bus.send, agent, data, sender,
                         None if sender == OPERATOR else label, asker, agent=agent.name,
                         file=f"agents/{agent.name}/mail/new (cluster)")

    async def _refuse(self, corr: str, e: Fs9Error, handle) -> None:
        """Work the agent's node refused: the reason kept for the writer, the message
        acked (taken off the stream: it would be refused again wherever it went; handle
        None: once its consumer delivers it)."""
        self.refusals[corr] = e
        while len(self.refusals) > REFUSALS_KEPT:
            del self.refusals[next(iter(self.refusals))]
        self.taken.bump()
        if handle is None:
            return
        try:
            await self.engine.ack(handle)
        except EngineError:
            pass  # delivered again later, and refused again

    async def sweep(self) -> None:
        """Store each held task's result once it has ended, then ack its message (mail:
        ack it once the agent has)."""
        while True:
            mail = []  # acked together: one hop, the acks in flight at once
            for key, (name, handle, ended) in list(self.held.items()):
                if handle is None or not ended():
                    continue  # (None: taken from a write here, not delivered to us yet)
                if not isinstance(key, int):  # mail
                    mail.append((key, handle))
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
                    self._done(task.corr)
                    self.counts["results"] += 1
            if mail:
                try:
                    acked = await self.engine.acks([h for _, h in mail])
                except EngineError as e:
                    acked = [False] * len(mail)
                    self.cluster.error = f"mail not acked yet: {e}"
                for (key, handle), ok in zip(mail, acked):
                    if not ok:
                        self.cluster.error = "mail not acked yet (JetStream did not confirm)"
                    elif self.held.get(key, (None, None, None))[1] is handle:
                        del self.held[key]
                        self._done(key[1])
            await trio.sleep(SWEEP_S)

    def _done(self, corr: str) -> None:
        """Work acked here (JetStream dropped it: it is not delivered again)."""
        self.corrs.pop(corr, None)
        self.done[corr] = None
        while len(self.done) > DONE_KEPT:
            del self.done[next(iter(self.done))]

    # --- requests to other nodes -------------------------------------------------

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


def _holder(header: str | None) -> str | None:
    """Fs9-Asker as a node wrote it: the spawn id, "" (NO_HOLDER), None (not written)."""
    return None if header is None else "" if header == NO_HOLDER else header
