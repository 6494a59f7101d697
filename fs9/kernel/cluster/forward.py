"""What this node's kernel composes for an agent another node runs: the result of a task
made from that agent's work_request (and the task's status updates), stored in FS9WORK
like mail, so that it reaches the requester wherever it runs.

The kernel composes and delivers synchronously (bus.py); a JetStream write is awaited,
so a composed message is queued here and stored by `serve` in order, tried again until
JetStream takes it (its id is its NATS message id: a retry whose first try was stored
is dropped by JetStream's duplicate window). Until it is stored, the work_request it
answers is not acked (work.py: `pending`), so a node lost meanwhile loses neither: the
request runs again where its agent moves, and answers again. Bounded: PENDING_MAX
messages waiting (past it, or a message over the stream's size, it is withheld and
said, as a full mailbox's delivery is: `delivery_refused`).
"""
import collections

import trio

from ...errors import EngineError
from .work import MAX_TASK_BYTES, NO_HOLDER

PENDING_MAX = 10_000
RETRY_S = (0.2, 0.5, 1, 2, 5)


class Forward:
    def __init__(self, cluster) -> None:
        self.cluster, self.kernel, self.engine = cluster, cluster.kernel, cluster.engine
        self._send, self._receive = trio.open_memory_channel(PENDING_MAX)
        # correlation id -> composed messages with it not stored yet
        self.pending: collections.Counter = collections.Counter()

    def forward(self, msg, asker: str) -> None:
        """Queue msg (composed here for msg.to, an agent another node runs; asker: the
        holder of its name it is for, checked on delivery there: mail.composed)."""
        h = msg.headers
        why = None
        if len(msg.render()) > MAX_TASK_BYTES:
            why = f"over {MAX_TASK_BYTES} bytes for the cluster (the task's files keep it)"
        else:
            try:
                self._send.send_nowait((msg, asker))
                self.pending[h["correlation-id"]] += 1
            except trio.WouldBlock:
                why = f"{PENDING_MAX} messages waiting to be stored in the cluster"
        if why:
            self.kernel.log.append("delivery_refused", agent=msg.to, sender=h["from"],
                                   corr=h["correlation-id"], type=h["type"], reason=why)

    async def serve(self) -> None:
        async for msg, asker in self._receive:
            h = msg.headers
            for attempt in range(10 ** 9):
                try:
                    await self.engine.queue(msg.to, msg.render(), msg.id, "composed",
                                            **{"Fs9-From": h["from"],
                                               "Fs9-Label": h["classification"],
                                               "Fs9-Asker": asker or NO_HOLDER})
                    break
                except EngineError as e:
                    self.cluster.error = f"a {h['type']} for {msg.to} not stored yet: {e}"
                    await trio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
            corr = h["correlation-id"]
            self.pending[corr] -= 1
            if self.pending[corr] <= 0:
                del self.pending[corr]
