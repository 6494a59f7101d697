"""What the kernel remembers of an unbounded stream of names (correlation ids an agent
received, idempotency keys a sender used) keeps only the latest of them: anyone may
send an agent mail without end, and each name kept for good would grow fs9's memory at
that sender's mail rate."""
import collections


class Latest(collections.OrderedDict):
    """A dict of at most `limit` keys: setting one (again) makes it the newest, and past
    the limit the oldest goes. `add(key)` uses it as a set."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.limit:
            self.popitem(last=False)

    def add(self, key) -> None:
        self[key] = None
