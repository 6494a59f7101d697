"""NATS JetStream, the federation's engine: the one module that imports nats-py.

nats-py is asyncio and fs9 is trio, so the client lives on an asyncio loop in a thread
of its own, and trio awaits each call's result (`call`): the coroutine runs on that
loop, and its completion wakes the trio task through the trio token, so no thread
blocks per call. Two streams carry the federation (subjects are `.`-separated, so an OS
name is one token: letters, digits, _ and -):
  FS9FED    fs9.fed.TO.FROM  one cross-OS message; Nats-Msg-Id dedupes a resend. A work
            queue: a message leaves once its receiver acked it. Bounded without ever
            dropping one: at most MAX_PER_PAIR waiting from one OS to another and
            MAX_BYTES in all, past which JetStream refuses the publish (discard new), so
            the sender's outbox holds it and tries again: back-pressure, not loss
  FS9CARDS  fs9.card.OS      each member's card, the latest one kept
Each member reads its mail through a durable pull consumer of its own (fs9-OS), acking
a message only once its own log holds it (federation.py).
"""
import asyncio
import threading

import nats
import nats.errors
import nats.js.errors
import trio

MAIL_STREAM, CARD_STREAM = "FS9FED", "FS9CARDS"
ACK_WAIT_S = 10  # an unacked message is redelivered after this long (a member killed)
MAX_PER_PAIR = 10_000  # messages waiting in FS9FED from one OS for another
MAX_BYTES = 1 << 30  # bytes waiting in FS9FED in all
MAX_MSG = 1 << 20  # bytes of one (chunks.py keeps each under this)


class EngineError(Exception):
    """NATS said no or did not answer (the text says which): retried by the caller."""


class Engine:
    def __init__(self, url: str, me: str) -> None:
        self.url, self.me = url, me
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name=f"nats {url}")
        self._thread.start()
        self.nc = self.js = self.inbox = None
        self.error = ""  # the client's latest connection error (it retries by itself)

    async def call(self, coro):
        """Run coro on the engine's loop; its result here, or EngineError."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_):
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # trio has ended: nobody waits
        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        try:
            return future.result()
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
            raise EngineError(f"{type(e).__name__}: {e}".rstrip(": ")) from None

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self) -> None:
        await self.call(self._connect())

    async def _connect(self) -> None:
        nc = await nats.connect(self.url, connect_timeout=2, reconnect_time_wait=0.5,
                                max_reconnect_attempts=-1, allow_reconnect=True,
                                error_cb=self._error, disconnected_cb=_nothing)
        js = nc.jetstream(timeout=5)
        await _ensure_stream(js, name=MAIL_STREAM, subjects=["fs9.fed.>"],
                             duplicate_window=120,
                             retention=nats.js.api.RetentionPolicy.WORK_QUEUE,
                             discard=nats.js.api.DiscardPolicy.NEW,
                             discard_new_per_subject=True, max_msgs_per_subject=MAX_PER_PAIR,
                             max_bytes=MAX_BYTES, max_msg_size=MAX_MSG)
        await _ensure_stream(js, name=CARD_STREAM, subjects=["fs9.card.*"],
                             max_msgs_per_subject=1)
        self.inbox = await js.pull_subscribe(
            f"fs9.fed.{self.me}.*", durable=f"fs9-{self.me}", stream=MAIL_STREAM,
            config=nats.js.api.ConsumerConfig(ack_wait=ACK_WAIT_S, max_deliver=-1))
        self.nc, self.js = nc, js

    async def _error(self, e) -> None:
        """nats-py reports here each failed attempt to reach the server (it goes on)."""
        self.error = f"{type(e).__name__}: {e}".rstrip(": ")

    async def publish(self, to: str, data: bytes, msg_id: str,
                      headers: dict[str, str] | None = None) -> None:
        """One message to OS `to`; returns once JetStream stored it (its ack). headers:
        fs9's own (a chunk's place, chunks.py), beside the dedupe id."""
        await self.call(self.js.publish(f"fs9.fed.{to}.{self.me}", data, timeout=5,
                                        headers={"Nats-Msg-Id": msg_id, **(headers or {})}))

    async def fetch(self, batch: int = 64, timeout: float = 2.0) -> list:
        """Up to batch waiting messages as (origin OS, data, headers, ack): [] after
        timeout. The headers are the publisher's: untrusted, checked by the caller."""
        try:
            msgs = await self.call(self.inbox.fetch(batch, timeout=timeout))
        except EngineError as e:
            if "Timeout" in str(e):
                return []
            raise
        return [(m.subject.rsplit(".", 1)[-1], m.data, dict(m.headers or {}), m) for m in msgs]

    async def publish_batch(self, items: list[tuple[str, bytes, str]]) -> list[str | None]:
        """Several (to, data, msg_id) at once, pipelined on the connection (each still
        awaits its own JetStream ack): per item, None once stored, or why not."""
        async def all_of():
            return await asyncio.gather(*(
                self.js.publish(f"fs9.fed.{to}.{self.me}", data, timeout=5,
                                headers={"Nats-Msg-Id": mid}) for to, data, mid in items),
                return_exceptions=True)
        return [f"{type(r).__name__}: {r}".rstrip(": ") if isinstance(r, BaseException)
                else None for r in await self.call(all_of())]

    async def ack_batch(self, handles: list) -> None:
        """Ack each (a lost ack is a redelivery, which the receiver's log drops)."""
        async def all_of():
            await asyncio.gather(*(h.ack() for h in handles), return_exceptions=True)
        await self.call(all_of())

    async def later(self, handle, delay: float) -> None:
        """Not now: JetStream delivers it again after delay (a peer over its rate)."""
        await self.call(handle.nak(delay=delay))

    async def put_card(self, data: bytes) -> None:
        await self.call(self.js.publish(f"fs9.card.{self.me}", data, timeout=5))

    async def card(self, of: str) -> bytes | None:
        try:
            return (await self.call(self.js.get_last_msg(CARD_STREAM, f"fs9.card.{of}"))).data
        except EngineError as e:
            if "NotFound" in str(e) or "no message" in str(e).lower():
                return None
            raise

    def close(self) -> None:
        """Drop the connection and end the loop's thread (not awaited: at unmount)."""
        async def _close():
            if self.nc is not None:
                try:
                    await self.nc.close()
                except Exception:
                    pass
        try:
            asyncio.run_coroutine_threadsafe(_close(), self.loop).result(timeout=3)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)


async def _ensure_stream(js, **config) -> None:
    """The stream as configured: created, or updated to this configuration."""
    cfg = nats.js.api.StreamConfig(storage=nats.js.api.StorageType.FILE, **config)
    try:
        await js.add_stream(cfg)
    except nats.js.errors.BadRequestError:
        await js.update_stream(cfg)


async def _nothing() -> None:
    pass
