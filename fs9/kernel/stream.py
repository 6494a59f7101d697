"""Byte streams that behave like pipes: append, end, and readers that wait.

A Stream holds everything written to it (readers start at 0, like a task's
`out` read from its start); `wait_readable(pos)` blocks until there are bytes
past pos or the stream has ended. Wake-ups use a fresh trio.Event per change
(Events cannot be cleared), never a sleep loop.
"""
import heapq
import time

import trio


class Changes:
    """A version counter that tasks can wait on, and when it last moved (the mtime the
    mount shows of what it counts: one stored time, read by every stat)."""

    def __init__(self) -> None:
        self.version = 0
        self.at_ns = time.time_ns()  # made, then last bumped (epoch ns)
        # made by the first waiter, dropped by the bump that wakes it: a bump nobody
        # waits for (every one at replay, most of a million tasks') makes no Event
        self._event: trio.Event | None = None

    # (version, id, Event) of those waiting for a version ahead (wait_until), soonest
    # first; a class-wide empty tuple until the first such waiter
    _until: list | tuple = ()

    def bump(self) -> bool:
        """A change; True if a task was waiting for the next one (wait_past: it is woken)."""
        self.version += 1
        self.at_ns = time.time_ns()
        event, self._event = self._event, None
        if event is not None:
            event.set()
        while self._until and self._until[0][0] <= self.version:
            heapq.heappop(self._until)[2].set()
        return event is not None

    async def wait_until(self, version: int) -> None:
        """Block until the version reaches `version`: woken once, not at each bump before
        (a waiter thousands of bumps ahead, the snapshots', costs every bump a task
        switch through wait_past)."""
        if self.version >= version:
            return
        if not self._until:
            self._until = []
        entry = (version, id(event := trio.Event()), event)
        heapq.heappush(self._until, entry)
        try:
            await event.wait()
        finally:
            if not event.is_set():  # (cancelled)
                self._until.remove(entry)
                heapq.heapify(self._until)

    async def wait_past(self, version: int) -> None:
        """Block until the version differs from `version`."""
        while self.version == version:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()


class Stream:
    """An append-only byte stream with an end."""

    def __init__(self, data: bytes = b"", ended: bool = False) -> None:
        self.data = bytearray(data)
        self.ended = ended
        self.changes = Changes()

    def append(self, chunk: bytes) -> None:
        if chunk:
            self.data += chunk
            self.changes.bump()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.changes.bump()

    def readable(self, pos: int) -> bool:
        """True when a read at pos would not block (data, or EOF)."""
        return pos < len(self.data) or self.ended

    async def wait_readable(self, pos: int) -> None:
        while not self.readable(pos):
            await self.changes.wait_past(self.changes.version)
