"""An agent's mail to an agent placed in the cluster: checked here, as its sender, then
stored in JetStream (work.py) so that it outlives this node and the recipient's.

An agent writes `agents/TO/mail/new` through its view, or its `outbox/TO`; when TO is
placed in the cluster (on this node or another), the message goes through FS9WORK like
the operator's mail, not into this node's log alone: a node lost with its state loses
no acknowledged message, whichever node it was. Everything about the sender is checked
on the node it runs on, the only one that knows it (its view, pledges, rate, clearance,
correlation ids, reply-to, approvals: the same calls as the bus's for local mail); the
recipient's node checks what is the recipient's (its clearance, its mailbox's room, the
message's form) and trusts the sender's name and clearance only because a node, never
the agent, set them (headers Fs9-From, Fs9-Label: engine.py). An agent that may not
know TO (kernel.knows, as the cluster sees it: `remote_knows`) is told ENOENT, as for a
name nobody has. What another node's kernel composed for an agent of this one (a
task's result, forward.py) is taken here too (`composed`): only by the holder of the
name that asked (the spawn id its node stamped on the request, Fs9-Asker, the
placement's now), never by an agent spawned under that name since.
"""
import errno
import re
import time

import trio

from ...errors import Fs9Error
from .. import approvals
from ..bus import message
from ..names import OPERATOR

CORR_RE = re.compile(r"[0-9a-f]{16}")  # a correlation id, a NATS message id


class Mail:
    def __init__(self, cluster) -> None:
        self.cluster, self.kernel = cluster, cluster.kernel
        self.gated = trio.Lock()  # sends that need the operator's yes, one at a time

    def knows(self, by: str, name: str) -> bool:
        """Agent `by` (of this node) may know cluster agent `name` exists: as
        Kernel.knows for a local one; for one run elsewhere, by its view (agents/NAME
        unveiled), the discover pledge, or its current task's requester (the one that
        asked, not the name's next holder: Bus.asked)."""
        if name in self.kernel.agents:
            return self.kernel.knows(by, name)
        asker = self.kernel.agents.get(by)
        if asker is None or self.cluster.placed(name) is None:
            return False
        return ("discover" in asker.view.pledges
                or asker.view.access(("agents", name)) is not None
                or (asker.current is not None and asker.current.reply_to == name
                    and self.kernel.bus.asked(asker.current)))

    def check(self, to: str, data: bytes, sender: str, use: bool) -> tuple[str, bool, str]:
        """What sender may say to `to` (the bus's rules: bus.py); its clearance (the
        message's floor), whether it needed the operator's yes (approval.mail_above) and
        which holder of its reply-to's name asks (Bus.stamp: a work_request's answer is
        for it alone). use: that yes is used up (once the message is stored, not at a
        check before)."""
        author = self.kernel.agents.get(sender)
        if author is None or author.killed or sender == OPERATOR:
            raise Fs9Error(errno.ENOENT, f"no such agent: {sender}")
        if self.cluster.placed(to) is None:
            raise Fs9Error(errno.ENOENT, f"no such agent: {to}")
        floor = author.manifest["clearance"]
        msg = message.parse(data, to=to, sender=sender, label=floor)
        self.kernel.bus._check_author(author, msg, floor)
        self.kernel.bus.approved(to, msg, sender, use=use)
        return (floor, approvals.mail_needs(author, msg.headers["classification"]),
                self.kernel.bus.stamp(msg.headers.get("reply-to", sender)))

    def precheck(self, to: str, data: bytes, sender: str) -> None:
        """At the first writes: the headers, once whole, checked as at the send."""
        if b"\n\n" in data:
            self.check(to, data, sender, use=False)

    async def send(self, to: str, data: bytes, sender: str) -> None:
        """One message from agent sender to cluster agent `to`; returns once stored (R3)
        and taken by the recipient's node (or refused there: its errno)."""
        self.kernel.rates.take(sender, "mail", len(data), time.monotonic())
        floor, gated, asker = self.check(to, data, sender, use=False)
        if not gated:
            await self.cluster.work.submit(to, data, "mail", sender=sender, label=floor,
                                           asker=asker)
            return
        # the operator's yes is used once the message is stored and taken: a send
        # refused (by JetStream, the stream's size, the recipient's node) leaves it for
        # the next try, as on one node, where a refused send uses none. One such send at
        # a time, so that one yes lets one message through, not all sent meanwhile.
        async with self.gated:
            self.check(to, data, sender, use=False)  # (not used by the one before)
            await self.cluster.work.submit(to, data, "mail", sender=sender, label=floor,
                                           asker=asker)
            try:
                self.check(to, data, sender, use=True)
            except Fs9Error:
                pass  # (the yes expired while the message was stored: it was sent with it)


def composed(kernel, agent, data: bytes, sender: str, asker: str | None):
    """What another node's kernel composed for agent (forward.py): a task's result or
    status update, delivered as the kernel delivers its own (the recipient's clearance
    and room checked: bus.deliver), if agent is the holder of its name that asked
    (asker, set by that node: Task.asker); else it goes nowhere, as on one node (the
    task's files keep it), said in the log (None)."""
    try:
        msg = message.load(data, 0)
    except (ValueError, KeyError, UnicodeDecodeError):
        raise Fs9Error(errno.EINVAL, "a composed message that does not parse")
    if msg.to != agent.name or msg.headers.get("from") != sender \
            or msg.headers.get("type") not in ("result", "status_update") \
            or not CORR_RE.fullmatch(msg.headers.get("id", "")):
        raise Fs9Error(errno.EINVAL, "a composed message not for this agent or not a result")
    if (asker or "") != kernel.bus.stamp(agent.name):
        h = msg.headers
        extra = kernel.bus.withheld.admit(agent.name, int(time.monotonic()))
        if extra is not None:  # (a flood: counted, not each logged, as bus.deliver)
            kernel.log.append("delivery_refused", agent=agent.name, sender=sender,
                              corr=h["correlation-id"], type=h["type"],
                              reason=f"asked by an earlier holder of the name {agent.name} "
                                     "(killed since)", **extra)
        return None
    kernel.bus.deliver(msg)
    return agent.mailbox.get(msg.id)
