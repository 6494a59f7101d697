"""A topic wakes its readers in batches while events stream in (kernel/bus/topic.py):
an event after a quiet spell wakes them at once; one that follows another closely is
held for HOLD_S at most, and the read that follows carries every event published by
then. Nothing is lost, reordered or split; a non-blocking reader is not told EAGAIN
while events are held for it."""
import errno
import os
import subprocess
import sys
import time

import trio
import trio.testing

from conftest import read_until
from fs9.kernel.bus.topic import HOLD_MAX_S, HOLD_PER_READER_S, HOLD_S, QUIET_S, Topic
from fs9.kernel.stream import Changes


class Clock:
    """The topic's idea of now (what "quiet" means), moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_event_after_a_quiet_spell_wakes_readers_at_once_and_a_stream_in_batches():
    clock = Clock()

    async def main():
        topic = Topic("news")
        topic.clock = clock
        woken = []  # (time.monotonic, the count the reader was woken for)

        async def reader():
            seen = 0
            while seen < 5:
                while topic.shown <= seen:
                    await topic.changes.wait_past(topic.changes.version)
                woken.append((time.monotonic(), topic.count))
                _, _, events = topic.since(seen, "internal")
                assert events == [b"e%d\n" % i for i in range(seen + 1, topic.count + 1)]
                seen = topic.count

        async def woken_times(n):
            with trio.fail_after(30):
                while len(woken) < n:
                    await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            topic.publish(b"e1\n")  # the topic was quiet: at once, no timer
            assert (topic.shown, topic.held) == (1, False)
            await woken_times(1)
            held_at = time.monotonic()
            for i in (2, 3, 4):  # streaming: held, one timer for all three
                clock.now += QUIET_S / 10
                topic.publish(b"e%d\n" % i)
                assert (topic.shown, topic.held) == (1, True)
            await woken_times(2)
            assert woken[1][1] == 4  # one batch of three, not woken before the hold's end
            assert woken[1][0] - held_at >= HOLD_S * 0.9
            clock.now += 2 * QUIET_S  # quiet again: the next wakes at once
            topic.publish(b"e5\n")
            assert (topic.shown, topic.held) == (5, False)
        assert [count for _, count in woken] == [1, 4, 5]

    trio.run(main)


class Subscription:
    """Stands for an open subscription (a face cursor): the topic counts them weakly."""


def test_the_hold_and_the_quiet_spell_grow_with_the_readers_and_are_bounded():
    """Each wake-up costs a read per subscriber: with 20 open subscriptions a stream's
    events are held 20 x HOLD_PER_READER_S, and events 4 quiet spells of a lone reader
    apart still count as a stream; at most HOLD_MAX_S however many; a closed
    subscription stops counting."""
    clock = Clock()

    async def main():
        topic = Topic("wide")
        topic.clock = clock
        subs = [Subscription() for _ in range(20)]
        topic.readers.update(subs)
        hold = 20 * HOLD_PER_READER_S
        assert HOLD_S < hold < HOLD_MAX_S
        topic.publish(b"e1\n")  # quiet before: at once
        assert (topic.shown, topic.held) == (1, False)
        clock.now += 4 * QUIET_S  # a quiet spell for one reader, not for twenty
        held_at = time.monotonic()
        topic.publish(b"e2\n")
        assert (topic.shown, topic.held) == (1, True)
        with trio.fail_after(30):
            while topic.shown < 2:
                await topic.changes.wait_past(topic.changes.version)
        assert time.monotonic() - held_at >= hold * 0.9
        subs[5:] = []  # closed: 5 left, a lone reader's hold
        clock.now += 4 * QUIET_S
        topic.publish(b"e3\n")
        assert (len(topic.readers), topic.shown, topic.held) == (5, 3, False)
        subs += [Subscription() for _ in range(1000)]
        topic.readers.update(subs)
        clock.now += 5 * QUIET_S
        topic.publish(b"e4\n")
        started = time.monotonic()
        assert topic.held
        with trio.fail_after(30):
            while topic.shown < 4:
                await topic.changes.wait_past(topic.changes.version)
        assert HOLD_MAX_S * 0.9 <= time.monotonic() - started

    trio.run(main)


def test_a_waiter_for_a_version_ahead_is_woken_once_and_a_cancelled_one_forgotten():
    async def main():
        changes = Changes()
        got = []

        async def waiter(version):
            await changes.wait_until(version)
            got.append((version, changes.version))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, 3)
            nursery.start_soon(waiter, 5)
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(1):
                await changes.wait_until(4)  # cancelled before it is reached
            assert [v for v, _, _ in changes._until] == [3, 5]
            for _ in range(5):
                changes.bump()
                await trio.testing.wait_all_tasks_blocked()
        assert got == [(3, 3), (5, 5)] and not changes._until
        await changes.wait_until(2)  # reached already: returns at once

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


SUBSCRIBER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.write(1, b"r")  # subscribed (at open)
reads, got = 0, b""
while not got.endswith(b"end\\n"):
    chunk = os.read(fd, 65536)
    reads += 1
    got += chunk
with open(sys.argv[2], "wb") as f:
    f.write(b"%d\\n" % reads + got)
"""


def test_a_burst_reaches_every_subscriber_whole_and_in_order(mount, tmp_path):
    """Several subscriber processes and a publisher writing back to back (the events are
    held and come in batches): each subscriber reads every event once, in order, with
    no overflow note, and never an event split between reads."""
    mount.sh("touch topics/burst", check=True)
    topic = str(mount.path / "topics" / "burst")
    outs = [tmp_path / f"sub{i}" for i in range(4)]
    subs = [subprocess.Popen([sys.executable, "-c", SUBSCRIBER, topic, str(out)],
                             stdout=subprocess.PIPE) for out in outs]
    for p in subs:
        read_until(p.stdout, lambda got: got == b"r", what="a subscriber's open")
    fd = os.open(topic, os.O_WRONLY)
    for i in range(3000):
        os.write(fd, b"event %04d\n" % i)
    os.write(fd, b"end\n")
    os.close(fd)
    expected = b"".join(b"event %04d\n" % i for i in range(3000)) + b"end\n"
    for p, out in zip(subs, outs):
        assert p.wait(timeout=120) == 0
        reads, _, got = out.read_bytes().partition(b"\n")
        assert got == expected
        assert 1 <= int(reads) <= 3001


def test_a_non_blocking_reader_gets_held_events_not_eagain(mount):
    """Once a publisher's writes have returned, the events are the reader's: a read with
    O_NONBLOCK gets them (waiting out a hold, if any), it is not told to try again."""
    mount.sh("touch topics/nb", check=True)
    reader = os.open(mount.path / "topics" / "nb", os.O_RDONLY | os.O_NONBLOCK)
    try:
        try:
            os.read(reader, 65536)
            raise AssertionError("a read with nothing published returned")
        except BlockingIOError as e:
            assert e.errno == errno.EAGAIN  # nothing yet: as a pipe
        writer = os.open(mount.path / "topics" / "nb", os.O_WRONLY)
        for round_ in range(20):  # back to back: all but a round's first are held
            for i in range(5):
                os.write(writer, b"r%d e%d\n" % (round_, i))
            got = b""
            while got.count(b"\n") < 5:
                got += os.read(reader, 65536)  # never EAGAIN: raises if it were
            assert got == b"".join(b"r%d e%d\n" % (round_, i) for i in range(5))
        os.close(writer)
    finally:
        os.close(reader)


def test_each_publish_leaves_the_log_with_the_topic_s_retention_exactly(mount):
    """The trim rides in the publish's own commit: once a write has returned, the log
    (read by another connection, as after a kill -9) holds the bodies of exactly the
    events the topic keeps, the newest included."""
    import sqlite3
    (mount.state / "topics.toml").write_text("[topic.few]\nkeep_events = 3\n")
    mount.umount()
    mount.mount()
    mount.sh("touch topics/few", check=True)
    fd = os.open(mount.path / "topics" / "few", os.O_WRONLY)
    db = sqlite3.connect(f"file:{mount.state / 'log.sqlite'}?mode=ro", uri=True)
    try:
        for i in range(8):
            os.write(fd, b"e%d\n" % i)
            kept = [bytes(row[0]) for row in db.execute(
                "SELECT data FROM kept WHERE stream = 'topic:few' ORDER BY seq")]
            assert kept == [b"e%d\n" % n for n in range(max(0, i - 2), i + 1)]
    finally:
        db.close()
        os.close(fd)
