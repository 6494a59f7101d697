"""Batch: a stream file whose writes are lines (mail/batch, kinds.py's protocol): each
write(2) hands on the whole lines it completes, one commit for them all (kernel/bus/
batch.py); read, it is a stream like any (a per-open cursor). And readers_first: after a
send, the woken reader answers before the sender hears back.
"""
import errno
import inspect
import stat

import trio

from ..errors import Fs9Error
from ..kernel.bus.batch import may_be_head, split_head
from ..kernel.bus.message import MAX_MESSAGE
from .held import written, written_room
from .kinds import StreamHandle, StreamNode
from .node import Handle


class Batch(StreamNode):
    """A stream read like any (mail/batch: a per-open cursor) whose writes are lines:
    each write(2) hands on the whole lines it completes, with the header block the
    open's first write began with; a last line without its newline goes at close."""

    def __init__(self, cursor, send) -> None:
        super().__init__(cursor)
        self.send = send  # (header block, lines) -> None; raises Fs9Error when refused
        self.mode = stat.S_IFREG | 0o644

    def handle(self, pid: int) -> Handle:
        return BatchHandle(pid, self.cursor(), self.send)


class BatchHandle(StreamHandle):
    def __init__(self, pid: int, cursor, send) -> None:
        super().__init__(pid, cursor)
        self.send = send
        self.head: bytes | None = None  # from the first write (b"": none)
        self.rest = b""  # a line begun and not yet ended

    async def write(self, off: int, data: bytes) -> int:
        head, body = self.head, self.rest + data
        if head is None:  # the open's header block, if any: whole once a blank line came
            head, body = split_head(body)
            if not head and may_be_head(body):
                self._keep(body)  # (bash's printf writes a line at a time)
                return len(data)
        cut = body.rfind(b"\n") + 1
        if len(body) - cut > MAX_MESSAGE:
            raise Fs9Error(errno.EFBIG, f"a line over {MAX_MESSAGE} bytes")
        written_room(self.opener, len(body) - cut - len(self.rest))
        lines = [line + b"\n" for line in body[:cut - 1].split(b"\n")] if cut else []
        done = self.send(head, lines)  # refused: nothing of this write was sent
        if inspect.isawaitable(done):  # (another node's agent; readers_first)
            await done
        self.head = head
        self._keep(body[cut:])
        return len(data)

    def flush(self):
        """close(2): what is left, a line without its newline (or lines that looked
        like the start of a header block that never ended), is sent (a request to
        another node: returned, to be awaited)."""
        if self.rest:
            parts = self.rest.split(b"\n")
            self._keep(b"")
            done = self.send(self.head or b"", [part + b"\n" for part in parts[:-1]] +
                             ([parts[-1]] if parts[-1] else []))
            return done if inspect.isawaitable(done) else None

    def close(self, path) -> None:
        self._keep(b"")  # (never flushed: its process died)
        super().close(path)

    def _keep(self, rest: bytes) -> None:
        """rest is what this open holds now (a line begun and not yet ended), counted
        against its opener."""
        written(self.opener, len(rest) - len(self.rest))
        self.rest = rest


def readers_first(box):
    """After a send to mailbox box: if it woke a reader (a mail/stream or next blocked in
    its read), the awaitable that lets that reader answer before the sender hears back,
    so the message reaches its receiver first: on two cores the sender's wake-up would
    otherwise take the CPU the receiver's needs (delivery p50 0.40 -> 0.30 ms,
    bench/bus.py). A yield to the scheduler, nothing more; None when nobody waited (a
    receiver busy with the messages before: the sender need not wait for it)."""
    if not box.woke:
        return None
    box.woke = False
    return trio.lowlevel.cancel_shielded_checkpoint()
