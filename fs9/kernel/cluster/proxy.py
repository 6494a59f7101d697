"""An agent's requests to an agent another node runs, checked as that agent: `in`,
`ctl` and `mail/batch` written through its view, and `out`, `err`, `status`,
`manifest`, `tasks/` and its mailbox read through it (face/remoteview.py); and its
`in`, `ctl run` and `mail/batch` of a cluster agent its own node runs, stored in
JetStream as well (so that they outlive the node).

On the sender's node (the only one that knows it): its view and pledges were checked
by the face before the write got here (Gate.check: unveil, `send` for `in` and
`mail/batch`, `spawn` for `ctl`); here what is the author's, as a local write checks
it (Bus.check_input, batch.send): its mail rate (a line of a batch, or an `in`: each a
message in JetStream), what it may say (its clearance the floor, declassify, its own
correlation ids, reply-to) and `approval.mail_above` (EPERM: one at a time, through
mail/new). Then the write goes the way the operator's does (work.py: `in` and `ctl
run` and a batch stored in FS9WORK, other `ctl` verbs asked of the agent's node),
with the sender's name and clearance set by this node (headers Fs9-From, Fs9-Label;
a request's `by`, `clearance`): never text the agent wrote.

On the recipient's node: what is the recipient's (`take_task`, `take_batch`,
`check_reader`): its clearance against the sender's (EACCES), its queue's or
mailbox's room for an agent's work (EDQUOT: the operator's reserved room is not an
agent's), the message's form; a ctl verb as Agent.ctl checks it for an agent (`by`:
no supervisor, no reset, no priority raised). Each refusal's errno goes back to the
writer's write, as on one node.
"""
import errno
import time

from ...errors import Fs9Error
from .. import approvals
from ..bus import batch, message
from ..bus.message import CLASSIFICATIONS, clearance_allows
from ..names import NAME_RE, OPERATOR
from .work import MAX_TASK_BYTES, runs, verbs


class Proxy:
    def __init__(self, cluster) -> None:
        self.cluster, self.kernel = cluster, cluster.kernel

    # --- on the sender's node ------------------------------------------------------

    def author(self, sender: str):
        """Agent sender of this node, alive; its clearance."""
        author = self.kernel.agents.get(sender)
        if author is None or author.killed or sender == OPERATOR:
            raise Fs9Error(errno.ENOENT, f"no such agent: {sender}")
        return author, author.manifest["clearance"]

    def asker(self, sender: str) -> dict:
        """Who asks, as a request to the agent's node says it (set here)."""
        return dict(by=sender, clearance=self.author(sender)[1])

    async def task(self, sender: str, to: str, data: bytes, kind: str = "task") -> None:
        """`in` of `to` (kind task: its result comes back to sender as mail) or a `ctl
        run` line (kind run: no result), written by agent sender through its view."""
        author, level = self.author(sender)
        self.kernel.rates.take(sender, "mail", len(data), time.monotonic())
        if to != sender and approvals.mail_needs(author, level):  # (as check_input)
            raise Fs9Error(errno.EPERM, f"work from {sender} is {level}: it needs the "
                                        "operator's yes (approval.mail_above); send it as "
                                        "a work_request through mail/new")
        await self.cluster.work.submit(to, data, kind, sender=sender, label=level,
                                       asker=self.kernel.bus.stamp(sender))

    async def ctl(self, sender: str, to: str, data: bytes) -> None:
        """`ctl` of `to` written by agent sender: `run` lines are tasks (as the
        operator's, in a write of their own), other verbs asked of its node as sender
        (this node's: applied here, as a local agent's ctl is)."""
        asker, said = self.asker(sender), verbs(data)
        if "run" not in said:
            if self.cluster.remote(to) is None:
                self.kernel.agent(to).ctl(data, sender)
            else:
                await self.cluster.work.ask(to, "ctl", data=data, **asker)
            return
        for line in runs(data, said):
            await self.task(sender, to, line, "run")

    async def batch(self, sender: str, to: str, head: bytes, lines: list[bytes]) -> None:
        """One write of `to`'s mail/batch: by agent sender (checked here as batch.send
        checks its author) or the operator; stored as one message (all or none)."""
        lines = [line for line in lines if line.strip(b"\n")]
        if not lines:
            return
        label = None
        if sender != OPERATOR:
            author, label = self.author(sender)
            now = time.monotonic()
            for line in lines:
                self.kernel.rates.take(sender, "mail", len(line), now)
                msg = message.parse(head + b"\n\n" + line if head else line, to=to,
                                    sender=sender, label=label)
                _plain(msg)
                self.kernel.bus._check_author(author, msg, label)
                if approvals.mail_needs(author, msg.headers["classification"]):
                    raise Fs9Error(errno.EPERM, f"mail classified "
                                   f"{msg.headers['classification']} needs the operator's "
                                   "yes, one message at a time (approval.mail_above): "
                                   "send it through mail/new")
        data = b"%d\n" % len(head) + head + b"".join(lines)
        if len(data) > MAX_TASK_BYTES:
            raise Fs9Error(errno.EFBIG, f"a cluster batch is at most {MAX_TASK_BYTES} bytes "
                                        "a write: write fewer lines at a time")
        await self.cluster.work.submit(to, data, "batch", sender=sender, label=label)

    # --- on the recipient's node ---------------------------------------------------

    def take_task(self, agent, data: bytes, kind: str, sender: str, label: str | None,
                  corr: str, node: str, asker: str | None):
        """A task for agent from the work stream: the operator's, or agent sender's
        (its node, `node`, checked the author and stamped which holder of its name
        sent it, `asker`: its result is for that one alone; here the recipient's side,
        as check_input)."""
        k, reply = self.kernel, ""
        if sender != OPERATOR:
            if not clearance_allows(agent.manifest["clearance"], label):
                raise Fs9Error(errno.EACCES, f"{agent.name} is cleared for "
                                             f"{agent.manifest['clearance']}, work from "
                                             f"{sender} is {label}")
            k.check_queue(agent, operator=False)
            placed, me = self.cluster.placed(sender), self.cluster.me
            # its result goes back to the sender placed in the cluster (not to a
            # namesake of this node: an agent of this node is placed here, or not
            # placed), or to an agent of this node not placed that wrote it here
            if kind == "task" and sender != agent.name and (
                    placed is not None and (sender not in k.agents or placed.get("node") == me)
                    or placed is None and node == me and sender in k.agents):
                reply = sender
        return k.submit(agent, data, corr=corr, reply_to=reply, asker=asker)

    def take_batch(self, agent, data: bytes, sender: str, label: str | None) -> list:
        """A batch for agent from the work stream (Proxy.batch): its messages, all put
        in its mailbox in one commit, or none (Fs9Error)."""
        size, _, rest = data.partition(b"\n")
        if not size.isdigit() or int(size) > len(rest):
            raise Fs9Error(errno.EINVAL, "a batch that does not parse")
        head, body = rest[:int(size)], rest[int(size):]
        parts = body.split(b"\n")
        lines = [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        before = set(agent.mailbox.pending)
        batch.send(self.kernel.bus, agent, head, lines, sender,
                   checked=None if sender == OPERATOR else label)
        return [m for name, m in agent.mailbox.pending.items() if name not in before]

    def check_reader(self, agent, req: dict) -> str | None:
        """A request made for an agent of the asking node (`by`, its `clearance`, set by
        that node): the asker's name, once it is cleared for what agent's files hold
        (EACCES, as labels.check_read); None: the operator's."""
        by = req.get("by")
        if by is None:
            return None
        by, clearance = str(by), req.get("clearance")
        if not NAME_RE.fullmatch(by) or clearance not in CLASSIFICATIONS:
            raise Fs9Error(errno.EINVAL, "bad asker")
        if req["op"] != "ctl" and by != agent.name and not clearance_allows(
                clearance, agent.manifest["clearance"]):
            raise Fs9Error(errno.EACCES, f"agents/{agent.name} is "
                                         f"{agent.manifest['clearance']} (agent "
                                         f"{agent.name}'s); {by} is cleared for {clearance}")
        return by


def _plain(msg) -> None:
    """What a batch does not take (batch.send says the same on the recipient's node)."""
    h = msg.headers
    if "idempotency-key" in h or h["type"] in batch.ONE_BY_ONE:
        raise Fs9Error(errno.EINVAL, "a batch takes neither an idempotency-key nor a "
                                     f"{h['type']}: send those through mail/new")
