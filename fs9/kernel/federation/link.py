"""The federation's tasks while joined: reach NATS (retrying with backoff), then send
the outbox, receive into the log, and publish our card and read the peers'. A member
that cannot reach NATS keeps working locally: its outbox waits, `federation/status`
says `connection=connecting` and the last error, and it catches up once NATS answers."""
from __future__ import annotations  # (Engine, named in signatures, is loaded late)

import errno
import itertools
import time

import trio

from ...errors import EngineError, Fs9Error
from . import chunks, credentials
from .federation import BACKOFF_S, Federation
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine

BATCH = 64  # messages published at once (pipelined) and acked at once
GATHER_S = 0.005  # a sender woken by one message waits this long for more to go with it,
# a receiver that fetched a few before it fetches again (each publish, fetch and ack is a
# hop to the engine's thread and a NATS request: one per batch, not per message)
THROTTLE_S = 1.0  # a message over its peer's rate comes again after this long
CARD_EVERY_S = 2  # how often our card is re-checked and the peers' fetched
MAX_CARD = 64 << 10  # bytes of a peer's card shown; a larger one is not shown (last_error)


async def serve(fed: Federation) -> None:
    """Until cancelled: the outbox's and the held requests' deadlines, and the link
    while joined."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_supervised, fed, lambda: fed.outbox.keep_deadlines())
        nursery.start_soon(_supervised, fed, lambda: fed.governance.keep_deadlines())
        nursery.start_soon(_supervised, fed, lambda: _link(fed))
        nursery.start_soon(_supervised, fed, lambda: _coordinate(fed))


async def _coordinate(fed: Federation) -> None:
    """The sagas this OS coordinates, moved on as their requests answer or time out
    (joined or not: a step's request waits in the outbox like any other)."""
    while True:
        version = fed.progress.version
        wake = fed.sagas.advance(time.time())
        with trio.move_on_after(max(wake - time.time(), 0.05)):
            await fed.progress.wait_past(version)


async def _supervised(fed: Federation, run) -> None:
    """A defect of ours costs the federation's task a restart, never the mount."""
    while True:
        try:
            await run()
        except Exception:
            fed.kernel.log.bug("federation")
            fed.last_error = "internal error (see the bug event); restarted"
            await trio.sleep(BACKOFF_S[-1])


async def _link(fed: Federation) -> None:
    """Joined, run the link to the URL joined; left, wait for a join."""
    while True:
        version = fed.changes.version
        if not fed.url:
            await fed.changes.wait_past(version)
            continue
        url, key = fed.url, fed.key
        try:  # (read anew at each join: a key rotated takes effect at the next)
            seed = credentials.read_seed(key) if key else None
        except Fs9Error as e:
            _failed(fed, "the key", e)
            with trio.move_on_after(BACKOFF_S[-1]):
                await fed.changes.wait_past(version)
            continue
        from .engine import Engine  # (nats-py loads only when a federation is joined)
        engine = fed.engine = Engine(url, fed.me, seed)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_left, fed, url, key, nursery.cancel_scope)
                await _connect(fed, engine)
                nursery.start_soon(_send, fed, engine)
                nursery.start_soon(_receive, fed, engine)
                nursery.start_soon(_cards, fed, engine)
        finally:
            fed.engine = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(engine.close)


async def _until_left(fed: Federation, url: str, key: str, scope: trio.CancelScope) -> None:
    while fed.url == url and fed.key == key:
        await fed.changes.wait_past(fed.changes.version)
    scope.cancel()


def _failed(fed: Federation, what: str, e: Exception) -> None:
    fed.last_error = f"{what}: {e}"[:500]


async def _connect(fed: Federation, engine: Engine) -> None:
    """nats-py retries an unreachable server by itself (engine.error says why, in
    federation/status); what else fails (a stream JetStream refused) is retried here."""
    attempt = 0
    while True:
        try:
            await engine.connect()
            fed.last_error = ""
            return
        except EngineError as e:
            _failed(fed, f"joining at {engine.url}", e)
        await trio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
        attempt += 1


async def _send(fed: Federation, engine: Engine) -> None:
    """Publish what is queued, oldest first; each one acked by JetStream is `fed_sent`."""
    attempt = 0
    while True:
        version = fed.changes.version
        outbox = fed.outbox
        now = time.time()  # (the first BATCH due: the outbox may hold thousands)
        due = list(itertools.islice(
            ((mid, q.os, q.data) for mid, q in outbox.pending.items()
             if q.os in fed.peers and not fed.peers[q.os].paused
             and mid not in outbox.sending and not outbox.expired(mid, now)), BATCH))
        if not due:  # (one expired is given up by outbox.keep_deadlines: a change)
            await fed.changes.wait_past(version)
            await trio.sleep(GATHER_S)
            continue
        # small messages go BATCH at a time, pipelined; a large one alone, chunk by chunk
        batch = list(itertools.takewhile(lambda d: len(d[2]) <= chunks.CHUNK, due[:BATCH]))
        outbox.sending.update(d[0] for d in batch or due[:1])
        try:
            if batch:
                errors = await engine.publish_batch([(to, data, f"{fed.me}/{mid}")
                                                     for mid, to, data in batch])
            else:
                mid, to, data = due[0]
                batch = due[:1]
                try:
                    await _publish(fed, engine, mid, to, data)
                    errors = [None]
                except EngineError as e:
                    errors = [str(e)]
        finally:
            outbox.sending.difference_update(d[0] for d in batch)
        for (mid, to, _), error in zip(batch, errors):
            if error is None:
                outbox.sent_now(mid, to)
        failed = [(to, e) for (_, to, _), e in zip(batch, errors) if e is not None]
        if failed:
            _failed(fed, f"publish to {failed[0][0]}", failed[0][1])
            await trio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            attempt += 1
        else:
            attempt = 0


async def _publish(fed: Federation, engine: Engine, mid: str, to: str, data: bytes) -> None:
    """One message, or its chunks from the first JetStream does not have yet."""
    pieces = chunks.split(mid, data)
    if len(pieces) == 1:
        return await engine.publish(to, data, f"{fed.me}/{mid}")
    for i, (piece, headers) in enumerate(pieces):
        if i < fed.outbox.pending[mid].chunks_sent:
            continue
        await engine.publish(to, piece, f"{fed.me}/{mid}/{i}", headers)
        fed.kernel.record("fed_chunk_sent", id=mid, os=to, i=i)


async def _receive(fed: Federation, engine: Engine) -> None:
    """Each message is recorded in the log (delivered or rejected) before it is acked;
    an ack lost is a redelivery, which the log's record turns into an ack alone."""
    attempt, recorded = 0, []
    while True:
        try:  # (what the last batch recorded is acked on the way: one hop, not two)
            batch = await engine.fetch(ack=recorded)
        except EngineError as e:
            _failed(fed, "fetch", e)
            await trio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            attempt += 1
            continue
        attempt, recorded = 0, []
        for origin, data, headers, handle in batch:
            if not fed.admit(origin):  # over its rate: later, nothing recorded
                try:
                    await engine.later(handle, THROTTLE_S)
                except EngineError as e:
                    _failed(fed, "nak", e)
                continue
            try:
                fed.receive(origin, data, headers)
            except Fs9Error as e:  # the log refused it, or the recipient's mailbox is
                _failed(fed, f"receive from {origin}", e)  # full: not acked, delivered
                if e.errno == errno.EDQUOT:  # again later (a full one: after a pause)
                    try:
                        await engine.later(handle, THROTTLE_S)
                    except EngineError:
                        pass
                continue
            recorded.append(handle)  # (in the log already: acked with the next fetch)
        if 0 < len(batch) < BATCH:  # a trickle: let a few gather for the next fetch
            await trio.sleep(GATHER_S)


async def _cards(fed: Federation, engine: Engine) -> None:
    published = None
    while True:
        try:
            card = fed.card_text().encode()
            if card != published:
                await engine.put_card(card)
                published = card
            for peer in list(fed.peers.values()):
                card = await engine.card(peer.name)
                if card is not None and len(card) > MAX_CARD:
                    fed.last_error = f"{peer.name}'s card is over {MAX_CARD} bytes: not shown"
                    card = None
                peer.card = card
        except EngineError as e:
            _failed(fed, "cards", e)
        await trio.sleep(CARD_EVERY_S)
