"""Federation: this fs9 as one member of a federation of independent fs9 systems.

Members exchange mail over NATS JetStream (engine.py), each keeping its own log as the
truth. Joining, peers and their terms are logged events, replayed at mount:
  fed_joined (url, os)  fed_left  fed_peer (os, ceiling, auth)  fed_paused / fed_resumed
Sending is transactional with the log (an outbox): writing a message to NAME@OS is a
`fed_queued` event, the sender task publishes it and logs `fed_sent` on JetStream's ack;
after a crash what was queued and not acked is published again (JetStream's Nats-Msg-Id
and the receiver's own record drop the repeat). Receiving is recorded before it is
acked (inbox.py). Large messages cross in chunks (chunks.py); the work requests this
OS sent, their state and callbacks are requests.py's; each OS's part of a correlation
id's trace goes to the OS that asked (trace.py).

The sender refuses at write(2) (EACCES) what exceeds the ceiling it declared for the
peer; the receiver trusts nothing beyond its peer's declaration (inbox.py).
"""
import errno
import json
import os
import re
import time

from ...errors import Fs9Error
from .. import cmd
from ..agents import registry
from ..bus import message
from ..names import NAME_RE, OPERATOR, OS_RE
from ..rate import Bucket
from ..stream import Changes
from . import credentials
from .chunks import HEADER as CHUNK_HEADER, MAX_CHUNKED
from .inbox import Inbox
from .outbox import Outbox
from .requests import callbacks
from .governance import Governance
from .sagas import Sagas
from .topics import Topics
from .trace import Traces

AUTH_MODES = ("delegated", "independent", "policy")
CMDS = (
    cmd.Cmd("join", "join", 3, 4, usage="join NATS_URL AS OSNAME [key=/ABS/PATH]"),
    cmd.Cmd("peer", "peer", 1, 5, usage="peer OS ceiling=CLASS auth=delegated|independent|"
                                        "policy rate=N wait=SECONDS"),
    cmd.Cmd("rule", "rule", 2, None, usage="rule OS approve|deny|ask KEY=V1,V2 ... | rule OS clear"),
    cmd.Cmd("pause", "pause", 1, 1, usage="pause OS"),
    cmd.Cmd("resume", "resume", 1, 1, usage="resume OS"),
    cmd.Cmd("leave", "leave", usage="leave"),
    cmd.Cmd("export", "export", 1, 1, usage="export TOPIC"),  # topics across OSs: topics.py
    cmd.Cmd("unexport", "unexport", 1, 1, usage="unexport TOPIC"),
    cmd.Cmd("subscribe", "subscribe", 2, 2, usage="subscribe OS TOPIC"),
    cmd.Cmd("unsubscribe", "unsubscribe", 2, 2, usage="unsubscribe OS TOPIC"),
)
BACKOFF_S = (0.2, 0.5, 1, 2, 5)  # between attempts to reach NATS
RATE = 200  # messages a second taken from one peer, by default (a burst of 5 s of it)
MAX_RATE = 100_000
FED_EXTENSION = "urn:fs9:federation"  # fs9's own fields of an OS's A2A card
MAX_SKILLS = 256  # of a peer's card read for registry/by-capability (and tags per skill)
STRANGERS_RATE = 20  # messages a second from all OSs that are no peer, together
WAIT_S = 3600  # how long we wait on a peer, by default: for the operator's answer to its
# held request, and for the rest of a large message's chunks
MAX_WAIT_S = 30 * 86400


class Peer:
    def __init__(self, name: str, ceiling: str, auth: str, rate: int = RATE,
                 wait: int = WAIT_S) -> None:
        self.name, self.ceiling, self.auth, self.rate = name, ceiling, auth, rate
        self.wait = wait
        # what it sends is taken at `rate`; past it, JetStream delivers it again later
        self.bucket = Bucket(rate, 5 * rate, time.monotonic())
        self.throttled = 0
        self.paused = False
        self.card: bytes | None = None  # as it last published it

    def status(self, queued: int) -> str:
        return (f"os={self.name}\nceiling={self.ceiling}\nauth={self.auth}\n"
                f"rate={self.rate}\nwait={self.wait}\nthrottled={self.throttled}\n"
                f"paused={'yes' if self.paused else 'no'}\nqueued={queued}\n"
                f"card={'yes' if self.card else 'no'}\n")


class Federation:
    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.url = self.me = ""  # joined when both are set
        self.key = ""  # the file holding our nkey's seed (credentials.py), if any
        self.peers: dict[str, Peer] = {}
        self.last_error = ""
        self.changes = Changes()  # joined, left, queued, a peer changed
        self.outbox = Outbox(kernel, self.changes)
        self.progress = Changes()  # a request or a saga moved (sagas.py)
        self.inbox = Inbox(self)
        self.sagas = Sagas(self, self.progress)
        self.governance = Governance(self)
        self.requests = self.inbox.requests
        self.traces = Traces(self)
        self.topics = Topics(self)
        self.engine = None  # link.py's, while joined
        self.strangers = Bucket(STRANGERS_RATE, 5 * STRANGERS_RATE, time.monotonic())

    @property
    def state(self) -> str:
        if not self.url:
            return "off"
        return "connected" if self.engine is not None and self.engine.connected \
            else "connecting"

    # --- the ctl ---------------------------------------------------------------

    def ctl(self, data: bytes) -> None:
        for p in cmd.parse(CMDS, data):
            getattr(self, f"_cmd_{p.cmd.method}")(*p.args)

    def _cmd_join(self, url: str, as_: str, name: str, key: str = "") -> None:
        if as_ != "AS" and as_ != "as":
            raise Fs9Error(errno.EINVAL, "usage: join NATS_URL AS OSNAME [key=/ABS/PATH]")
        if key and not key.startswith("key="):
            raise Fs9Error(errno.EINVAL, f"bad term {key!r}: key=/ABS/PATH of the nkey's seed")
        if not re.fullmatch(r"(nats|tls)://[A-Za-z0-9.:_\[\]-]+", url):
            raise Fs9Error(errno.EINVAL, f"bad NATS URL {url!r}: nats://HOST:PORT")
        if not OS_RE.fullmatch(name):
            raise Fs9Error(errno.EINVAL, f"bad OS name {name!r}: letters, digits, _ and -")
        if self.url and self.me != name:
            raise Fs9Error(errno.EBUSY, f"joined as {self.me}: leave first")
        key = key.removeprefix("key=")
        if key:  # checked now, so a wrong one fails the write; read again at each connect
            credentials.read_seed(key)
        self.kernel.record("fed_joined", url=url, os=name, key=key)

    def _cmd_peer(self, name: str, *terms: str) -> None:
        if not OS_RE.fullmatch(name) or name == self.me:
            raise Fs9Error(errno.EINVAL, f"bad peer OS name {name!r}")
        old = self.peers.get(name)
        kv = dict(ceiling=old.ceiling if old else "public",
                  auth=old.auth if old else "delegated", rate=str(old.rate if old else RATE),
                  wait=str(old.wait if old else WAIT_S))
        for term in terms:
            key, eq, value = term.partition("=")
            if not eq or key not in kv:
                raise Fs9Error(errno.EINVAL, f"bad term {term!r}: ceiling=CLASS auth=MODE rate=N "
                                             "wait=SECONDS")
            kv[key] = value
        if kv["ceiling"] not in message.CLASSIFICATIONS:
            raise Fs9Error(errno.EINVAL, f"bad ceiling {kv['ceiling']!r}: one of "
                                         f"{', '.join(message.CLASSIFICATIONS)}")
        if kv["auth"] not in AUTH_MODES:
            raise Fs9Error(errno.EINVAL, f"bad auth {kv['auth']!r}: one of {', '.join(AUTH_MODES)}")
        if not kv["rate"].isdigit() or not 1 <= int(kv["rate"]) <= MAX_RATE:
            raise Fs9Error(errno.EINVAL, f"bad rate {kv['rate']!r}: messages a second, 1 to "
                                         f"{MAX_RATE}")
        if not kv["wait"].isdigit() or not 1 <= int(kv["wait"]) <= MAX_WAIT_S:
            raise Fs9Error(errno.EINVAL, f"bad wait {kv['wait']!r}: seconds, 1 to {MAX_WAIT_S}")
        self.kernel.record("fed_peer", os=name, **{**kv, "rate": int(kv["rate"]),
                                                   "wait": int(kv["wait"])})

    def _cmd_rule(self, name: str, action: str, *terms: str) -> None:
        self.governance.rule(name, action, *terms)

    def _cmd_pause(self, name: str) -> None:
        self._peer(name)
        self.kernel.record("fed_paused", os=name)

    def _cmd_resume(self, name: str) -> None:
        self._peer(name)
        self.kernel.record("fed_resumed", os=name)

    def _cmd_leave(self) -> None:
        if not self.url:
            raise Fs9Error(errno.EINVAL, "not joined")
        self.kernel.record("fed_left", os=self.me)

    def _cmd_export(self, topic: str) -> None:
        self.topics.export(topic)

    def _cmd_unexport(self, topic: str) -> None:
        self.topics.unexport(topic)

    def _cmd_subscribe(self, name: str, topic: str) -> None:
        self.topics.subscribe(name, topic)

    def _cmd_unsubscribe(self, name: str, topic: str) -> None:
        self.topics.unsubscribe(name, topic)

    def _peer(self, name: str) -> Peer:
        peer = self.peers.get(name)
        if peer is None:
            raise Fs9Error(errno.ENOENT, f"no such peer: {name} (declare it: peer {name} ...)")
        return peer

    # --- what it shows ---------------------------------------------------------

    def state_line(self) -> str:
        return f"os={self.me or '-'} url={self.url or '-'} connection={self.state}\n"

    def status(self) -> str:
        lines = [f"os={self.me or '-'}", f"url={self.url or '-'}", f"connection={self.state}",
                 f"key={self.key or 'none'}",
                 f"peers={' '.join(sorted(self.peers)) or '-'}", f"outbox={len(self.outbox)}",
                 f"dead={self.outbox.died}", f"sent={self.outbox.sent}",
                 f"approvals={len(self.governance.held)}",
                 *(f"{k}={v}" for k, v in self.inbox.counts.items()),
                 f"last_error={self._last_error() or '-'}"]
        return "\n".join(lines) + "\n"

    def _last_error(self) -> str:
        if self.state == "connecting" and self.engine is not None and self.engine.error:
            return f"cannot reach {self.url}: {self.engine.error}"
        return self.last_error

    def peer_status(self, peer: Peer) -> str:
        return peer.status(self.outbox.queued_for(peer.name)) + \
            self.governance.rules_text(peer.name)

    def card(self) -> dict:
        """This OS's card: an A2A AgentCard of the agents' cards' shape (registry.a2a_card):
        a skill per capability the agents' manifests provide (tagged with the agents), and
        fs9's own fields (accepts, sla, ceiling, auth) as the A2A extension FED_EXTENSION."""
        agents = self.kernel.agents
        skills = [{"id": cap, "name": cap, "description": f"{cap}: provided by "
                   + ", ".join(names), "tags": names}
                  for cap, names in sorted(registry.providers(agents).items())]
        accepts = sorted({kind for a in agents.values()
                          for kind in a.manifest.get("accepts", ["work_request"])})
        own = {"accepts": accepts,
               "sla": {n: a.manifest["sla"] for n, a in sorted(agents.items())
                       if "sla" in a.manifest},
               "ceiling": {p.name: p.ceiling for p in self.peers.values()},
               "auth": {p.name: p.auth for p in self.peers.values()},
               "topics": sorted(self.topics.exports)}
        return registry.a2a_card(
            self.me, f"fs9 member {self.me}", f"nats:fs9.fed.{self.me}", "fs9-federation",
            skills, [{"uri": FED_EXTENSION, "required": False, "params": own,
                      "description": "fs9: message types accepted, each agent's sla, "
                                     "each declared peer's ceiling and auth, the topics "
                                     "it exports"}])

    def remote_providers(self) -> dict[str, list[str]]:
        """capability -> AGENT@OS, from each peer's card as it published it (untrusted:
        only skills whose id and tags are names count, MAX_SKILLS per card)."""
        caps: dict[str, list[str]] = {}
        for peer in sorted(self.peers.values(), key=lambda p: p.name):
            try:
                skills = json.loads(peer.card or b"{}").get("skills", [])
            except (ValueError, AttributeError, RecursionError):  # (a card nested deep)
                continue
            if not isinstance(skills, list):
                continue
            for skill in skills[:MAX_SKILLS]:
                cap = skill.get("id") if isinstance(skill, dict) else None
                tags = skill.get("tags") if isinstance(skill, dict) else None
                if not isinstance(cap, str) or not NAME_RE.fullmatch(cap) or \
                        not isinstance(tags, list):
                    continue
                caps.setdefault(cap, []).extend(
                    f"{t}@{peer.name}" for t in tags[:MAX_SKILLS]
                    if isinstance(t, str) and NAME_RE.fullmatch(t))
        return caps

    def card_text(self) -> str:
        return json.dumps(self.card(), indent=2, sort_keys=True) + "\n"

    # --- sending ---------------------------------------------------------------

    def address(self, to: str) -> Peer:
        """The peer that AGENT@OS names: ENOENT for what names no agent of a declared peer
        (as any name nobody has), ENOTCONN when this OS is in no federation."""
        name, at, osname = to.partition("@")
        if not at or not NAME_RE.fullmatch(name) or osname not in self.peers:
            raise Fs9Error(errno.ENOENT, f"no such peer agent: {to!r} (AGENT@OS of a peer "
                                         "declared in federation/ctl)")
        if not self.url:
            raise Fs9Error(errno.ENOTCONN, "not in a federation (federation/ctl: join ...)")
        return self.peers[osname]

    def check(self, to: str, data: bytes, sender: str) -> tuple[message.Message, Peer]:
        """What a send to `to` (AGENT@OS) checks that changes nothing; Fs9Error naming
        the first problem: the address (`address`), the federate pledge, what the sender
        may not say (the bus's rules for local mail), a label above the peer's ceiling."""
        peer = self.address(to)
        bus, author = self.kernel.bus, self.kernel.agents.get(sender)
        if author is not None and "federate" not in author.view.pledges:
            raise Fs9Error(errno.EACCES, f"agent {sender} did not pledge 'federate'")
        floor = author.manifest["clearance"] if author is not None else "internal"
        msg = message.parse(data, to=to, sender=f"{sender}@{self.me}", label=floor)
        if author is not None:
            bus._check_author(author, msg, floor)
        level = msg.headers["classification"]
        if not message.clearance_allows(peer.ceiling, level):
            raise Fs9Error(errno.EACCES, f"{peer.name} accepts up to {peer.ceiling} from us, "
                                         f"the message is {level}")
        callbacks(self.kernel, sender, msg.headers)
        return msg, peer

    def precheck(self, to: str, data: bytes, sender: str) -> None:
        if b"\n\n" in data:
            self.kernel.bus.approved(to, self.check(to, data, sender)[0], sender, use=False)

    def send(self, to: str, data: bytes, sender: str = OPERATOR) -> None:
        """Queue one message to NAME@OS: logged (fed_queued) before this returns."""
        msg, peer = self.check(to, data, sender)
        author = self.kernel.agents.get(sender)
        if author is not None:  # as local mail: its rate, and its share of the outbox
            self.outbox.room(sender, len(data))
            self.kernel.rates.take(sender, "mail", len(data), time.monotonic())
        self.kernel.bus.approved(to, msg, sender, use=True)  # (approval.mail_above)
        msg.headers["id"] = os.urandom(8).hex()
        corr = msg.headers.setdefault("correlation-id", msg.id)
        level = msg.headers["classification"]
        if author is not None and level != author.manifest["clearance"] and \
                not message.clearance_allows(level, author.manifest["clearance"]):
            self.kernel.log.append("declassified", agent=sender, corr=corr, id=msg.id, to=to,
                                   **{"from": author.manifest["clearance"], "to_label": level})
        self.kernel.record("fed_queued", agent=author and sender, corr=corr, blob=msg.render(),
                           id=msg.id, to=to, os=peer.name, classification=level,
                           deadline=msg.deadline,
                           type=msg.headers["type"], **callbacks(self.kernel, sender, msg.headers))

    def forward(self, msg: message.Message) -> None:
        """What the kernel composed for AGENT@OS (the result or progress of a task made
        from that OS's work_request): queued like any cross-OS message, from AGENT@US,
        if the peer's ceiling takes its label; otherwise withheld (`delivery_refused`)."""
        h = msg.headers
        peer = self.peers.get(msg.to.partition("@")[2])
        reason = None
        if peer is None or not self.url:
            reason = f"{msg.to}: not an agent of a peer in a joined federation"
        elif not message.clearance_allows(peer.ceiling, h["classification"]):
            reason = (f"{peer.name} accepts up to {peer.ceiling} from us, the message is "
                      f"{h['classification']}")
        elif len(msg.body) > MAX_CHUNKED - 4096:
            reason = f"over {MAX_CHUNKED} bytes (the task's out keeps it)"
        if reason is not None:
            self.kernel.log.append("delivery_refused", agent=msg.to, sender=h["from"],
                                   corr=h["correlation-id"], type=h["type"], reason=reason)
            return
        h["from"] = f"{h['from']}@{self.me}"
        h["x-seq"] = str(self.kernel.log.next_seq)  # answers in order (requests.py)
        self.kernel.record("fed_queued", corr=h["correlation-id"], blob=msg.render(),
                           id=msg.id, to=msg.to, os=peer.name, classification=h["classification"],
                           type=h["type"], deadline=msg.deadline)
        if h["type"] == "result":  # the request answered: our part of its trace with it
            self.traces.ship(peer.name, h["correlation-id"])

    # --- receiving (inbox.py) -------------------------------------------------

    def receive(self, origin: str, data: bytes, headers: dict | None = None) -> None:
        value = (headers or {}).get(CHUNK_HEADER)
        if value is not None:
            return self.inbox.receive_chunk(origin, value, data)
        self.inbox.receive(origin, data)

    def received(self, e) -> None:
        self.inbox.received(e)

    def admit(self, origin: str) -> bool:
        """May one more message from origin be taken now (its peer's rate; the OSs that
        are no peer share one small rate: each of their messages is a rejection logged)?"""
        peer = self.peers.get(origin)
        bucket = peer.bucket if peer is not None else self.strangers
        if bucket.take(1, time.monotonic()):
            return True
        if peer is not None:
            peer.throttled += 1
        return False

    # --- applying events -------------------------------------------------------

    def appliers(self) -> dict:
        return {"fed_joined": self._on_joined, "fed_left": self._on_left,
                "fed_peer": self._on_peer, "fed_paused": self._on_paused,
                "fed_resumed": self._on_resumed, **self.inbox.appliers(),
                **self.sagas.appliers(), **self.governance.appliers(),
                **self.traces.appliers(), **self.topics.appliers(),
                **self.outbox.appliers(self.requests)}

    def _on_joined(self, e, agent, task):
        self.url, self.me = e.data["url"], e.data["os"]
        self.key = e.data.get("key", "")
        self.changes.bump()

    def _on_left(self, e, agent, task):
        self.url = ""  # (the peers and what waits in the outbox stay, for a join again)
        self.changes.bump()

    def _on_peer(self, e, agent, task):
        old = self.peers.get(e.data["os"])
        peer = self.peers[e.data["os"]] = Peer(e.data["os"], e.data["ceiling"], e.data["auth"],
                                               e.data.get("rate", RATE),
                                               e.data.get("wait", WAIT_S))
        if old is not None:
            peer.paused, peer.card = old.paused, old.card
        self.changes.bump()

    def _on_paused(self, e, agent, task):
        self.peers[e.data["os"]].paused = True

    def _on_resumed(self, e, agent, task):
        self.peers[e.data["os"]].paused = False
        self.changes.bump()
