"""Topics: publish/subscribe. One write is one event; each reader subscribes at open.

A topic keeps its last RING events in memory, numbered from 1. A subscriber
holds only its position, so a slow one never stalls the publisher or the other
subscribers; one that falls more than RING events behind is told how many it
missed (an `fs9: overflow` line) and goes on from the oldest event still kept.
Every event is also in the log (`published`), so nothing is lost for audit.
"""
import collections

from ..stream import Changes

RING = 1024  # events kept per topic: a subscriber's bounded backlog
MAX_EVENT = 64 << 10  # bytes in one event


class Topic:
    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0  # events published so far; the number of the newest
        self.events: collections.deque[bytes] = collections.deque(maxlen=RING)
        self.changes = Changes()

    def publish(self, data: bytes) -> int:
        self.count += 1
        self.events.append(data)
        self.changes.bump()
        return self.count

    def since(self, n: int) -> tuple[int, list[bytes]]:
        """(how many events after n were dropped, the kept events after n)."""
        oldest = self.count - len(self.events) + 1
        dropped = max(0, oldest - (n + 1))
        start = max(n + 1, oldest) - oldest
        return dropped, list(self.events)[start:]
