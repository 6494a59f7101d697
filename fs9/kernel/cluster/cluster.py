"""The cluster: this fs9 as one node of one fs9 spread over several machines.

Nodes share a NATS JetStream cluster (engine.py); each keeps its own log as the truth
of what it did, and JetStream holds, replicated, what must outlive a node: where each
agent runs (placement), its queued tasks and its finished tasks' results (work.py).
  membership  each node puts its card (address, agents, load) every HEARTBEAT_S; a node
              whose card did not change while ours changed MISSED times is down (no
              clocks are compared; while nobody can write, nobody is judged down)
  placement   `spawn NAME [node=N]` in nodes/ctl claims NAME with a compare-and-swap
              create (so two spawns of one name cannot both win); the node named runs it.
              A down node's agents (restart permanent or transient) are moved by the
              least loaded live node with a compare-and-swap update at the revision it
              read: of several nodes trying, one wins, so exactly one node runs it
  takeover    the winner spawns the agent from its placement and reads its work anew
              (work.py): tasks that were queued or running there are delivered again
  fencing     a node that stored no heartbeat for FENCE_S (cut off from NATS, or NATS
              without a quorum) stops the agents placed on it (their running tasks are
              re-queued), well before the others can judge it down (MISSED beats,
              counted from its last stored card); once its heartbeats are stored again,
              it starts each one again only after a compare-and-swap update of its
              placement at the revision it knew succeeded (a survivor's takeover changed
              that revision: then the agent is not its own any more)
A manifest's `nodes = [...]` is where its agent may be placed (spawn, takeover).
A node is a peer (trusted as the operator's machine); agents are not: what they write
reaches other nodes only as task output, capped (work.py), as mail checked as its
sender on its own node (mail.py; results of its requests: forward.py), or as what the
operator of another node asks to read (answers.py).
"""
import errno
import json
import os
import re
import time

import trio

from ...errors import EngineError, Fs9Error
from .. import cmd, supervision
from ..names import NAME_RE
from .answers import Answers
from .forward import Forward
from .mail import Mail
from .proxy import Proxy
from .work import Work

HEARTBEAT_S = 1.0
MISSED = 6  # a node whose card did not change during 6 of our heartbeats is down
STALE_S = 3.0  # our stored heartbeats missing from our mirror this long: watch afresh
PLACE_S = 0.5  # how often placement is looked at (and a down node's agents claimed)
# No heartbeat stored for FENCE_S (counted from when the last stored one was sent): stop
# the agents placed here. Others move them no sooner than MISSED of their own beats
# (each HEARTBEAT_S and a write) after our last stored card: 2 s of margin, checked
# every FENCE_CHECK_S. A leader election longer than FENCE_S fences every node a while.
FENCE_S = 4.0
FENCE_CHECK_S = 0.2
BACKOFF_S = (0.2, 0.5, 1, 2, 5)
CMDS = (
    cmd.Cmd("spawn", "spawn", 1, None, usage="spawn NAME [node=NODE] [KEY=VALUE ...]"),
    cmd.Cmd("kill", "kill", 1, 1, usage="kill NAME"),
)
NOT_JOINED = "not in a cluster (fs9 mount --cluster URLS --node NAME)"


class Cluster:
    def __init__(self, kernel, urls: str, node: str) -> None:
        if not NAME_RE.fullmatch(node) or "." in node:
            raise Fs9Error(errno.EINVAL, f"not a node name: {node!r} (letters, digits, _ -)")
        self.kernel, self.urls, self.me = kernel, urls, node
        from .engine import Engine  # (nats-py loads only when a cluster is joined)
        self.engine = Engine(urls, node)
        self.work = Work(self)
        self.answers = Answers(self)
        self.mail = Mail(self)
        self.proxy = Proxy(self)
        self.forward = Forward(self)
        self.joined = False
        self.error = ""
        self._changed: dict[str, tuple[int, float]] = {}  # node -> (card revision, when seen)
        # agent -> (placement revision, our beat count when seen): a placement is taken
        # over only once it stood MISSED beats (one just made onto a node we judged down
        # a moment ago says the placer sees it up: our view of it may lag)
        self._placed_at: dict[str, tuple[int, int]] = {}
        self._parsed_of: dict[str, tuple[dict, dict]] = {}  # bucket -> (its mirror, parsed)
        self._own, self._beats = None, 0  # our card's revision in the mirror; how often it changed
        self._own_seen = time.monotonic()  # when the mirror last showed a new heartbeat of ours
        self._stored = time.monotonic()  # when our last stored heartbeat was sent
        self.fenced: set[str] = set()  # agents placed here that the fence stopped
        self._fenced_at = 0.0  # the latest moment the fence held

    # --- what this node knows of the cluster (mirrors of the buckets) -------------

    def cards(self) -> dict[str, dict]:
        return self._parsed("fs9-nodes", lambda m: {n: _json(v) for n, (_, v) in m.items()})

    def placements(self) -> dict[str, tuple[int, dict]]:
        return self._parsed("fs9-placement",
                            lambda m: {a: (rev, _json(v)) for a, (rev, v) in m.items()})

    def _parsed(self, bucket: str, parse):
        """A bucket's mirror parsed once per change (each change swaps in a new dict:
        engine.py), not at each look-up (several a message: the profile's 14%); the
        caller reads it, never changes it."""
        mirror = self.engine.mirrors[bucket]
        seen = self._parsed_of.get(bucket)
        if seen is None or seen[0] is not mirror:
            seen = self._parsed_of[bucket] = (mirror, parse(mirror))
        return seen[1]

    def alive(self, node: str) -> bool:
        if node == self.me:
            return self.joined
        seen = self._changed.get(node)
        if seen is None:  # a card not judged yet (just seen): no evidence it is down
            return node in self.cards()
        return self._beats - seen[1] < MISSED

    def placed(self, name: str) -> dict | None:
        entry = self.placements().get(name)
        return entry[1] if entry else None

    def refuse_kill(self, name: str) -> None:
        """A kill written in an agent's ctl or the root ctl, of an agent placed in the
        cluster: refused (killed on its node alone, its placement would stay: listed,
        and no node would run it). nodes/ctl's kill ends both."""
        if self.placed(name) is not None:
            raise Fs9Error(errno.EINVAL, f"{name} is placed in the cluster: "
                                         f"kill it with 'kill {name}' in nodes/ctl")

    def remote(self, name: str) -> dict | None:
        """agent name's placement when another node runs it, else None."""
        p = self.placed(name)
        return p if p and p.get("node") != self.me else None

    def agent_names(self) -> list[str]:
        return sorted(set(self.kernel.agents) | set(self.placements()))

    def node_text(self, node: str) -> str:
        card = self.cards().get(node, {})
        on = sorted(a for a, (_, p) in self.placements().items() if p.get("node") == node)
        beat = card.get("heartbeat", 0)
        return (f"node={node}\naddress={card.get('address', '')}\n"
                f"state={'up' if self.alive(node) else 'down'}\nagents={' '.join(on)}\n"
                f"local={' '.join(a for a in card.get('local', ()) if a not in on)}\n"
                f"load={card.get('load', '')}\nrunning={card.get('running', '')}\n"
                f"queued={card.get('queued', '')}\n"
                f"heartbeat={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(beat))}\n"
                f"heartbeat_age_s={time.time() - beat:.1f}\n")

    def state_line(self) -> str:
        return (f"node={self.me} joined={'yes' if self.joined else 'no'} "
                f"nodes={sum(self.alive(n) for n in self.cards())}/{len(self.cards())} "
                f"error={self.error or self.engine.error or '-'}\n")

    # --- nodes/ctl ------------------------------------------------------------------

    async def ctl(self, data: bytes) -> None:
        """nodes/ctl: spawn NAME [node=N] [KEY=VALUE...] | kill NAME; returns once the
        placement is in JetStream (the node named then spawns it)."""
        if not self.joined:
            raise Fs9Error(errno.EAGAIN, f"not joined yet: {self.error or self.engine.error}")
        for p in cmd.parse(CMDS, data):
            await getattr(self, p.cmd.method)(*p.args)

    async def spawn(self, name: str, *words: str) -> None:
        chosen = [w.split("=", 1)[1] for w in words if w.startswith("node=")]
        overrides = tuple(w for w in words if not w.startswith("node="))
        plan = supervision.plan(self.kernel, name, *overrides)  # the definition is sound
        if len(plan) != 1:
            raise Fs9Error(errno.EINVAL, f"{name} is a supervisor: its tree runs on one node "
                                         f"(spawn it with the root ctl)")
        if self._runs(name) and name not in self.placements():
            raise Fs9Error(errno.EEXIST, f"agent exists: {name} (on this node)")
        for other, card in self.cards().items():  # a node's own agent keeps its name
            if name in card.get("local", ()) and name not in self.placements() \
                    and self.alive(other):
                raise Fs9Error(errno.EEXIST, f"agent exists: {name} (on node {other})")
        may = plan[0][1].get("nodes")  # where its manifest lets it run (None: anywhere)
        if chosen and may and chosen[-1] not in may:
            raise Fs9Error(errno.EINVAL, f"{name} may run only on nodes: {' '.join(may)}")
        target = chosen[-1] if chosen else self.least_loaded(among=may)
        if target is None and may:
            raise Fs9Error(errno.EHOSTUNREACH, f"none of the nodes {name} may run on is up: "
                                               f"{' '.join(may)}")
        if target is None or not self.alive(target):
            seen = self._changed.get(target or "")
            raise Fs9Error(errno.EHOSTUNREACH, f"no such node up: {target}" + (
                f" (its card last changed {time.monotonic() - seen[1]:.1f} s ago)" if seen else ""))
        # spawn: this holder of the name, kept as it moves (gen counts moves, and starts
        # again at 1 for the next holder): whose requests' answers are whose (mail.py)
        placement = dict(node=target, args=list(overrides), gen=1, spawn=os.urandom(8).hex(),
                         restart=plan[0][1]["restart"], by=self.me,
                         **({"nodes": may} if may else {}))
        try:
            await self.engine.claim(name, json.dumps(placement).encode(), None)
        except EngineError as e:
            if "wrong last sequence" in str(e).lower() or "exists" in str(e).lower():
                raise Fs9Error(errno.EEXIST, f"agent exists: {name} (placed in the cluster)")
            # (a request whose answer was lost may yet have been stored: a second try
            # then says EEXIST, and the agent is placed)
            raise Fs9Error(errno.EAGAIN, f"placement not confirmed: {e} (try again)")

    async def kill(self, name: str) -> None:
        entry = self.placements().get(name)
        if entry is None:
            raise Fs9Error(errno.ENOENT, f"no such agent in the cluster: {name}")
        try:
            await self.engine.unplace(name, entry[0])
            await self.engine.forget(name)
        except EngineError as e:
            raise Fs9Error(errno.EAGAIN, f"not killed: {e} (try again)")

    def _runs(self, name: str) -> bool:
        agent = self.kernel.agents.get(name)
        return agent is not None and not agent.killed

    def least_loaded(self, but: str = "", among=None) -> str | None:
        """The live node (but `but`; one of `among`, if given) with the fewest agents
        placed on it (ties: by name)."""
        count = {n: 0 for n in self.cards()
                 if n != but and self.alive(n) and (not among or n in among)}
        for _, p in self.placements().values():
            if p.get("node") in count:
                count[p["node"]] += 1
        return min(count, key=lambda n: (count[n], n)) if count else None

    # --- serving ----------------------------------------------------------------------

    async def serve(self) -> None:
        """Join (retrying until NATS answers), then beat, place and work; until cancelled."""
        send, receive = trio.open_memory_channel(256)
        for attempt in range(10 ** 9):
            try:
                await self.engine.connect(send)
                break
            except EngineError as e:
                self.error = f"cannot join {re.sub(r'//[^@/,]*@', '//', self.urls)}: {e}"
                await trio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
        self.error = ""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._beat)
                nursery.start_soon(self._keep_watching)
                await trio.sleep(HEARTBEAT_S)  # our card is in before we judge others'
                self.joined = True
                nursery.start_soon(self._place, nursery)
                nursery.start_soon(self._fence)
                nursery.start_soon(self.answers.serve, receive)
                nursery.start_soon(self.work.sweep)
                nursery.start_soon(self.forward.serve)
        finally:
            self.engine.close()

    async def _beat(self) -> None:
        while True:
            k = self.kernel
            mine = [a for a, (_, p) in self.placements().items() if p.get("node") == self.me]
            local = sorted(a.name for a in k.agents.values() if not a.killed)
            card = dict(node=self.me, address=k.mount_path, agents=mine, local=local,
                        load=round(os.getloadavg()[0], 2), running=k.tally["running"],
                        queued=k.tally["queued"], heartbeat=time.time())
            sent = time.monotonic()
            try:
                await self.engine.put_card(json.dumps(card).encode())
                self._stored = sent
                self.error = ""
            except EngineError as e:
                self.error = f"heartbeat not stored: {e}"
            self._judge()
            await trio.sleep(HEARTBEAT_S)

    def _judge(self) -> None:
        """Count our own heartbeats as the mirror shows them, and note at which count
        each other node's card last changed. A node is down once it missed MISSED of
        ours: while nobody can write (JetStream electing a leader) or our watch is stale,
        our count stands still too, and nobody is judged down."""
        now, mirror = time.monotonic(), self.engine.mirrors["fs9-nodes"]
        own = mirror.get(self.me, (None,))[0]
        if own is not None and own != self._own:
            self._own, self._beats, self._own_seen = own, self._beats + 1, now
        for node, (rev, _) in mirror.items():
            if self._changed.get(node, (None,))[0] != rev:
                self._changed[node] = (rev, self._beats)
        for name, (rev, _) in self.placements().items():
            if self._placed_at.get(name, (None,))[0] != rev:
                self._placed_at[name] = (rev, self._beats)

    async def _keep_watching(self) -> None:
        """A watch that stopped seeing changes (our own heartbeats missing from the mirror
        while they are stored) after its server died is made afresh."""
        while True:
            await trio.sleep(HEARTBEAT_S)
            if self.engine.broken or (not self.error
                                      and time.monotonic() - self._own_seen > STALE_S):
                try:
                    await self.engine.rewatch()
                    self._own_seen = time.monotonic()
                except EngineError as e:
                    self.error = f"cannot watch the cluster: {e}"

    async def _fence(self) -> None:
        """Stop the agents placed here while no heartbeat of ours is stored (FENCE_S);
        start them again once one is, each after its placement is still ours."""
        while True:
            await trio.sleep(FENCE_CHECK_S)
            if self.fencing():
                for name in list(self.work.intakes):
                    if name not in self.fenced and self.work.fence(
                            name, f"fenced: no heartbeat stored for {FENCE_S:g} s"):
                        self.fenced.add(name)
                continue
            for name in list(self.fenced):
                entry = self.placements().get(name)
                if entry is None or entry[1].get("node") != self.me:
                    self.fenced.discard(name)  # killed or moved: _place ends our copy
                    continue
                try:  # ours still: the update at the revision we knew says so
                    await self.engine.claim(name, json.dumps(entry[1]).encode(), entry[0])
                except EngineError:
                    # moved (the mirror will say where: then dropped above), or changed
                    # while we looked, or NATS did not answer: asked again
                    continue
                self.fenced.discard(name)
                self.work.unfence(name)

    def fencing(self) -> bool:
        """No heartbeat stored for FENCE_S, or none sent since then stored yet (one sent
        before, stored late, does not lift the fence: a slow store would fence and lift
        it by turns)."""
        now = time.monotonic()
        if now - self._stored > FENCE_S:
            self._fenced_at = now
        return self._stored <= self._fenced_at

    async def _place(self, nursery) -> None:
        """Run what is placed here, stop what moved away, claim a down node's agents."""
        while True:
            for name, (rev, p) in self.placements().items():
                if p.get("node") == self.me:
                    if not self.fencing():  # (fenced: nothing new starts here)
                        self.work.run(name, p, nursery)
                elif name in self.work.intakes or self._runs(name):
                    # moved away while this node was thought down (or this node restarted
                    # with it in its log): one node runs it, the one placement names
                    self.work.stop(name, kill=True)
                    self.fenced.discard(name)
                elif not self.alive(p.get("node", "")) and p.get("restart") != "temporary" \
                        and self._beats - self._placed_at.get(name, (rev, self._beats))[1] \
                        >= MISSED and self.least_loaded(
                            but=p.get("node", ""), among=p.get("nodes")) == self.me:
                    moved = dict(p, node=self.me, gen=p.get("gen", 0) + 1, moved_from=p["node"])
                    try:  # of the nodes trying, the first update at rev wins
                        await self.engine.claim(name, json.dumps(moved).encode(), rev)
                        self.kernel.log.append("cluster_takeover", agent=name,
                                               node=p["node"], gen=moved["gen"])
                    except EngineError:
                        pass  # another node won: its placement arrives in the mirror
            for name in list(self.work.intakes):
                if name not in self.placements():
                    self.work.stop(name, kill=True)  # killed in the cluster
            await trio.sleep(PLACE_S)


def _json(value: bytes) -> dict:
    try:
        v = json.loads(value)
        return v if isinstance(v, dict) else {}
    except ValueError:
        return {}
