"""The few kinds of file the namespace is made of (acme's small set of file kinds).

Dir      a directory whose names come from the tree table
Ctl      write: commands, applied per write (or, `whole`, the bytes of one open
         applied at close: `agents/NAME/in`); read: a state line
Status   text rendered at open: a consistent snapshot per open
Stream   reads block until data or EOF, like a pipe (opened O_NONBLOCK: EAGAIN, ops.read);
         per-open cursor (cursors.py); Batch (batchfile.py): a stream whose writes
         are lines (mail/batch)
Vault    a file, directory or symlink of the vault on disk (vault.py, vaultfile.py)

Every kind answers the same protocol (node.py). Nodes are made fresh by the tree for
each request; a Handle is the per-open state (cursor, snapshot, written bytes, the
caller's pid captured at open). No pyfuse3 here: errors are Fs9Error, the ops layer
translates.
"""
import errno
import inspect
import os
import stat
import time

import trio

from ..errors import Fs9Error
from ..kernel.kernel import MAX_INPUT
from .desktop import echoes_state
from .held import written
from .node import READONLY_NS, Attrs, Handle, Node

SLICE_S = 0.2  # a blocked reader checks for a pending signal this often,
LONG_WAIT_S, LONG_SLICE_S = 5.0, 1.0  # and, once it has waited LONG_WAIT_S, this often
# (a thousand agents blocked on their mail/next would otherwise cost the server 5,000
# reads of /proc a second)
SNAPSHOT_S = 1.0  # a desktop program's read of a stream ends by then (desktop.py)
# --- Dir -------------------------------------------------------------------------

class Dir(Node):
    mode = stat.S_IFDIR | 0o555

    def __init__(self, names=None, create=None) -> None:
        self.names = names  # () -> list of child names (the tree fills it in)
        self.new_file = create  # (name) -> Node: what a new name here opens as
        if create is not None:
            self.mode = stat.S_IFDIR | 0o755
            self.does = frozenset({"create"})

    def attrs(self) -> Attrs:
        return Attrs(self.mode, self.size(), nlink=2)

    async def open(self, flags: int, ctx) -> Handle:
        raise Fs9Error(errno.EISDIR, "is a directory")

    async def listing(self, child) -> list[tuple[str, Node]]:
        entries = []
        for name in self.names():
            try:
                entries.append((name, child(name)))
            except Fs9Error:
                pass  # went away while listing
        return entries

    async def setattr(self, attr, fields, ctx) -> Node:
        raise Fs9Error(errno.EPERM, READONLY_NS)

    async def create(self, name: str, mode: int, flags: int, ctx) -> tuple[Handle, Node]:
        """mail/ (one message, sent at close), outbox/, memory/ (written whole: the new
        name exists while open), topics/ (a new topic; each write publishes)."""
        node = self.new_file(name)
        node.transient = not node.stream
        node.changed_ns = time.time_ns()  # made now (a message: while it is written)
        return await node.open(os.O_WRONLY, ctx), node


# --- Status ----------------------------------------------------------------------

class Status(Node):
    def __init__(self, render, remove=None, opened=None, prepare=None) -> None:
        self.render = render  # () -> str | bytes
        self.remove = remove  # () -> None: what `rm` means here (None: refused)
        self.opened = opened  # () -> None: called at each open (a delivery, for mail)
        # async () -> None: slow work (a request to a model) done in a worker before
        # render; such a file reports size 0, so a stat never waits for it
        self.prepare = prepare

    def size(self) -> int:
        return 0 if self.prepare is not None else len(_encode(self.render()))

    def attrs(self) -> Attrs:
        return Attrs(self.mode, self.size(), cacheable=False)  # its text changes size

    def handle(self, pid: int) -> Handle:
        if self.opened is not None:
            self.opened()
        return SnapshotHandle(pid, self.render, self.prepare)


class SnapshotHandle(Handle):
    """Renders once at the first read from offset 0, then serves slices."""

    def __init__(self, pid: int, render, prepare=None) -> None:
        super().__init__(pid)
        self.render = render
        self.prepare = prepare
        self.text: bytes | None = None

    async def read(self, off: int, size: int) -> bytes:
        if self.text is None or off == 0:
            if self.prepare is not None:
                await self.prepare()
            self.text = _encode(self.render())
        return self.text[off:off + size]

    def kept(self) -> int:
        return len(self.text) if self.text is not None else 0


class Clone(Node):
    """Plan 9's clone file: each open makes a new object (a conversation) and reads
    its name. A stat makes nothing (size 0)."""

    def __init__(self, make) -> None:
        self.make = make  # () -> str: make one, return its name

    def size(self) -> int:
        return 0

    def handle(self, pid: int) -> Handle:
        name = self.make() + "\n"
        return SnapshotHandle(pid, lambda: name)


# --- Ctl -------------------------------------------------------------------------

class Ctl(Node):
    def __init__(self, apply, render=None, whole: bool = False, refused=None,
                 early=None, early_until: bytes | None = None, remove=None,
                 prepare=None) -> None:
        self.apply = apply  # (bytes) -> None; raises Fs9Error when refused
        self.remove = remove  # () -> None: what `rm` means here (None: refused)
        self.render = render  # () -> str, the state line; None: write-only
        self.prepare = prepare  # async () -> None: fetch it first (as Status's)
        self.whole = whole
        self.refused = refused  # (Fs9Error) -> None: reports a refusal made here
        # `whole`: (bytes of the first write) -> None, raising Fs9Error to refuse the
        # input at write(2) already: shells ignore what close(2) says, so what can be
        # known early (a budget exceeded, fs9 halted, a malformed item in a request or
        # a header already whole) is said where `echo` reports it.
        # Only the first write, or, with `early_until` (a message's blank line), each
        # write until those bytes have come: bash's printf writes a line at a time, so a
        # header is whole only at a later write. Bounded by EARLY_BYTES, as a check may
        # cost more than appending a chunk.
        self.early = early
        self.early_until = early_until
        self.mode = stat.S_IFREG | (0o644 if render else 0o200)

    def size(self) -> int:
        return len(_encode(self.render())) if self.render and not self.prepare else 0

    def handle(self, pid: int) -> Handle:
        return CtlHandle(pid, self)


# The first bytes of a `whole` input that `early_until` checks may look at again at each
# write: a message's headers (RFC 5322 lines of at most 998 characters) come well within.
EARLY_BYTES = 64 << 10


class CtlHandle(SnapshotHandle):
    def __init__(self, pid: int, node: Ctl) -> None:
        super().__init__(pid, node.render, node.prepare)
        self.node = node
        self.pending: bytearray | None = None  # `whole`: bytes written since open
        self.refused: Fs9Error | None = None  # `whole`: this open's input was refused
        self.undecided = True  # `whole`: the early check wants to see the next write too

    async def read(self, off: int, size: int) -> bytes:
        if self.node.render is None:
            return await Handle.read(self, off, size)
        return await super().read(off, size)

    async def write(self, off: int, data: bytes) -> int:
        if not self.node.whole:
            # its own state saved back by an editor (written from the start): nothing. A
            # program holding the file open and writing command after command is past
            # the start from its second write on, so it pays for no state rendering.
            # (a state fetched from another node is not asked for at a write: one
            # may write a ctl it may not read, and it costs a round trip)
            if off != 0 or self.node.render is None or self.node.prepare is not None or \
                    not echoes_state(data, self.node.render()):
                done = self.node.apply(data)
                if done is not None and inspect.isawaitable(done):  # a request to another
                    await done  # node (face/remote.py)
            return len(data)
        if self.refused is not None:
            raise self.refused
        self.pending = self.pending if self.pending is not None else bytearray()
        if len(self.pending) + len(data) > MAX_INPUT:
            # the whole input is refused: close(2) fails too and nothing is queued
            self._unheld(len(self.pending))
            self.pending = None
            self.refused = Fs9Error(errno.EFBIG, f"task input over {MAX_INPUT} bytes")
            self.node.refused(self.refused)
            raise self.refused
        written(self.opener, len(data))  # (EDQUOT past an agent's share)
        self.pending += data
        if self.undecided and self.node.early is not None:
            until = self.node.early_until
            self.undecided = until is not None and until not in self.pending \
                and len(self.pending) <= EARLY_BYTES
            try:
                self.node.early(bytes(self.pending))
            except Fs9Error as e:
                self._unheld(len(self.pending))
                self.pending, self.refused = None, e
                raise
        return len(data)

    def flush(self):
        """close(2): a `whole` file applies what this open wrote (once per write burst);
        an apply that waits (a task stored in the cluster) is returned, to be awaited."""
        if self.refused is not None:
            raise self.refused
        if self.pending is not None:
            data, self.pending, self.undecided = bytes(self.pending), None, True
            self._unheld(len(data))
            done = self.node.apply(data)
            return done if inspect.isawaitable(done) else None

    def close(self, path) -> None:
        if self.pending:  # never flushed (its process died): it holds nothing any more
            self._unheld(len(self.pending))
            self.pending = None
        super().close(path)

    def _unheld(self, size: int) -> None:
        written(self.opener, -size)


# --- Stream ----------------------------------------------------------------------

class StreamNode(Node):
    stream = True

    def __init__(self, cursor, publish=None) -> None:
        self.cursor = cursor  # () -> a new cursor positioned where a new reader starts
        self.publish = publish  # (bytes) -> None: one write, one event (topics)
        if publish is not None:
            self.mode = stat.S_IFREG | 0o644

    def handle(self, pid: int) -> Handle:
        return StreamHandle(pid, self.cursor(), self.publish)


class StreamHandle(Handle):
    def __init__(self, pid: int, cursor, publish=None) -> None:
        super().__init__(pid)
        self.cursor = cursor
        self.publish = publish
        # a desktop program's open (desktop.py): reads end where nothing is there yet, or
        # SNAPSHOT_S after open (a stream written faster than it is read)
        self.snapshot_until: float | None = None

    def snapshot(self) -> None:
        """From now on, reads end instead of waiting (a desktop program's open)."""
        self.snapshot_until = time.monotonic() + SNAPSHOT_S
        look_back = getattr(self.cursor, "look_back", None)  # (`events`: recent ones too)
        if look_back is not None:
            look_back()

    async def write(self, off: int, data: bytes) -> int:
        if self.publish is None:
            return await super().write(off, data)
        self.publish(data)
        return len(data)

    def readable(self) -> bool:
        return self.cursor.readable()

    def ready(self) -> bool:
        return self.cursor.readable()  # (read then takes from the cursor, no await)

    def held(self) -> bool:
        held = getattr(self.cursor, "held", None)  # (a topic's)
        return held is not None and held()

    def kept(self) -> int:
        kept = getattr(self.cursor, "kept", None)  # (a shared stream's cursor keeps none)
        return kept() if kept is not None else 0

    async def wait_readable(self) -> None:
        await self.cursor.wait_readable()

    async def read(self, off: int, size: int) -> bytes:
        """Block until data or EOF; EINTR once the reader has a signal pending.

        pyfuse3 ignores FUSE interrupts, so the wait is sliced and each slice
        checks the caller, else Ctrl-C and even SIGKILL would wait for data. A snapshot
        (a desktop program's open) ends instead of waiting."""
        if self.snapshot_until is not None and (
                not self.cursor.readable() or time.monotonic() > self.snapshot_until):
            return b""
        long_after = trio.current_time() + LONG_WAIT_S
        while not self.cursor.readable():
            with trio.move_on_after(SLICE_S if trio.current_time() < long_after
                                    else LONG_SLICE_S):
                await self.cursor.wait_readable()
            if not self.cursor.readable() and signal_pending(self.pid):
                raise Fs9Error(errno.EINTR, "interrupted")
        return self.cursor.take(size)


def _encode(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


def signal_pending(pid: int) -> bool:
    """True if thread `pid` has an unblocked signal pending (or is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return True

    def field(name: bytes) -> int:  # (three fields found, not every line split)
        at = text.index(name) + len(name)
        return int(text[at:text.index(b"\n", at)], 16)
    pending = field(b"\nSigPnd:") | field(b"\nShdPnd:")
    return bool(pending & ~field(b"\nSigBlk:")) or bool(pending & (1 << 8))  # SIGKILL
