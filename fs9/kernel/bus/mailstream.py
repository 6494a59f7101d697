"""`mail/stream`: a mailbox received one message at a time by a program holding files open.

The held-open counterpart of mail/next and rm (docs/namespace.md, "Mail held open"): a
program keeps `mail/stream` open for reading and `mail/ack` open for writing, and a
message costs it one read and one write, as a socket's client pays a round trip.
- Each open is a receiver. A read waits until a message is pending that this open was
  not given yet, then returns whole lines in mail/batch's format (`ID<TAB>FROM<TAB>BODY`,
  batch.line) in delivery order (priority, then arrival), as many as fit the read's size
  and never more; a line longer than the read comes in pieces over the next reads, before
  anything else (the line kept once, with its message, whatever number of opens read
  it so: an open holds where it is in it, not a copy of the rest). A read never
  returns EOF.
- Reading acknowledges nothing: the program writes the ids to `mail/ack`. What it was
  given and did not acknowledge stays pending, and is given again to another open (or
  read through next or batch): at-least-once, as mail/next.
- An open holds at most MAX_UNACKED messages given and not acknowledged; past that its
  reads wait for acknowledgements (NATS's max_ack_pending), so what one open remembers
  is bounded whatever its reader does. Each message given is a `mail_delivered` record
  (once a mount: Message.logged) riding with the next commit, as a rule its
  acknowledgement's (EventLog.defer).
"""
from .batch import line

MAX_UNACKED = 1000  # messages one open was given and that are still pending


class MailStream:
    """One open of mail/stream: a cursor (face/cursors.py's protocol) that never ends."""

    def __init__(self, bus, agent) -> None:
        self.bus, self.agent, self.box = bus, agent, agent.mailbox
        self.given: dict[str, None] = {}  # names given to this open, still pending
        self.removals = self.box.removals  # the mailbox's removals `given` accounts for
        self.piece = b""  # a line longer than the read that began it (shared: msg.line)
        self.at = 0  # and how much of it was read

    def _catch_up(self) -> None:
        """Drop from `given` what left the mailbox since the last look: by the recent
        removals the mailbox remembers, or, this far behind, by looking at each."""
        box = self.box
        behind = box.removals - self.removals
        if behind and self.given:
            if behind <= len(box.removed):
                removed = box.removed  # (the latest `behind`, not a copy of them all)
                for n in range(1, behind + 1):
                    self.given.pop(removed[-n], None)
            else:
                self.given = {n: None for n in self.given if n in box.pending}
        self.removals = box.removals

    def kept(self) -> int:
        return len(self.piece)

    def readable(self) -> bool:
        """A read would not wait: a piece of a line is left, or a message this open was
        not given is pending and the open has room for one more unacknowledged."""
        if self.piece:
            return True
        self._catch_up()  # (now `given` is a subset of what is pending)
        return len(self.given) < MAX_UNACKED and len(self.box.order) > len(self.given)

    async def wait_readable(self) -> None:
        changes = self.box.changes
        while not self.readable():
            await changes.wait_past(changes.version)

    def take(self, size: int) -> bytes:
        if self.piece:
            data = self.piece[self.at:self.at + size]  # (the read's size, not the rest's)
            self.at += len(data)
            if self.at >= len(self.piece):
                self.piece, self.at = b"", 0
            return data
        self._catch_up()
        box, given, out, room = self.box, self.given, [], size
        for name in box.order:
            if len(given) >= MAX_UNACKED:
                break
            if name in given:
                continue
            msg = box.pending[name]
            text = msg.line or line(msg)
            if len(text) > room:
                if out:
                    break  # (the next read begins with it)
                msg.line = self.piece = text
                self.at = size
                text = text[:size]
            given[name] = None
            self.bus.delivered(self.agent, msg)
            out.append(text)
            room -= len(text)
            if room <= 0:
                break
        return b"".join(out)
