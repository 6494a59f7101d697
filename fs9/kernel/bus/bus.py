"""The bus: mail between agents and the operator, and topics (publishing.py). Embedded
backend.

The narrow interface the rest of fs9 uses (the FUSE face, agents, the kernel):
  send(agent, data, sender) / ack(agent, name) / delivered(agent, msg)
  send_result(agent, task) / progress(agent, task, data)  (replies.py)
  create_topic(name) / publish(topic, data, sender)
and, to wait and read, each agent's Mailbox and each Topic (`topics`). A backend
for agents on several machines (NATS JetStream) implements the same calls.

Classification is information flow, checked at every delivery: a message is
labelled at least its sender's clearance (lower only with the `declassify` pledge,
logged as `declassified`); what the kernel composes (results, status updates,
subscription events) carries its author's clearance; every delivery, the kernel's
included, reaches only a mailbox cleared for its label (else `delivery_refused`).
A topic's label is the highest clearance that published on it; an agent cleared
lower cannot open it, and an event above a reader's clearance is withheld.

An agent's correlation ids and reply-to are bounded by what it holds: it carries on
a correlation id of its own tasks or of mail it received, never another's; it asks
for replies to itself, to the requester of its current task, or to a mailbox its
view may write.

This embedded backend keeps everything in the kernel's event log: a send is a
`mail_sent` event (the message in its blob), an acknowledgement `mail_acked`, an
expiry `mail_expired` (the message moves to the mailbox's dead letters), a
publish `published` (its body kept apart, only as long as the topic keeps the event:
topic.py). State is rebuilt by replaying those events like all kernel state. Reads are logged as `mail_delivered`; delivery is at-least-once because
only `rm` removes a message.
"""
import collections
import errno
import heapq
import math
import os
import time

import trio

from ...errors import Fs9Error
from .. import approvals
from ..agents.breaker import check_new
from . import message
from ..names import OPERATOR
from ..latest import SentKeys
from ..rate import Burst
from .mailbox import Mailbox
from .message import Message
from ..stream import Changes
from .publishing import Publishing
from .replies import Replies
from .topic import Topic

SUBSCRIPTIONS = "subscriptions"  # the log's stream of topic events delivered as mail
# An idempotency key is remembered for its sender's latest KEYS_PER_SENDER keys, for the
# KEYS_SENDERS senders that used one last, KEYS_TOTAL in all (a retry comes soon after
# its first try; latest.SentKeys)
KEYS_PER_SENDER, KEYS_SENDERS, KEYS_TOTAL = 10_000, 1_000, 100_000
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel import Kernel
    from ..agents.agent import Agent



class Operator:
    """The person at the mount: has a mailbox (root `mail/`) for the results of the
    requests it sends, but runs nothing."""
    name = OPERATOR
    killed = daemon = False
    spawn_seq = 0  # there before any request

    def __init__(self) -> None:
        self.mailbox = Mailbox()
        self.manifest = {"clearance": "confidential"}


class Bus(Publishing, Replies):
    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.operator = Operator()
        self.topics: dict[str, Topic] = {}
        self.topics_by: collections.Counter[str] = collections.Counter()  # agent -> made
        # topic -> the agents whose manifest subscribes to it (a manifest is fixed at
        # spawn: kept at spawn and kill, so a publish walks its subscribers, not every
        # agent of a mount that may hold thousands)
        self.subscribers: dict[str, dict[str, "Agent"]] = {}
        self.retention = self._retention()
        # from -> its latest idempotency keys -> the id of the message stored for each
        self.sent_keys = SentKeys(KEYS_PER_SENDER, KEYS_SENDERS, KEYS_TOTAL)
        self.deadlines: list[tuple[float, str, str]] = []  # heap of (deadline, agent, name)
        self.changes = Changes()  # a new deadline
        self.withheld = Burst(50)  # delivery_refused events logged per recipient and second
        # id -> a message being logged by send or mail/batch, as checked and rendered:
        # its mail_sent applied takes it (they empty it, logged or not)
        self.sending: dict[str, Message] = {}

    def owner(self, name: str | None):
        """Whose mailbox `name` is: an agent, the operator, or None."""
        if name == OPERATOR:
            return self.operator
        return self.kernel.agents.get(name) if name else None

    # --- requests ----------------------------------------------------------------

    def send(self, agent, data: bytes, sender: str = "operator",
             checked: str | None = None, asker: str | None = None) -> Message | None:
        """Check, stamp and log one message to `agent`. Returns once it is logged;
        None if it repeats an idempotency key (it is stored once). checked: the
        sender's clearance, when the node the sender runs on checked what it may say
        (its rate, its pledges, its approvals: cluster/mail.py); the sender is then not
        looked up here (an agent of this name here may be another node's namesake);
        asker: that node's stamp of the reply-to's holder (Kernel.submit)."""
        if agent.killed:
            raise Fs9Error(errno.ENOENT, f"no such agent: {agent.name} (killed)")
        if checked is None and sender != OPERATOR and self.owner(sender) is not None:
            self.kernel.rates.take(sender, "mail", len(data), time.monotonic())
        msg, floor = self.check(agent, data, sender, checked)
        level = msg.headers["classification"]
        key = msg.headers.get("idempotency-key")
        stored_id = self.sent_keys.get(sender, key) if key else None
        if stored_id is not None:
            self.kernel.log.append("mail_duplicate", agent=agent.name, sender=sender,
                                   key=key, id=stored_id)
            return None
        if checked is None:
            self.approved(agent.name, msg, sender, use=True)
        msg.headers["id"] = self.new_id()
        corr = msg.headers.setdefault("correlation-id", msg.id)
        if self.declassifies(level, floor):
            self.kernel.log.append("declassified", agent=sender, corr=corr, id=msg.id,
                                   to=agent.name, **{"from": floor, "to_label": level})
        h = msg.headers
        self.sending[msg.id] = msg
        try:
            self.kernel.record("mail_sent", agent=agent.name, corr=corr, blob=msg.render(),
                               id=msg.id, sender=sender, type=h["type"],
                               priority=h["priority"], classification=level)
        finally:
            self.sending.clear()
        stored = agent.mailbox.get(msg.id)
        handing = self.kernel.agents.get(sender) if checked is None else None
        if h["type"] == "handoff" and handing is not None and handing.current is not None:
            handing.current.handed_off = True  # the receiver answers the requester
        if h["type"] in ("work_request", "handoff") and not agent.daemon:
            # request/response: the request becomes a task; its result comes back as mail
            # (a handoff is work with a conversation to continue: its body)
            self.kernel.submit(agent, msg.body, corr=corr, request=msg.id,
                               reply_to=h.get("reply-to", sender), asker=asker)
            self.ack(agent, stored.name)
        return stored

    @staticmethod
    def new_id() -> str:
        return message.new_id()

    @staticmethod
    def declassifies(level: str, floor: str) -> bool:
        """A message labelled `level` by an author whose floor is `floor` is lower."""
        return level != floor and not message.clearance_allows(level, floor)

    def check(self, agent, data: bytes, sender: str,
              checked: str | None = None) -> tuple[Message, str]:
        """What `send` checks that changes nothing: the message itself (message.parse),
        what its author may say (unless `checked`: see send), the recipient's clearance.
        (The message, its author's floor); Fs9Error naming the first problem."""
        author = self.owner(sender) if checked is None else None
        floor = checked or (author.manifest["clearance"] if sender != OPERATOR and author
                            else "internal")
        msg = message.parse(data, to=agent.name, sender=sender, label=floor)
        clearance = agent.manifest["clearance"]
        level = msg.headers["classification"]
        if sender != OPERATOR and author is not None:
            self._check_author(author, msg, floor)
        if not message.clearance_allows(clearance, level):
            raise Fs9Error(errno.EACCES, f"{agent.name} is cleared for {clearance}, "
                                         f"the message is {level}")
        full = agent.mailbox.full(operator=sender == OPERATOR)
        if full:
            raise Fs9Error(errno.EDQUOT, f"{agent.name}: {full}")
        if msg.headers.get("type") in ("work_request", "handoff") and not agent.daemon:
            check_new(agent)  # work for an agent its breaker cut off: refused at once
            self.kernel.check_queue(agent, operator=sender == OPERATOR)
        return msg, floor

    def precheck(self, agent, data: bytes, sender: str) -> None:
        """At a message's first write: its headers are checked once they are whole (a
        blank line ended them), so a bad one fails write(2), where a shell says so."""
        if agent.killed:
            raise Fs9Error(errno.ENOENT, f"no such agent: {agent.name} (killed)")
        if b"\n\n" in data:  # (check: the mailbox's room too)
            self.approved(agent.name, self.check(agent, data, sender)[0], sender, use=False)
            return
        full = agent.mailbox.full(operator=sender == OPERATOR)
        if full:
            raise Fs9Error(errno.EDQUOT, f"{agent.name}: {full}")

    def approved(self, to: str, msg: Message, sender: str, use: bool) -> None:
        """Mail to `to` (an agent, or AGENT@OS: federation.py) classified above its
        author's `approval.mail_above` needs the operator's yes (approvals.py): asked at
        the message's first write already, so a shell's `echo` says so (EAGAIN), used up
        when it is sent (one yes, one message)."""
        author = self.kernel.agents.get(sender)
        level = msg.headers["classification"]
        if author is not None and approvals.mail_needs(author, level):
            self.kernel.approvals.gate(
                author, "mail_above", f"to {to} {level}",
                f"mail to {to} classified {level} (over approval.mail_above = "
                f"{author.manifest['approval']['mail_above']})",
                author.current.corr if author.current else None, use)

    def _check_author(self, author, msg: Message, floor: str) -> None:
        """What an agent may say in a message (see the module doc): EPERM if not."""
        h, name = msg.headers, author.name
        if not message.clearance_allows(h["classification"], floor) and \
                "declassify" not in author.view.pledges:
            raise Fs9Error(errno.EPERM, f"a message from {name} is at least {floor} (its "
                                        "clearance); lowering it needs the declassify pledge")
        corr = h.get("correlation-id")
        if corr is not None and corr not in author.corrs:
            raise Fs9Error(errno.EPERM, f"correlation-id {corr}: not one of {name}'s tasks "
                                        "or of mail it received")
        reply_to = h.get("reply-to")
        current = author.current
        if reply_to is not None and reply_to != name and not (  # (a requester killed
                current is not None and reply_to == current.reply_to  # since: its name
                and self.asked(current)):  # is another agent's, asked for nothing)
            try:  # (the operator's mailbox is no agent's to write: only its requests'
                if reply_to == OPERATOR:  # results reach it, as the requester's)
                    raise Fs9Error(errno.EPERM, "the operator's mailbox")
                author.view.check_write(("agents", reply_to, "mail", "new"))
            except Fs9Error:
                raise Fs9Error(errno.EPERM, f"reply-to {reply_to}: {name} may ask for replies "
                                            "to itself, the requester of its task, or a "
                                            "mailbox it may write")
            if self.owner(reply_to) is None:
                raise Fs9Error(errno.ENOENT, f"reply-to {reply_to}: no such agent")

    def compose(self, to: str, sender: str, body: bytes, **headers: str) -> Message:
        """A message made by the kernel on an agent's behalf (results, progress, events),
        labelled with its author's clearance (the operator's: internal, as its mail)."""
        author = self.kernel.agents.get(sender)
        label = author.manifest["clearance"] if author is not None else "internal"
        msg = Message(to=to, body=body, headers={
            "id": os.urandom(8).hex(), "from": sender, "to": to,
            "date": message.format_time(time.time()), "priority": "normal",
            "classification": label, **headers})
        msg.headers.setdefault("correlation-id", msg.id)
        return msg

    def deliver(self, msg: Message, asker: str = "") -> None:
        """Deliver what the kernel composed, if the recipient is cleared for its label;
        otherwise it is withheld (a `delivery_refused` event), never delivered lower.
        To AGENT@OS (a request that came from another OS): through the federation; to
        an agent another node runs, through the cluster (asker: the holder of its name
        the answer is for, Task.asker, checked there)."""
        if "@" in msg.to:
            return self.kernel.federation.forward(msg)
        recipient = self.owner(msg.to)
        if recipient is None and self._clustered(msg.to):  # run by another node
            return self.kernel.cluster.forward.forward(msg, asker)
        label = msg.headers["classification"]
        why = None
        if recipient is not None and not message.clearance_allows(
                recipient.manifest["clearance"], label):
            why = f"{msg.to} is cleared for {recipient.manifest['clearance']}, the message is {label}"
        elif recipient is not None:
            why = recipient.mailbox.full(operator=msg.headers["from"] == OPERATOR)
        if why:
            extra = self.withheld.admit(msg.to, int(time.monotonic()))
            if extra is not None:  # (a flood into a full mailbox: counted, not each logged)
                self.kernel.log.append("delivery_refused", agent=msg.to,
                                       sender=msg.headers["from"],
                                       corr=msg.headers["correlation-id"],
                                       type=msg.headers["type"], reason=why, **extra)
            return
        self.kernel.record("mail_sent", agent=msg.to, corr=msg.headers["correlation-id"],
                           blob=msg.render(), id=msg.id, sender=msg.headers["from"],
                           type=msg.headers["type"],
                           keep=SUBSCRIPTIONS if msg.headers["type"] == "event" else None)

    def deliver_event(self, agent, topic: str, data: bytes, sender: str) -> None:
        """A topic event, as mail to a durable subscriber."""
        self.deliver(self.compose(agent.name, sender, data, type="event", **{"x-topic": topic}))

    def ack(self, agent, name: str) -> None:
        msg = agent.mailbox.get(name)
        if msg is None:
            raise Fs9Error(errno.ENOENT, f"no such message: {name}")
        self.kernel.record("mail_acked", agent=agent.name, corr=msg.headers["correlation-id"],
                           id=msg.id, name=msg.name)
        self.forget([msg])

    def forget(self, acked: list[Message]) -> None:
        """Topic events delivered as mail keep their body in the log only until they are
        acknowledged (a topic keeps its own events only within its retention: topic.py),
        so a flood that a subscriber keeps reading does not grow the disk; the
        `mail_sent` and `mail_acked` events stay, for the audit."""
        seqs = [m.seq for m in acked if not m.in_row and m.headers.get("type") == "event"]
        if seqs:
            self.kernel.log.forget(SUBSCRIPTIONS, seqs)

    def delivered(self, agent, msg: Message) -> None:
        """A read of msg, on the record with the next commit (its acknowledgement's, as a
        rule: EventLog.defer); its first this mount only (Message.logged)."""
        if msg.logged:
            return
        msg.logged = True
        self.kernel.log.defer("mail_delivered", agent=agent.name,
                              corr=msg.headers["correlation-id"], id=msg.id, name=msg.name)

    async def keep_deadlines(self) -> None:
        """Move expired messages to dead letters, each with an event, as deadlines pass."""
        while True:
            now = time.time()
            while self.deadlines and self.deadlines[0][0] <= now:
                deadline, agent_name, name = heapq.heappop(self.deadlines)
                agent = self.owner(agent_name)
                msg = agent.mailbox.pending.get(name) if agent else None
                if msg is not None:
                    self.kernel.record("mail_expired", agent=agent_name, id=msg.id, name=name,
                                       corr=msg.headers["correlation-id"],
                                       deadline=msg.headers["deadline"])
            wait = self.deadlines[0][0] - now if self.deadlines else math.inf
            with trio.move_on_after(wait):
                await self.changes.wait_past(self.changes.version)

    def check_input(self, agent, sender: str | None, size: int) -> None:
        """An agent writing another agent's `in` hands it work as a message would, at
        its own clearance: the recipient must be cleared for that (EACCES), and what
        needs the operator's yes as mail (approval.mail_above) goes as mail (EPERM).
        Anyone's work needs room in its queue (EDQUOT: Kernel.check_queue). An agent's
        work, its own `in` too, is `size` bytes the log keeps, as a message's body: it
        is taken at its mail rate (EAGAIN), as a cluster node takes it (cluster/proxy.py)."""
        author = self.kernel.agents.get(sender) if sender is not None else None
        self.kernel.check_queue(agent, operator=author is None)
        if author is None:
            return
        if author is not agent:
            self._check_work_from(agent, author, sender)
        self.kernel.rates.take(sender, "mail", size, time.monotonic())

    def _check_work_from(self, agent, author, sender: str) -> None:
        level = author.manifest["clearance"]
        if not message.clearance_allows(agent.manifest["clearance"], level):
            raise Fs9Error(errno.EACCES, f"{agent.name} is cleared for "
                                         f"{agent.manifest['clearance']}, work from "
                                         f"{sender} is {level}")
        if approvals.mail_needs(author, level):
            raise Fs9Error(errno.EPERM, f"work from {sender} is {level}: it needs the "
                                        "operator's yes (approval.mail_above); send it as "
                                        "a work_request through mail/new")

    # --- applying events (called by Kernel.apply) ---------------------------------

    def appliers(self) -> dict:
        return {"mail_sent": self.on_mail_sent, "mail_acked": self.on_mail_acked,
                "mail_expired": self.on_mail_expired, "topic_created": self.on_topic_created,
                "published": self.on_published}

    def on_mail_sent(self, e, agent, task) -> None:
        if "fed" in e.data:  # from another OS: its inbox record (federation.py)
            self.kernel.federation.received(e)
        agent = self.owner(e.agent)
        if agent is None:
            return  # mail for an agent killed since: gone with it
        msg = self.sending.pop(e.data["id"], None)  # as checked: not parsed again
        if msg is not None:
            msg.seq, msg.in_row = e.seq, True
        else:
            blob = self.kernel.blob(e)
            if not blob:
                return  # a topic event, acknowledged and forgotten since (`forget`)
            msg = message.load(blob, e.seq)
        msg.fed = "fed" in e.data
        agent.mailbox.put(msg)
        if agent is not self.operator:
            agent.corrs.add(msg.headers["correlation-id"])  # it may carry this one on
        key = msg.headers.get("idempotency-key")
        if key:
            self.sent_keys.put(msg.headers["from"], key, msg.id)
        if msg.deadline is not None:
            heapq.heappush(self.deadlines, (msg.deadline, agent.name, msg.name))
            self.changes.bump()

    def on_mail_acked(self, e, agent, task) -> None:
        if (agent := self.owner(e.agent)) is not None:
            msg = agent.mailbox.take(e.data["name"])
            if msg is not None and not msg.fed:  # settled: what it changed is in the
                self.kernel.plan.drop((msg.seq, e.seq))  # residue (kernel/snapshot.py)

    def on_mail_expired(self, e, agent, task) -> None:
        if (agent := self.owner(e.agent)) is None:
            return
        msg = agent.mailbox.take(e.data["name"])
        if msg is not None:
            agent.mailbox.bury(msg)
