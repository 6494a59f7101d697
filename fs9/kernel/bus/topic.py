"""Topics: publish/subscribe. One write is one event; each reader subscribes at open.

A topic keeps its newest events, at most `keep_events` of them and `keep_bytes` bytes
(Retention: STATE/topics.toml, per topic or for all; the newest event is always kept),
numbered from 1, in memory and on disk alike: each event's body is kept in the log
beside its `published` event (EventLog.append keep=), and each publish's commit also
cuts from the log what the topic keeps no longer (EventLog.append_trimming). So a burst
of events costs at most the retention, in memory and on disk; replay rebuilds the same
tail (an event whose body was trimmed is counted, not kept). The `published` events themselves (topic, sender,
label, size) stay in the log for audit. A subscriber holds only its position, so a slow
one never stalls the publisher or the other subscribers; one that falls behind what is
kept is told how many it missed (an `fs9: overflow` line) and goes on from the oldest
event still kept.

Each event keeps its label (the publisher's clearance); the topic's label is the
highest so far: a reader cleared lower may not open it, and a reader that opened it
before it rose is not shown the events above its clearance (bus.py).
"""
import collections
import errno
import itertools
import math
import time
import tomllib
import weakref

import trio

from ...errors import Fs9Error
from .. import timer
from ..names import NAME_RE
from ..stream import Changes
from .message import CLASSIFICATIONS, clearance_allows

KEEP_EVENTS = 1024  # events a topic keeps by default: a subscriber's bounded backlog...
KEEP_BYTES = 4 << 20  # ...and its bytes: 1,024 events of 64 KiB would be 64 MiB a topic
MAX_EVENT = 64 << 10  # bytes in one event
BOUNDS = {"keep_events": (1, 1_000_000), "keep_bytes": (MAX_EVENT, 1 << 30)}
# An event published within QUIET_S of the one before is held for HOLD_S at most (one
# that comes after a quiet spell wakes the readers at once): a woken reader's read then
# carries every event published meanwhile. Woken for each event, each subscriber made a
# FUSE read per publish, most of a fan-out's cost (docs/benchmarks.md). The hold (and
# the quiet spell with it) grows with the topic's readers (open subscriptions),
# HOLD_PER_READER_S each, up to HOLD_MAX_S: a woken read costs the server about 50 us,
# so a stream's wake-ups take at most about a third of its time however many subscribe
# and the publisher keeps its pace (10 subscribers: 2x the events delivered a second).
HOLD_S = 0.0005
HOLD_PER_READER_S = 0.00015
HOLD_MAX_S = 0.005
QUIET_S = 0.002  # (QUIET_S / HOLD_S: how many holds long a quiet spell is)


class Retention:
    """How much each topic keeps: defaults, and per topic, from STATE/topics.toml
    (read at mount):
        keep_bytes = 4194304    # every topic (bytes of events, in memory and on disk)
        keep_events = 1024
        [topic.NAME]            # one topic's own (either key)
        keep_bytes = 16777216
    """

    def __init__(self, config: dict | None = None, origin: str = "topics.toml") -> None:
        config = config or {}
        self.default = self._limits(config, origin, {"keep_events": KEEP_EVENTS,
                                                     "keep_bytes": KEEP_BYTES})
        tables = config.get("topic", {})
        if not isinstance(tables, dict) or set(config) - {"topic", *BOUNDS}:
            raise Fs9Error(errno.EINVAL, f"{origin}: keys are keep_bytes, keep_events and "
                                         "[topic.NAME] tables")
        self.topics = {}
        for name, table in tables.items():
            where = f"{origin} [topic.{name}]"
            if not NAME_RE.fullmatch(name) or not isinstance(table, dict) or set(table) - set(BOUNDS):
                raise Fs9Error(errno.EINVAL, f"{where}: a topic's name (letters, digits, _ . -) "
                                             "with keep_bytes and/or keep_events")
            self.topics[name] = self._limits(table, where, self.default)

    @staticmethod
    def _limits(table: dict, where: str, defaults: dict) -> dict:
        limits = dict(defaults)
        for key, (low, high) in BOUNDS.items():
            value = table.get(key, limits[key])
            if type(value) is not int or not low <= value <= high:
                raise Fs9Error(errno.EINVAL, f"{where}: {key} must be a whole number from "
                                             f"{low} to {high}")
            limits[key] = value
        return limits

    @classmethod
    def load(cls, path: str) -> "Retention":
        """STATE/topics.toml's retention (none: the defaults); Fs9Error(EINVAL) if it is
        unreadable or wrong."""
        try:
            with open(path, "rb") as f:
                return cls(tomllib.load(f), path)
        except FileNotFoundError:
            return cls()
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise Fs9Error(errno.EINVAL, f"{path}: {e}") from None

    def of(self, topic: str) -> dict:
        return self.topics.get(topic, self.default)


class Topic:
    def __init__(self, name: str, keep_events: int = KEEP_EVENTS,
                 keep_bytes: int = KEEP_BYTES) -> None:
        self.name = name
        self.keep_bytes = keep_bytes
        self.count = 0  # events published so far; the number of the newest
        # (log seq, label, body) of the events kept, oldest first; numbered up to count
        self.events: collections.deque[tuple[int, str, bytes]] = collections.deque(
            maxlen=keep_events)
        self.label = CLASSIFICATIONS[0]  # the highest clearance that published here
        self.bytes = 0  # of the events kept
        self.changes = Changes()  # bumped when readers are woken (_wake)
        self.readers: weakref.WeakSet = weakref.WeakSet()  # open subscriptions (cursors)
        self.shown = 0  # the events readers have been woken for (count, or behind: held)
        self.last = -math.inf  # when the latest event was published (by clock)
        self.held = False  # a timer will wake them (it carries every event until then)
        self.clock = time.monotonic  # (a test's own: what "quiet" means, exactly)

    @property
    def oldest_seq(self) -> int:
        """The log seq of the oldest event kept (0: none): the log keeps no body below."""
        return self.events[0][0] if self.events else 0

    def _drops(self, size: int) -> int:
        """How many of the kept events (oldest first) a publish of `size` bytes pushes
        out: one past keep_events, then as many as keep_bytes needs (the new one stays)."""
        drop = int(len(self.events) == self.events.maxlen)
        total = self.bytes + size - (len(self.events[0][2]) if drop else 0)
        while total > self.keep_bytes and drop < len(self.events):
            total -= len(self.events[drop][2])
            drop += 1
        return drop

    def oldest_after(self, size: int) -> int:
        """The log seq of the oldest event kept once one of `size` bytes is published
        (0: that one alone): the log keeps no body below it."""
        drop = self._drops(size)
        return self.events[drop][0] if drop < len(self.events) else 0

    def publish(self, data: bytes | None, label: str = "internal", seq: int = 0) -> int:
        """One more event (seq: its `published` event's). data None: its body was
        trimmed from the log (a replay): counted, not kept."""
        self.count += 1
        if not clearance_allows(self.label, label):
            self.label = label
        if data is None:
            self.shown = self.count  # (replay: nobody reads yet)
            return self.count
        for _ in range(self._drops(len(data))):
            self.bytes -= len(self.events.popleft()[2])
        self.events.append((seq, label, data))
        self.bytes += len(data)
        self._wake()
        return self.count

    def _wake(self) -> None:
        """Wake the readers for what is published so far: now, if the topic was quiet
        (no event in the quiet spell before this one); else after a hold from now (one
        timer a topic, carrying every event published until it fires)."""
        now = self.clock()
        hold = min(HOLD_MAX_S, max(HOLD_S, HOLD_PER_READER_S * len(self.readers)))
        streaming, self.last = now - self.last < hold * (QUIET_S / HOLD_S), now
        if self.held:
            return
        if streaming:
            try:
                trio.lowlevel.spawn_system_task(self._wake_after, hold, name="topic wake")
                self.held = True
                return
            except RuntimeError:  # not in trio's thread: no timer, so at once
                pass
        self._woken()

    async def _wake_after(self, wait: float) -> None:
        try:
            await timer.sleep(wait)
        finally:  # (cancelled: the server stops; nothing to wait for)
            self.held = False
            self._woken()

    def _woken(self) -> None:
        self.shown = self.count
        self.changes.bump()

    def since(self, n: int, clearance: str) -> tuple[int, int, list[bytes]]:
        """(how many events after n were dropped, how many were withheld as above
        clearance, the kept events after n a reader of that clearance may see)."""
        oldest = self.count - len(self.events) + 1
        dropped = max(0, oldest - (n + 1))
        new = max(0, len(self.events) - (max(n + 1, oldest) - oldest))
        # walked from the newest end: a subscriber that keeps up reads one or a few
        # events, and copying the whole deque (up to keep_events) for each read of
        # each subscriber was most of a publish's fan-out cost
        kept = list(itertools.islice(reversed(self.events), new))[::-1]
        shown = [data for _, label, data in kept if clearance_allows(clearance, label)]
        return dropped, len(kept) - len(shown), shown
