"""An agent's mailbox: pending messages in delivery order, and its dead letters.

Plain state, changed only by Kernel.apply from `mail_*` events: at-least-once
delivery falls out of that, since a message leaves `pending` only when it is
acknowledged (`rm`) or expires, never when it is read.
"""
import bisect
import collections

from .message import Message
from ..stream import Changes

# What one mailbox holds pending: past it, mail from agents is refused (EDQUOT) and what
# the kernel delivers for them (results, updates, topic events) is withheld; the
# operator's mail still fits, up to OPERATOR_ROOM times as much. Bounds what a flood
# costs in memory and in the log, whatever the sender's rate.
MAX_PENDING, MAX_BYTES, OPERATOR_ROOM = 10_000, 64 << 20, 2
# Dead letters (expired mail, for inspection: nobody removes them) kept per mailbox, the
# latest: mail a sender lets expire at once would otherwise pile up for good.
MAX_DEAD, MAX_DEAD_BYTES = 1000, 16 << 20
# The latest removals remembered, so a held-open reader of mail/stream catches up on
# what left since it looked at the cost of what left, not of all it was given
# (mailstream.py); one further behind looks at all it was given.
RECENT_REMOVALS = 1024


class Mailbox:
    def __init__(self) -> None:
        self.pending: dict[str, Message] = {}  # by file name
        self.order: list[str] = []  # names of pending messages, sorted: delivery order
        self.ids: dict[str, str] = {}  # message id -> name, for pending messages
        self.dead: dict[str, Message] = {}  # expired, kept for inspection (in expiry order)
        self.bytes = 0  # of pending messages' bodies
        self.dead_bytes = 0  # of dead letters' bodies
        self.changes = Changes()
        self.on_put = None  # called at each delivery: an asleep agent wakes (agent.py)
        self.woke = False  # a delivery woke a reader since the sender last looked
        self.removals = 0  # messages taken since this mailbox was made
        self.removed: collections.deque[str] = collections.deque(maxlen=RECENT_REMOVALS)

    def full(self, operator: bool = False) -> str | None:
        """Why one more message does not fit (None: it does)."""
        room = OPERATOR_ROOM if operator else 1
        if len(self.pending) >= MAX_PENDING * room or self.bytes >= MAX_BYTES * room:
            return (f"{len(self.pending)} messages, {self.bytes >> 20} MiB pending: "
                    "the mailbox is full until its owner reads and removes mail")
        return None

    def room(self, operator: bool = False) -> int:
        """How many more messages fit (by count; bytes are checked per message)."""
        return max(0, MAX_PENDING * (OPERATOR_ROOM if operator else 1) - len(self.pending))

    def put(self, msg: Message) -> None:
        self.pending[msg.name] = msg
        self.ids[msg.id] = msg.name
        self.bytes += len(msg.body)
        bisect.insort(self.order, msg.name)
        if self.changes.bump():
            self.woke = True  # a reader waited for this (face/batchfile.py readers_first)
        if self.on_put is not None:
            self.on_put()

    def take(self, name: str) -> Message | None:
        """Remove a pending message (acknowledged or expired)."""
        msg = self.pending.pop(name, None)
        if msg is not None:
            self.bytes -= len(msg.body)
            del self.order[bisect.bisect_left(self.order, name)]
            del self.ids[msg.id]
            self.removals += 1
            self.removed.append(name)
            self.changes.bump()
        return msg

    def bury(self, msg: Message) -> None:
        """msg expired: a dead letter, the oldest leaving past MAX_DEAD or MAX_DEAD_BYTES
        (the newest is always kept)."""
        self.dead[msg.name] = msg
        self.dead_bytes += len(msg.body)
        while len(self.dead) > MAX_DEAD or (
                self.dead_bytes > MAX_DEAD_BYTES and len(self.dead) > 1):
            oldest = self.dead.pop(next(iter(self.dead)))
            self.dead_bytes -= len(oldest.body)

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
