"""Topics: publish/subscribe. One write is one event; each reader subscribes at open.

A topic keeps its last RING events, at most RING_BYTES of them, in memory, numbered
from 1. A subscriber
holds only its position, so a slow one never stalls the publisher or the other
subscribers; one that falls behind what is kept is told how many it
missed (an `fs9: overflow` line) and goes on from the oldest event still kept.
Every event is also in the log (`published`), so nothing is lost for audit.

Each event keeps its label (the publisher's clearance); the topic's label is the
highest so far: a reader cleared lower may not open it, and a reader that opened it
before it rose is not shown the events above its clearance (bus.py).
"""
import collections

from ..stream import Changes
from .message import CLASSIFICATIONS, clearance_allows

RING = 1024  # events kept per topic: a subscriber's bounded backlog...
RING_BYTES = 4 << 20  # ...and its bytes: 1,024 events of 64 KiB would be 64 MiB a topic
MAX_EVENT = 64 << 10  # bytes in one event


class Topic:
    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0  # events published so far; the number of the newest
        self.events: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=RING)
        self.label = CLASSIFICATIONS[0]  # the highest clearance that published here
        self.bytes = 0  # of the events kept
        self.changes = Changes()

    def publish(self, data: bytes, label: str = "internal") -> int:
        self.count += 1
        if len(self.events) == RING:
            self.bytes -= len(self.events[0][1])  # the deque drops it on append
        self.events.append((label, data))
        self.bytes += len(data)
        while self.bytes > RING_BYTES and len(self.events) > 1:
            self.bytes -= len(self.events.popleft()[1])
        if not clearance_allows(self.label, label):
            self.label = label
        self.changes.bump()
        return self.count

    def since(self, n: int, clearance: str) -> tuple[int, int, list[bytes]]:
        """(how many events after n were dropped, how many were withheld as above
        clearance, the kept events after n a reader of that clearance may see)."""
        oldest = self.count - len(self.events) + 1
        dropped = max(0, oldest - (n + 1))
        start = max(n + 1, oldest) - oldest
        kept = list(self.events)[start:]
        shown = [data for label, data in kept if clearance_allows(clearance, label)]
        return dropped, len(kept) - len(shown), shown
