"""An agent's mailbox: pending messages in delivery order, and its dead letters.

Plain state, changed only by Kernel.apply from `mail_*` events: at-least-once
delivery falls out of that, since a message leaves `pending` only when it is
acknowledged (`rm`) or expires, never when it is read.
"""
import bisect

from .message import Message
from ..stream import Changes


class Mailbox:
    def __init__(self) -> None:
        self.pending: dict[str, Message] = {}  # by file name
        self.order: list[str] = []  # names of pending messages, sorted: delivery order
        self.ids: dict[str, str] = {}  # message id -> name, for pending messages
        self.dead: dict[str, Message] = {}  # expired, kept for inspection
        self.changes = Changes()

    def put(self, msg: Message) -> None:
        self.pending[msg.name] = msg
        self.ids[msg.id] = msg.name
        bisect.insort(self.order, msg.name)
        self.changes.bump()

    def take(self, name: str) -> Message | None:
        """Remove a pending message (acknowledged or expired)."""
        msg = self.pending.pop(name, None)
        if msg is not None:
            del self.order[bisect.bisect_left(self.order, name)]
            del self.ids[msg.id]
            self.changes.bump()
        return msg

    def get(self, name_or_id: str) -> Message | None:
        """A pending message by file name, or by its id (so `rm mail/ID` works after
        reading `next`, without listing the mailbox)."""
        msg = self.pending.get(name_or_id)
        return msg if msg is not None else self.pending.get(self.ids.get(name_or_id, ""))

    def head(self) -> Message | None:
        return self.pending[self.order[0]] if self.order else None

    async def wait_pending(self) -> None:
        """Block until a message is pending."""
        while not self.order:
            await self.changes.wait_past(self.changes.version)
