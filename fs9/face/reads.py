"""Reads and polls of the ops layer (a mixin of ops.Operations): a read that waits holds
one of pyfuse3's workers, so the waits are capped per agent with room kept for the
operator; a non-blocking reader gets EAGAIN and, if it polls, a notification once there
is something to read; at unmount every waiting read ends (EOF).

What an open holds for its reads (a snapshot of a file, a message, a batch, the rest
of a line, a listing copied at opendir) is counted against the agent whose view opened
it (held.py), so that many opens cannot together take the server's memory.
"""
import errno
import logging
import select

import trio

from ..errors import Fs9Error
from .boundary import boundary
from .node import Handle

log = logging.getLogger("fs9.face")
MAX_TASKS = 8192  # pyfuse3's workers (mount.py): each blocked reader holds one
BLOCKED_PER_AGENT = 256  # reads one agent may have waiting at once
OPERATOR_RESERVE = 1024  # workers agents' blocked reads never take


class Reads:
    @boundary
    async def read(self, fh, off, size):
        handle = self._handle(fh)
        if self.closing:
            return b""
        if handle.opener is None:  # (the operator's opens are not counted)
            return await self._read(handle, off, size)
        self.held.room(fh, handle.kept(), lambda: self.inodes.path(handle.ino) or ())
        try:
            return await self._read(handle, off, size)
        finally:
            self.held.keep(fh, handle.kept())

    async def _read(self, handle: Handle, off: int, size: int) -> bytes:
        if handle.ready():  # no wait, so no cancel scope: a third of a subscriber's read
            return await handle.read(off, size)
        # (a topic's events held for a batch come within a fraction of a millisecond,
        # O_NONBLOCK or not, and the hold's timer ends at unmount too: no cancel scope)
        held = handle.held()
        if not held and not handle.readable() and self._nonblocking(handle):
            # a pipe's answer to a non-blocking reader; one that polls with edge-triggered
            # epoll (Go's poller) is woken only by a notification after this EAGAIN
            self._notify_when_readable(handle)
            raise Fs9Error(errno.EAGAIN, "nothing to read yet (O_NONBLOCK)")
        # A read that will wait holds one of pyfuse3's MAX_TASKS workers: an agent may
        # hold at most BLOCKED_PER_AGENT of them, and all agents together leave
        # OPERATOR_RESERVE for the operator (else EAGAIN: try again, as a pipe would).
        waiter = handle.opener if handle.opener is not None and not handle.readable() \
            else None
        if waiter is not None:
            if self.blocked.get(waiter, 0) >= BLOCKED_PER_AGENT or \
                    self.blocked_total >= MAX_TASKS - OPERATOR_RESERVE:
                raise Fs9Error(errno.EAGAIN, f"agent {waiter} has {BLOCKED_PER_AGENT} reads "
                                             "waiting already")
            self.blocked[waiter] = self.blocked.get(waiter, 0) + 1
            self.blocked_total += 1
        try:
            if held:
                await handle.wait_readable()
                return await handle.read(off, size)
            with trio.CancelScope() as scope:
                self.reading.add(scope)
                try:
                    return await handle.read(off, size)
                finally:
                    self.reading.discard(scope)
        finally:
            if waiter is not None:
                self.blocked[waiter] -= 1
                self.blocked_total -= 1
                if not self.blocked[waiter]:
                    del self.blocked[waiter]
        return b""  # cancelled by end_reads: the reader sees EOF

    def end_reads(self) -> None:
        """Unmounting: every blocked reader gets EOF, so pyfuse3's workers can finish."""
        self.closing = True
        for scope in list(self.reading):
            scope.cancel()

    def _nonblocking(self, handle: Handle) -> bool:
        """The reader's descriptor is non-blocking: now, as /proc shows it (set or cleared
        by fcntl after open), else as it was at open (fdflags.py). Asked only of a read
        with nothing to read (a stream's)."""
        now = self.fdflags.nonblocking_now(handle)
        return handle.nonblocking if now is None else now

    @boundary
    async def poll(self, ino, fh, poll_handle, ctx):
        handle = self._handle(fh)
        if poll_handle is not None:
            handle.poll_handle = poll_handle  # a fresh handle replaces the old one
        if handle.readable():
            return select.POLLIN | select.POLLRDNORM | select.POLLOUT | select.POLLWRNORM
        self._notify_when_readable(handle)
        return select.POLLOUT | select.POLLWRNORM

    def _notify_when_readable(self, handle: Handle) -> None:
        """Wake the kernel's pollers of handle (through its latest poll handle) once it is
        readable; one notifier per handle at a time."""
        if handle.poll_handle is None or handle.poll_scope is not None:
            return
        handle.poll_scope = trio.CancelScope()  # release cancels it, even before it starts
        self.nursery.start_soon(self._notifier, handle, handle.poll_scope)

    async def _notifier(self, handle: Handle, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await handle.wait_readable()
                handle.poll_handle.notify()
            except Exception:
                log.exception("poll notify")
        if handle.poll_scope is scope:
            handle.poll_scope = None
