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


class SentKeys:
    """Idempotency keys: sender -> key -> the id of the message stored for it. Each
    sender's latest `per_sender`, of the `senders` that used one last, and at most
    `total` in all: past that, the sender holding the most loses its oldest, so a flood
    of keys (an agent's, a peer's under many names) costs its sender's own keys first,
    and fs9's memory and snapshots stay bounded whatever the keys' count and length."""

    def __init__(self, per_sender: int, senders: int, total: int) -> None:
        self.per_sender, self.senders, self.total = per_sender, senders, total
        self.by: collections.OrderedDict[str, collections.OrderedDict] = \
            collections.OrderedDict()
        self.count = 0

    def get(self, sender: str, key: str):
        keys = self.by.get(sender)
        return None if keys is None else keys.get(key)

    def put(self, sender: str, key: str, value) -> None:
        keys = self.by.get(sender)
        if keys is None:
            keys = self.by[sender] = collections.OrderedDict()
        self.by.move_to_end(sender)  # (the newest sender, last)
        self.count += key not in keys
        keys[key] = value
        keys.move_to_end(key)
        if len(keys) > self.per_sender:
            keys.popitem(last=False)
            self.count -= 1
        if len(self.by) > self.senders:
            self.count -= len(self.by.popitem(last=False)[1])
        while self.count > self.total:
            most = max(self.by, key=lambda s: len(self.by[s]))
            self.by[most].popitem(last=False)
            self.count -= 1

    def items(self):
        return [(sender, list(keys.items())) for sender, keys in self.by.items()]

    def clear(self) -> None:
        self.by.clear()
        self.count = 0
