"""The federation's outbox: cross-OS messages queued in the log and not yet acknowledged
by JetStream, oldest first, and the dead letters, those given up. Its events:
  fed_queued (id, to, os; the message in the blob)  fed_sent (id)  fed_dead (id, reason)
  fed_chunk_sent (id, i): chunk i of a large message acked (the rest resume after it)
A message whose `deadline` passes before JetStream has it is given up (`fed_dead`), never
silently dropped, and never published after: the sender (link.py) checks the deadline
before each publish, and a message being published is not given up under it."""
import math
import time
from dataclasses import dataclass

import trio

from ..bus import message
from ..stream import Changes


@dataclass
class Queued:
    os: str  # the peer it is for
    data: bytes  # the message as it crosses
    deadline: float | None  # epoch seconds, from its `deadline` header
    chunks_sent: int = 0  # of a large message: how many chunks JetStream has (chunks.py)


class Outbox:
    def __init__(self, kernel, changes: Changes) -> None:
        self.kernel = kernel
        self.changes = changes  # shared with the federation: the sender waits on it
        self.pending: dict[str, Queued] = {}  # id -> message, in order of queueing
        self.dead: dict[str, Queued] = {}
        self.sending: set[str] = set()  # ids being published right now
        self.sent = 0

    def __len__(self) -> int:
        return len(self.pending)

    def queued_for(self, peer: str) -> int:
        return sum(1 for q in self.pending.values() if q.os == peer)

    def expired(self, mid: str, now: float | None = None) -> bool:
        q = self.pending.get(mid)
        return q is not None and q.deadline is not None and \
            q.deadline <= (time.time() if now is None else now)

    def give_up(self, mid: str, reason: str) -> None:
        q = self.pending[mid]
        self.kernel.record("fed_dead", id=mid, os=q.os, reason=reason)

    async def keep_deadlines(self) -> None:
        """Give up each message whose deadline passes while it waits (NATS away, the
        peer paused): a `fed_dead` event, and the message in federation/dead/."""
        while True:
            version = self.changes.version
            now = time.time()
            for mid in [m for m in self.pending if m not in self.sending]:
                if self.expired(mid, now):
                    self.give_up(mid, "its deadline passed before JetStream had it")
            soonest = min((q.deadline for q in self.pending.values() if q.deadline), default=None)
            wait = math.inf if soonest is None else max(soonest - time.time(), 0.05)
            with trio.move_on_after(wait):
                await self.changes.wait_past(version)

    # --- applying events -------------------------------------------------------

    def appliers(self, requests) -> dict:
        """(requests: requests.py's, told of each work_request queued and sent)"""
        self.requests = requests
        return {"fed_queued": self._on_queued, "fed_sent": self._on_sent,
                "fed_dead": self._on_dead, "fed_chunk_sent": self._on_chunk_sent}

    def _on_queued(self, e, agent, task):
        data = self.kernel.blob(e)
        self.pending[e.data["id"]] = Queued(e.data["os"], data, message.load(data, 0).deadline)
        self.requests.on_queued(e)
        self.changes.bump()

    def _on_sent(self, e, agent, task):
        if self.pending.pop(e.data["id"], None) is not None:
            self.sent += 1
        self.requests.on_sent(e.data["id"])

    def _on_chunk_sent(self, e, agent, task):
        q = self.pending.get(e.data["id"])
        if q is not None:
            q.chunks_sent = max(q.chunks_sent, e.data["i"] + 1)

    def _on_dead(self, e, agent, task):
        q = self.pending.pop(e.data["id"], None)
        if q is not None:
            self.dead[e.data["id"]] = q
