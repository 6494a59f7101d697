"""The post office: mail between agents and the operator, kept in the event log.

This is the embedded backend of the bus: a send is a `mail_sent` event (the
message in its blob), an acknowledgement `mail_acked`, an expiry `mail_expired`
(the message moves to the mailbox's dead letters). Mailbox state is rebuilt by
replaying those events like all kernel state. Reads are logged as
`mail_delivered`; delivery is at-least-once because only `rm` removes a message.
"""
import errno
import heapq
import math
import os
import time

import trio

from ..errors import Fs9Error
from . import message
from .message import Message
from .stream import Changes


class PostOffice:
    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.sent_keys: dict[tuple[str, str], str] = {}  # (from, idempotency-key) -> id
        self.deadlines: list[tuple[float, str, str]] = []  # heap of (deadline, agent, name)
        self.changes = Changes()  # a new deadline

    # --- requests ----------------------------------------------------------------

    def send(self, agent, data: bytes, sender: str = "operator") -> Message | None:
        """Check, stamp and log one message to `agent`. Returns once it is logged;
        None if it repeats an idempotency key (it is stored once)."""
        if agent.killed:
            raise Fs9Error(errno.ENOENT, f"no such agent: {agent.name} (killed)")
        msg = message.parse(data, to=agent.name, sender=sender)
        clearance = agent.manifest.get("clearance", "internal")
        level = msg.headers["classification"]
        if not message.clearance_allows(clearance, level):
            raise Fs9Error(errno.EACCES, f"{agent.name} is cleared for {clearance}, "
                                         f"the message is {level}")
        key = msg.headers.get("idempotency-key")
        if key and (sender, key) in self.sent_keys:
            self.kernel.log.append("mail_duplicate", agent=agent.name, sender=sender,
                                   key=key, id=self.sent_keys[(sender, key)])
            return None
        msg.headers["id"] = os.urandom(8).hex()
        corr = msg.headers.setdefault("correlation-id", msg.id)
        h = msg.headers
        self.kernel.record("mail_sent", agent=agent.name, corr=corr, blob=msg.render(),
                           id=msg.id, sender=sender, type=h["type"], priority=h["priority"],
                           classification=level)
        return agent.mailbox.by_id(msg.id)

    def deliver_event(self, agent, topic: str, data: bytes, sender: str) -> None:
        """A topic event, as mail to a durable subscriber."""
        msg = Message(to=agent.name, body=data, headers={
            "id": os.urandom(8).hex(), "from": sender, "to": agent.name,
            "date": message.format_time(time.time()), "type": "event", "priority": "normal",
            "classification": "internal", "x-topic": topic})
        msg.headers["correlation-id"] = msg.id
        self.kernel.record("mail_sent", agent=agent.name, corr=msg.id, blob=msg.render(),
                           id=msg.id, sender=sender, type="event", topic=topic)

    def ack(self, agent, name: str) -> None:
        msg = agent.mailbox.pending.get(name)
        if msg is None:
            raise Fs9Error(errno.ENOENT, f"no such message: {name}")
        self.kernel.record("mail_acked", agent=agent.name, corr=msg.headers["correlation-id"],
                           id=msg.id, name=name)

    def delivered(self, agent, msg: Message) -> None:
        self.kernel.log.append("mail_delivered", agent=agent.name,
                               corr=msg.headers["correlation-id"], id=msg.id, name=msg.name)

    async def keep_deadlines(self) -> None:
        """Move expired messages to dead letters, each with an event, as deadlines pass."""
        while True:
            now = time.time()
            while self.deadlines and self.deadlines[0][0] <= now:
                deadline, agent_name, name = heapq.heappop(self.deadlines)
                agent = self.kernel.agents.get(agent_name)
                msg = agent.mailbox.pending.get(name) if agent else None
                if msg is not None:
                    self.kernel.record("mail_expired", agent=agent_name, id=msg.id, name=name,
                                       corr=msg.headers["correlation-id"],
                                       deadline=msg.headers["deadline"])
            wait = self.deadlines[0][0] - now if self.deadlines else math.inf
            with trio.move_on_after(wait):
                await self.changes.wait_past(self.changes.version)

    # --- applying events (called by Kernel.apply) ---------------------------------

    def on_mail_sent(self, e, agent) -> None:
        msg = message.load(self.kernel.log.blob(e.seq), e.seq)
        agent.mailbox.put(msg)
        key = msg.headers.get("idempotency-key")
        if key:
            self.sent_keys[(msg.headers["from"], key)] = msg.id
        if msg.deadline is not None:
            heapq.heappush(self.deadlines, (msg.deadline, agent.name, msg.name))
            self.changes.bump()

    def on_mail_acked(self, e, agent) -> None:
        agent.mailbox.take(e.data["name"])

    def on_mail_expired(self, e, agent) -> None:
        msg = agent.mailbox.take(e.data["name"])
        if msg is not None:
            agent.mailbox.dead[msg.name] = msg
