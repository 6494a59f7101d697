"""Cursors: a reader's position in what a stream file serves (kinds.StreamNode).

Each open of a stream file gets a fresh cursor; the protocol is
`readable() -> bool`, `async wait_readable()`, `take(size) -> bytes` (b"" at EOF) and,
for cursors chained one after another (Chain), `at_end()`. Waiting parks on the
kernel object's change counter, never a sleep loop.
"""
from ..kernel.bus import batch
from ..kernel.log import EventLog
from ..kernel.stream import Stream
from ..kernel.task import Task
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel.kernel import Kernel


class StreamCursor:
    """A reader's position in a Stream; EOF once the stream has ended and all is read."""

    def __init__(self, stream: Stream | None = None) -> None:
        self.stream = stream
        self.pos = 0

    def _stream(self) -> Stream | None:
        return self.stream

    def readable(self) -> bool:
        s = self._stream()
        return s is not None and s.readable(self.pos)

    def at_end(self) -> bool:
        s = self._stream()
        return s is not None and s.ended and self.pos >= len(s.data)

    async def wait_readable(self) -> None:
        await self._stream().wait_readable(self.pos)

    def take(self, size: int) -> bytes:
        data = bytes(self._stream().data[self.pos:self.pos + size])
        self.pos += len(data)
        return data


class ReplyCursor(StreamCursor):
    """A model's reply as it streams; a failed call ends it with its errno, once."""

    def __init__(self, turn) -> None:
        super().__init__(turn.text)
        self.turn = turn
        self.told = False  # this reader got the error: EOF from now on

    def take(self, size: int) -> bytes:
        data = super().take(size)
        if not data and self.turn.error is not None and not self.told:
            self.told = True
            raise self.turn.error
        return data


class TaskCursor(StreamCursor):
    """A task's stdout or stderr from its start; waits while the task is queued."""

    def __init__(self, kernel: "Kernel", task: Task | None, fd: int) -> None:
        super().__init__(Stream(ended=True) if task is None else None)
        self.kernel, self.task, self.fd = kernel, task, fd

    def _stream(self) -> Stream | None:
        if self.task is None:
            return self.stream
        if self.task.state == "queued":
            return None
        return self.kernel.stream(self.task, self.fd)

    async def wait_readable(self) -> None:
        if self.task is not None and self.task.state == "queued":
            await self.task.wait_started()
        if self._stream() is not None:
            await super().wait_readable()


class Chain:
    """Cursors read one after the other (an agent's `err`: the task's stderr, then notes)."""

    def __init__(self, *cursors) -> None:
        self.cursors = list(cursors)

    def _head(self):
        while len(self.cursors) > 1 and self.cursors[0].at_end():
            self.cursors.pop(0)
        return self.cursors[0]

    def readable(self) -> bool:
        return self._head().readable()

    async def wait_readable(self) -> None:
        await self._head().wait_readable()

    def take(self, size: int) -> bytes:
        return self._head().take(size)

    def kept(self) -> int:
        return sum(c.kept() for c in self.cursors if hasattr(c, "kept"))


class NextCursor(StreamCursor):
    """`mail/next`: waits for a pending message, then reads the head of the queue."""

    def __init__(self, kernel: "Kernel", agent) -> None:
        super().__init__(None)
        self.kernel, self.agent = kernel, agent

    def readable(self) -> bool:
        return self.stream is not None or bool(self.agent.mailbox.order)

    def at_end(self) -> bool:
        return self.stream is not None and super().at_end()

    async def wait_readable(self) -> None:
        await self.agent.mailbox.wait_pending()

    def take(self, size: int) -> bytes:
        if self.stream is None:
            msg = self.agent.mailbox.head()
            self.stream = Stream(msg.render(), ended=True)
            self.kernel.bus.delivered(self.agent, msg)
        return super().take(size)

    def kept(self) -> int:
        return len(self.stream.data) if self.stream is not None else 0  # (this open's own)


class BatchCursor(NextCursor):
    """`mail/batch`: waits for a pending message, then reads the pending ones, a line
    each (kernel/bus/batch.py)."""

    def take(self, size: int) -> bytes:
        if self.stream is None:
            self.stream = Stream(batch.take(self.kernel.bus, self.agent), ended=True)
        return StreamCursor.take(self, size)


class BufferedCursor:
    """A cursor over whole records (events, lines): `fill` renders the next batch when
    the buffer is empty; reads take from the buffer, so a record is never split
    between readers' views of it, only between reads."""

    def __init__(self) -> None:
        self.buf = b""  # what fill rendered, b"" once all of it is read
        self.at = 0  # how much of it was read (a read copies its own size, not the rest)

    def fill(self) -> bytes:
        raise NotImplementedError

    def readable(self) -> bool:
        return bool(self.buf)

    def kept(self) -> int:
        return len(self.buf)

    def take(self, size: int) -> bytes:
        if not self.buf:
            self.buf, self.at = self.fill(), 0
        data = self.buf[self.at:self.at + size]
        self.at += len(data)
        if self.at >= len(self.buf):
            self.buf, self.at = b"", 0
        return data


class TopicCursor(BufferedCursor):
    """A subscription: every event published after the open that the reader is cleared
    for, in order; never EOF."""

    def __init__(self, topic, clearance: str) -> None:
        super().__init__()
        self.topic, self.seen, self.clearance = topic, topic.count, clearance
        topic.readers.add(self)  # (how long a stream's events are held: topic.py)

    def readable(self) -> bool:
        # (shown: events still held for a batch are not yet readable; the read that
        # follows takes every one published by then)
        return bool(self.buf) or self.topic.shown > self.seen

    def held(self) -> bool:
        """Events came that the topic holds for a batch: readable within its hold."""
        return self.topic.held and not self.buf and self.topic.count > self.seen

    async def wait_readable(self) -> None:
        while not self.readable():
            await self.topic.changes.wait_past(self.topic.changes.version)

    def fill(self) -> bytes:
        dropped, withheld, events = self.topic.since(self.seen, self.clearance)
        self.seen = self.topic.count
        note = f"fs9: overflow: {dropped} events dropped\n".encode() if dropped else b""
        if withheld:
            note += f"fs9: {withheld} events above your clearance withheld\n".encode()
        return note + b"".join(events)


class AuditCursor(BufferedCursor):
    """The whole log as JSON lines, from the first event to the last one at open."""

    def __init__(self, log: EventLog) -> None:
        super().__init__()
        self.log, self.seq, self.end = log, 0, log.last_seq

    def readable(self) -> bool:
        return True

    async def wait_readable(self) -> None:
        pass

    def fill(self) -> bytes:
        if self.seq >= self.end:
            return b""
        events = [e for e in self.log.events_after(self.seq, 1000) if e.seq <= self.end]
        self.seq = events[-1].seq if events else self.end
        return "".join(e.json() + "\n" for e in events).encode()


LOOK_BACK = 200


class EventCursor(BufferedCursor):
    """The kernel's events as JSON lines, from the moment of open; never EOF."""

    def __init__(self, log: EventLog) -> None:
        super().__init__()
        self.log = log
        self.seq = log.last_seq

    def readable(self) -> bool:
        return bool(self.buf) or self.log.last_seq > self.seq

    def look_back(self) -> None:
        """A snapshot (a desktop program's open, desktop.py) starts LOOK_BACK events back:
        a window shows what happened lately, not an empty stream."""
        self.seq = max(0, self.seq - LOOK_BACK)

    async def wait_readable(self) -> None:
        if not self.buf:
            await self.log.wait_after(self.seq)

    def fill(self) -> bytes:
        events = self.log.events_after(self.seq)
        self.seq = events[-1].seq
        return "".join(e.json() + "\n" for e in events).encode()
