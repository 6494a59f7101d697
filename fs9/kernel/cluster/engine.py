"""NATS JetStream, the cluster's engine: the one module of the cluster that imports nats-py.

The Engine is a natsbridge.Bridge (the federation's engine is another): the client
lives on an asyncio loop in a thread of its own, and trio awaits each call. What the
cluster keeps in JetStream, every piece replicated on 3 servers (R3) and, with the
servers' `sync_interval: always`, fsynced before it is acknowledged:
  KV fs9-nodes      NODE -> its card (address, agents, load), put at each heartbeat
  KV fs9-placement  AGENT -> the node that runs it and how to spawn it; claimed and
                    moved only by compare-and-swap (create / update at a revision)
  FS9WORK   fs9.work.AGENT  an agent's queued tasks and the operator's mail to it
            (header Fs9-Kind: task | mail; work-queue retention: a task goes once it
            has ended and its result is stored, mail once the agent acked it); one durable pull
            consumer per agent (w-AGENT), read by the node that runs it (R3, its state
            in memory: made afresh by each reader, it holds nothing the stream does not)
  FS9RESULTS fs9.result.AGENT  each finished task's state and output (capped)
An agent's name may hold `.`, a subject's separator: in subjects and consumer names it
is hex. Requests between nodes (a remote agent's ctl, status, out) are core NATS
request/reply on fs9.rpc.NODE, answered by the node's trio side (`requests`).
"""
import asyncio

import nats
import nats.errors
import nats.js.api as api
import nats.js.errors
import trio

from ..natsbridge import Bridge, EngineError, ensure_stream
from .work import MAX_TASK_BYTES

NODES, PLACEMENT, WORK, RESULTS = "fs9-nodes", "fs9-placement", "FS9WORK", "FS9RESULTS"
REPLICAS = 3
# Caps per agent, whoever writes: queued tasks in the work stream (a writer past it is
# refused, nothing already queued is dropped), their size, and results kept per agent.
QUEUED_PER_AGENT = 10_000
RESULTS_PER_AGENT = 10_000
HELD_S = 24 * 3600  # a task's message is redelivered only by a takeover, not by time
REQUESTS_WAITING = 256  # requests from other nodes not yet answered: past it, "busy"


def token(name: str) -> str:
    """An agent's name as one subject token (hex: a name may hold `.`)."""
    return name.encode().hex()


class Engine(Bridge):
    def __init__(self, urls: str, me: str) -> None:
        super().__init__(f"nats cluster {me}")
        self.urls, self.me = urls, me
        self.nc = self.js = self.nodes = self.placement = None
        self.error = ""  # the client's latest connection error (it retries by itself)
        self.requests = None  # trio channel of (request bytes, answer(bytes)), once serving
        self._token = None
        self.mirrors: dict[str, dict[str, tuple[int, bytes]]] = {NODES: {}, PLACEMENT: {}}
        self._watching: list = []  # the asyncio tasks that keep the mirrors
        self.broken = ""  # why a watch ended, until watched afresh

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self, requests) -> None:
        """Connect, make the buckets and streams (R3), mirror the buckets, answer requests."""
        self.requests, self._token = requests, trio.lowlevel.current_trio_token()
        await self.call(self._connect())

    async def _connect(self) -> None:
        nc = await nats.connect(servers=self.urls.split(","), connect_timeout=2,
                                reconnect_time_wait=0.5, max_reconnect_attempts=-1,
                                allow_reconnect=True, error_cb=self._error)
        js = nc.jetstream(timeout=5)
        kv = dict(history=1, replicas=REPLICAS, storage=api.StorageType.FILE)
        self.nodes = await js.create_key_value(bucket=NODES, **kv)
        self.placement = await js.create_key_value(bucket=PLACEMENT, **kv)
        await ensure_stream(js, name=WORK, subjects=["fs9.work.*"], num_replicas=REPLICAS,
                             retention=api.RetentionPolicy.WORK_QUEUE,
                             max_msgs_per_subject=QUEUED_PER_AGENT, discard=api.DiscardPolicy.NEW,
                             # else, full, JetStream would drop an agent's oldest queued task
                             discard_new_per_subject=True,
                             max_msg_size=MAX_TASK_BYTES + 4096, duplicate_window=120)
        await ensure_stream(js, name=RESULTS, subjects=["fs9.result.*"], num_replicas=REPLICAS,
                             max_msgs_per_subject=RESULTS_PER_AGENT, duplicate_window=120)
        await nc.subscribe(f"fs9.rpc.{self.me}", cb=self._request)
        self.nc, self.js = nc, js
        await self._watch()

    async def _watch(self) -> None:
        """Mirror both buckets from a fresh watch (their current values, then changes)."""
        for task in self._watching:
            task.cancel()
        self._watching, self.broken = [], ""
        for bucket, kv_ in ((NODES, self.nodes), (PLACEMENT, self.placement)):
            watcher = await kv_.watchall()
            self._watching.append(self.loop.create_task(self._mirror(bucket, watcher)))

    async def rewatch(self) -> None:
        """Watch afresh: a watch may stop seeing changes after its server died (the
        cluster notices: its own heartbeats stop showing up in the mirror)."""
        await self.call(self._watch())

    async def _mirror(self, bucket: str, watcher) -> None:
        """Keep mirrors[bucket] as the bucket is: each change swaps in a new dict, so
        trio reads a consistent one without a lock. A fresh watch's initial values are
        gathered apart and swapped in whole (a half-read bucket would look like agents
        killed)."""
        fresh: dict | None = {}
        while True:
            try:
                entry = await watcher.updates(timeout=3600)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except Exception as e:  # the watch ended: the cluster watches afresh
                self.broken = f"watch of {bucket} ended: {type(e).__name__}: {e}"
                return
            if entry is None:  # the end of the initial values
                if fresh is not None:
                    self.mirrors[bucket], fresh = fresh, None
                continue
            now = fresh if fresh is not None else dict(self.mirrors[bucket])
            if entry.operation in ("DEL", "PURGE"):
                now.pop(entry.key, None)
            else:
                now[entry.key] = (entry.revision, entry.value)
            if fresh is None:
                self.mirrors[bucket] = now

    async def _error(self, e) -> None:
        self.error = f"{type(e).__name__}: {e}".rstrip(": ")

    async def _request(self, msg) -> None:
        """A request from another node: handed to trio, answered when trio has answered."""
        answered = self.loop.create_future()

        def answer(data: bytes) -> None:  # called from trio
            self.loop.call_soon_threadsafe(
                lambda: answered.done() or answered.set_result(data))
        try:
            self._token.run_sync_soon(self._hand, msg.data, answer)
            await msg.respond(await asyncio.wait_for(answered, 30))
        except Exception:
            pass  # trio has ended, or the asker gave up: it times out and says so

    def _hand(self, data: bytes, answer) -> None:
        try:
            self.requests.send_nowait((data, answer))
        except trio.WouldBlock:
            answer(b'{"errno": "EBUSY", "text": "node busy: too many requests waiting"}')

    async def ask(self, node: str, data: bytes, timeout: float = 10) -> bytes:
        """Request to node's fs9.rpc.NODE; its answer (EngineError if none in time)."""
        return (await self.call(self.nc.request(f"fs9.rpc.{node}", data, timeout=timeout))).data

    # --- key-value ------------------------------------------------------------

    async def put_card(self, data: bytes) -> int:
        """This node's card; its revision."""
        return await self.call(self.nodes.put(self.me, data))

    async def claim(self, agent: str, data: bytes, revision: int | None) -> int:
        """Compare-and-swap: create the key (revision None) or replace the value it had
        at `revision`. The new revision; EngineError if another got there first."""
        if revision is None:
            return await self.call(self.placement.create(agent, data))
        return await self.call(self.placement.update(agent, data, last=revision))

    async def unplace(self, agent: str, revision: int) -> None:
        await self.call(self.placement.delete(agent, last=revision))

    # --- work and results -----------------------------------------------------

    async def queue(self, agent: str, data: bytes, msg_id: str, kind: str,
                    **more: str) -> None:
        """One task or message (kind) for agent; returns once a quorum stored it. more:
        headers this node sets (an agent's mail: Fs9-From, Fs9-Label; never an agent's
        own text)."""
        await self.call(self.js.publish(f"fs9.work.{token(agent)}", data, timeout=5,
                                        headers={"Nats-Msg-Id": msg_id, "Fs9-Kind": kind,
                                                 **more}))

    async def intake(self, agent: str, fresh: bool):
        """agent's work consumer. `fresh`: made anew, so every task not finished is
        delivered again (a takeover: the old owner held them)."""
        async def _open():
            name = f"w-{token(agent)}"
            if fresh:
                try:
                    await self.js.delete_consumer(WORK, name)
                except nats.js.errors.NotFoundError:
                    pass
            return await self.js.pull_subscribe(
                f"fs9.work.{token(agent)}", durable=name, stream=WORK,
                config=api.ConsumerConfig(ack_wait=HELD_S, max_deliver=-1,
                                          max_ack_pending=QUEUED_PER_AGENT,
                                          # (R3, its state in memory, not fsynced: a
                                          # reader always makes it afresh, so all it
                                          # must keep is held by the stream itself)
                                          mem_storage=True))
        return await self.call(_open())

    async def has_intake(self, agent: str) -> bool:
        """agent's work consumer exists (EngineError: JetStream did not say)."""
        async def _has():
            try:
                await self.js.consumer_info(WORK, f"w-{token(agent)}")
                return True
            except nats.js.errors.NotFoundError:
                return False
        return await self.call(_has())

    async def fetch(self, sub, batch: int = 64, timeout: float = 1.0) -> list:
        """Up to batch waiting items as (headers, data, handle): [] after timeout."""
        try:
            msgs = await self.call(sub.fetch(batch, timeout=timeout))
        except EngineError as e:
            if "Timeout" in str(e):
                return []
            raise
        return [(dict(m.headers or {}), m.data, m) for m in msgs]

    def drop(self, sub) -> None:
        """Unsubscribe a consumer's subscription (not awaited: from a finally, at
        unmount too): the server then drops its pull requests, which no longer have a
        reader, rather than hand them a message."""
        async def quietly():
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        try:
            asyncio.run_coroutine_threadsafe(quietly(), self.loop)
        except RuntimeError:
            pass  # (the loop has ended)

    async def ack(self, handle) -> None:
        await self.call(handle.ack_sync(timeout=5))

    async def acks(self, handles: list) -> list[bool]:
        """Ack each handle, all at once (one hop, the acks in flight together); for
        each, whether JetStream confirmed it."""
        async def _acks():
            got = await asyncio.gather(*(h.ack_sync(timeout=5) for h in handles),
                                       return_exceptions=True)
            return [not isinstance(g, BaseException) for g in got]
        return await self.call(_acks())

    async def result(self, agent: str, data: bytes, msg_id: str) -> None:
        await self.call(self.js.publish(f"fs9.result.{token(agent)}", data, timeout=5,
                                        headers={"Nats-Msg-Id": f"r-{msg_id}"}))

    async def forget(self, agent: str) -> None:
        """An agent killed: its queued tasks and its consumer go."""
        async def _forget():
            try:
                await self.js.delete_consumer(WORK, f"w-{token(agent)}")
            except nats.js.errors.NotFoundError:
                pass
            await self.js.purge_stream(WORK, subject=f"fs9.work.{token(agent)}")
        await self.call(_forget())

    def close(self) -> None:
        """Drop the connection and end the loop's thread (not awaited: at unmount)."""
        super().close(self.nc.close if self.nc is not None else None)
