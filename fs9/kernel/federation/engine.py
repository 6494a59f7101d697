"""NATS JetStream, the federation's engine: its one module that imports nats-py.

nats-py is asyncio and fs9 is trio: the Engine is a natsbridge.Bridge (the client on an
asyncio loop in a thread of its own, each call awaited from trio). Two streams carry the
federation (subjects are `.`-separated, so an OS name is one token: letters, digits, _ and -):
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

import nats
import nats.js.api

from ..natsbridge import Bridge, EngineError, ensure_stream

from . import credentials

MAIL_STREAM, CARD_STREAM = "FS9FED", "FS9CARDS"
ACK_WAIT_S = 10  # an unacked message is redelivered after this long (a member killed)
MAX_PER_PAIR = 10_000  # messages waiting in FS9FED from one OS for another
MAX_BYTES = 1 << 30  # bytes waiting in FS9FED in all
MAX_MSG = 1 << 20  # bytes of one (chunks.py keeps each under this)


class Engine(Bridge):
    """EngineError (NATS said no or did not answer) is retried by the caller."""

    def __init__(self, url: str, me: str, seed: str | None = None) -> None:
        super().__init__(f"nats {url}")
        self.url, self.me = url, me
        self.seed = seed  # our nkey's seed (credentials.py), or None: no credentials
        self.nc = self.js = self.inbox = None
        self.error = ""  # the client's latest connection error (it retries by itself)

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self) -> None:
        await self.call(self._connect())

    async def _connect(self) -> None:
        nc = await nats.connect(self.url, connect_timeout=2, reconnect_time_wait=0.5,
                                max_reconnect_attempts=-1, allow_reconnect=True,
                                error_cb=self._error, disconnected_cb=_nothing,
                                nkeys_seed_str=self.seed,  # replies under our own prefix,
                                inbox_prefix=credentials.inbox(self.me))  # the only we read
        js = nc.jetstream(timeout=5)
        await ensure_stream(js, name=MAIL_STREAM, subjects=["fs9.fed.>"],
                            duplicate_window=120,
                            retention=nats.js.api.RetentionPolicy.WORK_QUEUE,
                            discard=nats.js.api.DiscardPolicy.NEW,
                            discard_new_per_subject=True, max_msgs_per_subject=MAX_PER_PAIR,
                            max_bytes=MAX_BYTES, max_msg_size=MAX_MSG)
        await ensure_stream(js, name=CARD_STREAM, subjects=["fs9.card.*"],
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

    async def fetch(self, batch: int = 64, timeout: float = 2.0, ack: list = ()) -> list:
        """Up to batch waiting messages as (origin OS, data, headers, ack): [] after
        timeout. The headers are the publisher's: untrusted, checked by the caller.
        ack: handles of messages the caller recorded, acked first in the same hop to the
        engine's loop (a lost ack is a redelivery, which the receiver's log drops)."""
        async def acked_then_fetched():
            await asyncio.gather(*(h.ack() for h in ack), return_exceptions=True)
            return await self.inbox.fetch(batch, timeout=timeout)
        try:
            msgs = await self.call(acked_then_fetched())
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
        super().close(self.nc.close if self.nc is not None else None)


async def _nothing() -> None:
    pass
