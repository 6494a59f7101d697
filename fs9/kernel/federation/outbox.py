"""The federation's outbox: cross-OS messages queued in the log and not yet acknowledged
by JetStream, oldest first, and the dead letters, those given up. Its events:
  fed_queued (id, to, os; the message in the blob)  fed_sent (id)  fed_dead (id, reason)
  fed_chunk_sent (id, i): chunk i of a large message acked (the rest resume after it)
A message whose `deadline` passes before JetStream has it is given up (`fed_dead`), never
silently dropped, and never published after: the sender (link.py) checks the deadline
before each publish, and a message being published is not given up under it.
Bounded while NATS is away or a peer paused: an agent's messages waiting here are at most
AGENT_MAX of them or AGENT_MAX_BYTES, all agents' together AGENTS_MAX_BYTES (the
operator's are not counted: it keeps room), EDQUOT past it (`room`); the dead letters
held in memory (federation/dead/) are the latest MAX_DEAD (the rest stay in the log).
`fed_sent` promises nothing durable, so it rides with the log's next commit (EventLog.
defer) rather than costing one of its own: a crash before that commit publishes the
message again, which JetStream's dedupe window or the receiver's own record drops."""
import collections
import errno
import heapq
import math
import time
from dataclasses import dataclass

import trio

from ...errors import Fs9Error
from ..bus import message
from ..stream import Changes

AGENT_MAX, AGENT_MAX_BYTES = 1000, 64 << 20  # one agent's messages waiting here
AGENTS_MAX_BYTES = 256 << 20  # all agents' together (a mailbox's 64 MiB, four times)
MAX_DEAD = 1000  # dead letters held (and listed in federation/dead/)


@dataclass
class Queued:
    os: str  # the peer it is for
    data: bytes  # the message as it crosses
    deadline: float | None  # epoch seconds, from its `deadline` header
    chunks_sent: int = 0  # of a large message: how many chunks JetStream has (chunks.py)
    topic: bool = False  # an event of an exported topic (topics.py bounds how many wait)
    agent: str | None = None  # the local agent that sent it (None: the operator, fs9)


class Outbox:
    def __init__(self, kernel, changes: Changes) -> None:
        self.kernel = kernel
        self.changes = changes  # shared with the federation: the sender waits on it
        self.pending: dict[str, Queued] = {}  # id -> message, in order of queueing
        self.dead: dict[str, Queued] = {}
        self.sending: set[str] = set()  # ids being published right now
        self.deadlines: list[tuple[float, str]] = []  # a heap: (deadline, id) of pending ones
        self.sent = 0
        self.topic_events: dict[str, int] = {}  # peer -> its topic events pending here
        self.of_agent: collections.Counter[str] = collections.Counter()  # waiting, by sender
        self.bytes_of_agent: collections.Counter[str] = collections.Counter()
        self.died = 0  # dead letters since event 1 (self.dead holds the latest)

    def __len__(self) -> int:
        return len(self.pending)

    def queued_for(self, peer: str) -> int:
        return sum(1 for q in self.pending.values() if q.os == peer)

    def room(self, agent: str, size: int) -> None:
        """Fs9Error(EDQUOT) if agent's message of `size` bytes would pass its share."""
        if self.of_agent[agent] >= AGENT_MAX or \
                self.bytes_of_agent[agent] + size > AGENT_MAX_BYTES:
            raise Fs9Error(errno.EDQUOT, f"{self.of_agent[agent]} messages of agent {agent} "
                           f"({self.bytes_of_agent[agent]} bytes) wait in the federation's "
                           f"outbox: {AGENT_MAX} or {AGENT_MAX_BYTES >> 20} MiB at the most")
        if sum(self.bytes_of_agent.values()) + size > AGENTS_MAX_BYTES:
            raise Fs9Error(errno.EDQUOT, "agents' messages waiting in the federation's "
                           f"outbox fill its {AGENTS_MAX_BYTES >> 20} MiB for agents")

    def expired(self, mid: str, now: float | None = None) -> bool:
        q = self.pending.get(mid)
        return q is not None and q.deadline is not None and \
            q.deadline <= (time.time() if now is None else now)

    def give_up(self, mid: str, reason: str) -> None:
        q = self.pending[mid]
        self.kernel.record("fed_dead", id=mid, os=q.os, reason=reason)

    def sent_now(self, mid: str, to: str) -> None:
        """JetStream has mid: out of the outbox now, on the record with the next commit."""
        if mid in self.pending:
            self.kernel.log.defer("fed_sent", id=mid, os=to)
            self._sent(mid)

    async def keep_deadlines(self) -> None:
        """Give up each message whose deadline passes while it waits (NATS away, the
        peer paused): a `fed_dead` event, and the message in federation/dead/."""
        while True:
            version = self.changes.version
            now = time.time()
            held = []  # (being published: the sender decides; looked at again later)
            while self.deadlines and self.deadlines[0][0] <= now:
                item = heapq.heappop(self.deadlines)
                if item[1] in self.sending:
                    held.append(item)
                elif self.expired(item[1], now):
                    self.give_up(item[1], "its deadline passed before JetStream had it")
            for item in held:
                heapq.heappush(self.deadlines, item)
            soonest = (now + 0.05) if held else \
                (self.deadlines[0][0] if self.deadlines else None)
            wait = math.inf if soonest is None else max(soonest - time.time(), 0.05)
            with trio.move_on_after(wait):
                await self.changes.wait_past(version)

    # --- applying events -------------------------------------------------------

    def appliers(self, requests) -> dict:
        """(requests: requests.py's, told of each work_request queued and sent)"""
        self.requests = requests
        return {"fed_queued": self._on_queued, "fed_sent": self._on_sent,
                "fed_dead": self._on_dead, "fed_chunk_sent": self._on_chunk_sent}

    def _on_queued(self, e, agent, task):
        data = self.kernel.blob(e)
        deadline = e.data["deadline"] if "deadline" in e.data else \
            message.load(data, 0).deadline  # (logged before the field was)
        q = self.pending[e.data["id"]] = Queued(e.data["os"], data, deadline,
                                                topic="topic" in e.data, agent=e.agent)
        if q.agent is not None:
            self.of_agent[q.agent] += 1
            self.bytes_of_agent[q.agent] += len(data)
        if q.topic:
            self.topic_events[q.os] = self.topic_events.get(q.os, 0) + 1
        if deadline is not None:
            heapq.heappush(self.deadlines, (deadline, e.data["id"]))
        self.requests.on_queued(e)
        self.changes.bump()

    def _on_sent(self, e, agent, task):
        self._sent(e.data["id"])

    def _sent(self, mid: str) -> None:
        q = self.pending.pop(mid, None)
        if q is not None:
            self.sent += 1
            self._left(q)
        self.requests.on_sent(mid)

    def _on_chunk_sent(self, e, agent, task):
        q = self.pending.get(e.data["id"])
        if q is not None:
            q.chunks_sent = max(q.chunks_sent, e.data["i"] + 1)

    def _on_dead(self, e, agent, task):
        q = self.pending.pop(e.data["id"], None)
        if q is not None:
            self.died += 1
            self.dead[e.data["id"]] = q
            if len(self.dead) > MAX_DEAD:
                del self.dead[next(iter(self.dead))]
            self._left(q)

    def _left(self, q: Queued) -> None:
        if q.agent is not None:
            self.of_agent[q.agent] -= 1
            self.bytes_of_agent[q.agent] -= len(q.data)
            if self.of_agent[q.agent] <= 0:
                del self.of_agent[q.agent], self.bytes_of_agent[q.agent]
        if q.topic:
            self.topic_events[q.os] -= 1
