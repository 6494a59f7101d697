"""An agent's mailbox: pending messages in delivery order, and its dead letters.

Plain state, changed only by Kernel.apply from `mail_*` events: at-least-once
delivery falls out of that, since a message leaves `pending` only when it is
acknowledged (`rm`) or expires, never when it is read.
"""
import bisect

from .message import Message
from .stream import Changes


class Mailbox:
    def __init__(self) -> None:
        self.pending: dict[str, Message] = {}  # by file name
        self.order: list[str] = []  # names of pending messages, sorted: delivery order
        self.dead: dict[str, Message] = {}  # expired, kept for inspection
        self.changes = Changes()

    def put(self, msg: Message) -> None:
        self.pending[msg.name] = msg
        bisect.insort(self.order, msg.name)
        self.changes.bump()

    def take(self, name: str) -> Message | None:
        """Remove a pending message (acknowledged or expired)."""
        msg = self.pending.pop(name, None)
        if msg is not None:
            self.order.remove(name)
            self.changes.bump()
        return msg

    def by_id(self, msg_id: str) -> Message | None:
        return next((m for m in self.pending.values() if m.id == msg_id), None)

    def head(self) -> Message | None:
        return self.pending[self.order[0]] if self.order else None

    async def wait_pending(self) -> None:
        """Block until a message is pending."""
        while not self.order:
            await self.changes.wait_past(self.changes.version)
