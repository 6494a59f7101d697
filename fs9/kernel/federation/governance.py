"""Cross-OS authorization: who decides whether a peer's work_request is taken here.

Per peer (federation/ctl `peer OS auth=MODE`):
  delegated    the requesting OS's authority is trusted (within the ceiling): taken
  independent  each request waits for this OS's operator, as a file:
               federation/approvals/ID (read it; write `approve` or `deny [REASON]`)
  policy       pre-agreed rules decide, first match wins, none matching: the operator
                 rule OS approve|deny|ask KEY=V1,V2 [KEY=...]
               e.g. `rule coding approve x-kind=bugfix x-severity=high,critical` and
               `rule coding ask x-kind=feature`; `rule OS clear` drops them. A rule
               compares the request's headers (as the peer wrote them: untrusted, so
               only ever tested for equality with the operator's values)
Only work requests are judged: other mail asks for no work. Every decision is an event:
  fed_held (origin, id, to, reason; the message as it will be delivered, in the blob)
  fed_decided (origin, id, decision, by, reason)     fed_rule (os, action, match | clear)
A request held is the receiver's record (so acked to NATS and not judged twice); at most
MAX_HELD wait per peer, past which a request is rejected (the sender is told). A held
request waits until its `until` (the peer's `wait` after it came, or its own `deadline`
if sooner): then it is decided `expired` by the deadline and the sender told, as a deny.
"""
import errno
import math
import re
import time

import trio

from ...errors import Fs9Error
from ..bus import message
from ..bus.message import KEY, TOKEN
from ..names import one_line
from ..stream import Changes

ACTIONS = ("approve", "deny", "ask")
MAX_RULES = 32  # per peer
MAX_HELD = 100  # requests waiting for the operator, per peer
ANSWER_RE = re.compile(r"(approve|deny)(?:\s+(.*))?", re.S)


class Held:
    def __init__(self, e, data: bytes) -> None:
        d = e.data
        self.origin, self.id, self.to, self.reason = d["origin"], d["id"], d["to"], d["reason"]
        self.corr, self.data = e.corr or "", data
        # (held before requests had one: the default wait from when it came)
        self.until = d["until"] if "until" in d else e.ts + 3600

    def text(self) -> str:
        msg = message.load(self.data, 0)
        h = msg.headers
        preview = msg.body[:4096].decode(errors="replace")
        return (f"id={self.id}\nfrom={h['from']}\nto={self.to}\ncorr={self.corr}\n"
                f"classification={h['classification']}\npriority={h['priority']}\n"
                f"why={self.reason}\nuntil={message.format_time(self.until)}\n"
                f"answer=approve | deny [REASON]\n\n{preview}")


class Governance:
    def __init__(self, fed) -> None:
        self.fed, self.kernel = fed, fed.kernel
        self.rules: dict[str, list[tuple[str, dict[str, frozenset]]]] = {}
        self.held: dict[str, Held] = {}  # approval id (ORIGIN-ID) -> the request
        self.changes = Changes()  # one more held

    # --- the ctl's `rule` ---------------------------------------------------------

    def rule(self, osname: str, action: str, *terms: str) -> None:
        self.fed._peer(osname)
        if action == "clear" and not terms:
            return self.kernel.record("fed_rule", os=osname, clear=True)
        if action not in ACTIONS:
            raise Fs9Error(errno.EINVAL, f"bad rule action {action!r}: approve, deny, ask "
                                         "or clear")
        match = {}
        for term in terms:
            key, eq, values = term.partition("=")
            if not eq or not KEY.fullmatch(key) or key in match or \
                    not all(TOKEN.fullmatch(v) for v in values.split(",")):
                raise Fs9Error(errno.EINVAL, f"bad rule term {term[:80]!r}: KEY=V1,V2")
            match[key] = values.split(",")
        if len(self.rules.get(osname, [])) >= MAX_RULES:
            raise Fs9Error(errno.ENOSPC, f"{MAX_RULES} rules for {osname} already")
        self.kernel.record("fed_rule", os=osname, action=action, match=match)

    def rules_text(self, osname: str) -> str:
        return "".join(f"rule={action} " + " ".join(f"{k}={','.join(sorted(v))}"
                                                    for k, v in match.items()) + "\n"
                       for action, match in self.rules.get(osname, []))

    # --- judging ------------------------------------------------------------------

    def decide(self, peer, headers: dict[str, str]) -> tuple[str, str]:
        """(approve | deny | ask, why) for a work_request from peer."""
        if peer.auth == "delegated":
            return "approve", "delegated"
        if peer.auth == "independent":
            return "ask", f"{peer.name} is independent: its operator approves each request"
        for n, (action, match) in enumerate(self.rules.get(peer.name, [])):
            if all(headers.get(k) in values for k, values in match.items()):
                return action, f"policy rule {n + 1} for {peer.name}"
        return "ask", f"no policy rule for {peer.name} matches"

    def hold(self, origin: str, msg, corr: str, why: str) -> str | None:
        """Keep a request for the operator (None), or why it cannot wait."""
        if sum(1 for h in self.held.values() if h.origin == origin) >= MAX_HELD:
            return f"{MAX_HELD} requests from {origin} already wait for approval"
        until = time.time() + self.fed.peers[origin].wait
        if msg.deadline is not None:
            until = min(until, msg.deadline)
        self.kernel.record("fed_held", corr=corr, origin=origin, id=msg.id, to=msg.to,
                           reason=why, blob=msg.render(), until=until)
        return None

    async def keep_deadlines(self) -> None:
        """Decide each held request whose `until` passes unanswered: `expired`, the
        sender told as by a deny (a `rejected` result), both logged."""
        while True:
            version = self.changes.version
            now = time.time()
            for held in [h for h in self.held.values() if h.until <= now]:
                self._expire(held)
            soonest = min((h.until for h in self.held.values()), default=math.inf)
            with trio.move_on_after(max(soonest - time.time(), 0.05)):
                await self.changes.wait_past(version)

    def _expire(self, held: Held) -> None:
        reason = f"no answer from the operator of {self.fed.me} by " \
                 f"{message.format_time(held.until)}"
        self.kernel.record("fed_decided", corr=held.corr, origin=held.origin, id=held.id,
                           decision="expired", by="deadline", reason=reason)
        reply_to = message.load(held.data, 0).headers["from"]
        self.fed.inbox.reject(held.origin, held.id, reason, reply_to, held.corr)

    def answer(self, held: Held, data: bytes) -> None:
        """The operator's approve or deny [REASON] (federation/approvals/ID)."""
        m = ANSWER_RE.fullmatch(data.decode(errors="replace").strip())
        if m is None:
            raise Fs9Error(errno.EINVAL, "answer approve or deny [REASON]")
        if self.held.get(f"{held.origin}-{held.id}") is not held:
            raise Fs9Error(errno.ENOENT, "already answered")
        reason = one_line(m[2] or "")[:500]
        self.kernel.record("fed_decided", corr=held.corr, origin=held.origin, id=held.id,
                           decision=m[1], by="operator", reason=reason)
        inbox = self.fed.inbox
        msg = message.load(held.data, 0)
        reply_to = msg.headers["from"]
        if m[1] == "deny":
            return inbox.reject(held.origin, held.id, f"denied by the operator of "
                                f"{self.fed.me}" + (f": {reason}" if reason else ""),
                                reply_to, held.corr)
        recipient = self.kernel.bus.owner(held.to)
        if recipient is None or getattr(recipient, "killed", False):
            return inbox.reject(held.origin, held.id, f"no such agent: {held.to}@"
                                f"{self.fed.me}", reply_to, held.corr)
        inbox.deliver(held.origin, msg, recipient, {})

    # --- applying events ----------------------------------------------------------

    def appliers(self) -> dict:
        return {"fed_rule": self._on_rule, "fed_held": self._on_held,
                "fed_decided": self._on_decided}

    def _on_rule(self, e, agent, task):
        d = e.data
        if d.get("clear"):
            self.rules.pop(d["os"], None)
        else:
            self.rules.setdefault(d["os"], []).append(
                (d["action"], {k: frozenset(v) for k, v in d["match"].items()}))

    def _on_held(self, e, agent, task):
        held = Held(e, self.kernel.blob(e))
        self.held[f"{held.origin}-{held.id}"] = held
        self.fed.inbox.seen.add(f"{held.origin}/{held.id}")
        self.changes.bump()

    def _on_decided(self, e, agent, task):
        self.held.pop(f"{e.data['origin']}-{e.data['id']}", None)
