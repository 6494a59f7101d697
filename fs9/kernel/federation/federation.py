"""Federation: this fs9 as one member of a federation of independent fs9 systems.

Members exchange mail over NATS JetStream (engine.py), each keeping its own log as the
truth. Joining, peers and their terms are logged events, replayed at mount:
  fed_joined (url, os)  fed_left  fed_peer (os, ceiling, auth)  fed_paused / fed_resumed
Sending is transactional with the log (an outbox): writing a message to NAME@OS is a
`fed_queued` event, the sender task publishes it and logs `fed_sent` on JetStream's ack;
after a crash what was queued and not acked is published again (JetStream's Nats-Msg-Id
and the receiver's own record drop the repeat). Receiving is recorded before it is
acked (an inbox): a message from peer P becomes a `mail_sent` event carrying
`fed=P/ID`, the receiver's record that it was processed, so a redelivery (also after
NATS's dedupe window) is acked and not delivered again; a message refused is a
`fed_rejected` event, recorded the same way.

At the boundary nothing the remote wrote is trusted beyond its peer's declaration: the
origin OS is the subject's, set by its publisher (bind it with per-member NATS
credentials, see docs/namespace.md); it must be a declared peer; `from` must name an
agent of that OS; the classification must be within the ceiling declared for it and
the recipient's clearance. The sender refuses at write(2) (EACCES) what exceeds the
ceiling it declared for the peer.
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
from ..names import NAME_RE, OPERATOR
from ..stream import Changes
from .outbox import Outbox

OS_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # one NATS subject token
AUTH_MODES = ("delegated", "independent", "policy")
# what the sending kernel stamped, and a reply-to this OS would route by (replies go to
# `from`): not taken from a remote. The other stamped keys (x-status...) it may not say:
# message.parse refuses them, so the message is rejected.
NOT_TAKEN = ("id", "from", "date", "reply-to")
# what the peer's kernel stamps on a task's result and progress (its agents cannot)
RESULT_STAMPS = ("x-task", "x-status", "x-exit")
RESULT_TYPES = ("result", "status_update")
STAMP_RE = re.compile(r"-?[A-Za-z0-9_]{1,32}")
CMDS = (
    cmd.Cmd("join", "join", 3, 3, usage="join NATS_URL AS OSNAME"),
    cmd.Cmd("peer", "peer", 1, 3, usage="peer OS ceiling=CLASS auth=delegated|independent|policy"),
    cmd.Cmd("pause", "pause", 1, 1, usage="pause OS"),
    cmd.Cmd("resume", "resume", 1, 1, usage="resume OS"),
    cmd.Cmd("leave", "leave", usage="leave"),
)
BACKOFF_S = (0.2, 0.5, 1, 2, 5)  # between attempts to reach NATS


class Peer:
    def __init__(self, name: str, ceiling: str, auth: str) -> None:
        self.name, self.ceiling, self.auth = name, ceiling, auth
        self.paused = False
        self.card: bytes | None = None  # as it last published it

    def status(self, queued: int) -> str:
        return (f"os={self.name}\nceiling={self.ceiling}\nauth={self.auth}\n"
                f"paused={'yes' if self.paused else 'no'}\nqueued={queued}\n"
                f"card={'yes' if self.card else 'no'}\n")


class Federation:
    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.url = self.me = ""  # joined when both are set
        self.peers: dict[str, Peer] = {}
        self.seen: set[str] = set()  # ORIGIN/ID of every message received (delivered or not)
        self.counts = dict(received=0, rejected=0, duplicates=0)
        self.last_error = ""
        self.changes = Changes()  # joined, left, queued, a peer changed
        self.outbox = Outbox(kernel, self.changes)
        self.engine = None  # link.py's, while joined

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

    def _cmd_join(self, url: str, as_: str, name: str) -> None:
        if as_ != "AS" and as_ != "as":
            raise Fs9Error(errno.EINVAL, "usage: join NATS_URL AS OSNAME")
        if not re.fullmatch(r"(nats|tls)://[A-Za-z0-9.:_\[\]-]+", url):
            raise Fs9Error(errno.EINVAL, f"bad NATS URL {url!r}: nats://HOST:PORT")
        if not OS_RE.fullmatch(name):
            raise Fs9Error(errno.EINVAL, f"bad OS name {name!r}: letters, digits, _ and -")
        if self.url and self.me != name:
            raise Fs9Error(errno.EBUSY, f"joined as {self.me}: leave first")
        self.kernel.record("fed_joined", url=url, os=name)

    def _cmd_peer(self, name: str, *terms: str) -> None:
        if not OS_RE.fullmatch(name) or name == self.me:
            raise Fs9Error(errno.EINVAL, f"bad peer OS name {name!r}")
        old = self.peers.get(name)
        kv = dict(ceiling=old.ceiling if old else "public",
                  auth=old.auth if old else "delegated")
        for term in terms:
            key, eq, value = term.partition("=")
            if not eq or key not in kv:
                raise Fs9Error(errno.EINVAL, f"bad term {term!r}: ceiling=CLASS auth=MODE")
            kv[key] = value
        if kv["ceiling"] not in message.CLASSIFICATIONS:
            raise Fs9Error(errno.EINVAL, f"bad ceiling {kv['ceiling']!r}: one of "
                                         f"{', '.join(message.CLASSIFICATIONS)}")
        if kv["auth"] not in AUTH_MODES:
            raise Fs9Error(errno.EINVAL, f"bad auth {kv['auth']!r}: one of {', '.join(AUTH_MODES)}")
        self.kernel.record("fed_peer", os=name, **kv)

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
                 f"peers={' '.join(sorted(self.peers)) or '-'}", f"outbox={len(self.outbox)}",
                 f"dead={len(self.outbox.dead)}", f"sent={self.outbox.sent}",
                 *(f"{k}={v}" for k, v in self.counts.items()),
                 f"last_error={self._last_error() or '-'}"]
        return "\n".join(lines) + "\n"

    def _last_error(self) -> str:
        if self.state == "connecting" and self.engine is not None and self.engine.error:
            return f"cannot reach {self.url}: {self.engine.error}"
        return self.last_error

    def peer_status(self, peer: Peer) -> str:
        return peer.status(self.outbox.queued_for(peer.name))

    def card(self) -> dict:
        """This OS's card: A2A's field names (name, description, version, capabilities,
        skills) and fs9's own (accepts, sla, ceiling, auth), from the agents' manifests
        and the peers declared."""
        agents = self.kernel.agents
        skills = [{"id": cap, "name": cap, "description": f"{cap}: provided by "
                   + ", ".join(names), "tags": names}
                  for cap, names in sorted(registry.providers(agents).items())]
        accepts = sorted({kind for a in agents.values()
                          for kind in a.manifest.get("accepts", ["work_request"])})
        return {"name": self.me, "description": f"fs9 member {self.me}",
                "version": "0.1.0", "capabilities": {"streaming": False,
                                                     "pushNotifications": False},
                "skills": skills, "accepts": accepts,
                "sla": {n: a.manifest["sla"] for n, a in sorted(agents.items())
                        if "sla" in a.manifest},
                "ceiling": {p.name: p.ceiling for p in self.peers.values()},
                "auth": {p.name: p.auth for p in self.peers.values()}}

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
        return msg, peer

    def precheck(self, to: str, data: bytes, sender: str) -> None:
        if b"\n\n" in data:
            self.kernel.bus.approved(to, self.check(to, data, sender)[0], sender, use=False)

    def send(self, to: str, data: bytes, sender: str = OPERATOR) -> None:
        """Queue one message to NAME@OS: logged (fed_queued) before this returns."""
        msg, peer = self.check(to, data, sender)
        self.kernel.bus.approved(to, msg, sender, use=True)  # (approval.mail_above)
        msg.headers["id"] = os.urandom(8).hex()
        corr = msg.headers.setdefault("correlation-id", msg.id)
        author = self.kernel.agents.get(sender)
        level = msg.headers["classification"]
        if author is not None and level != author.manifest["clearance"] and \
                not message.clearance_allows(level, author.manifest["clearance"]):
            self.kernel.log.append("declassified", agent=sender, corr=corr, id=msg.id, to=to,
                                   **{"from": author.manifest["clearance"], "to_label": level})
        self.kernel.record("fed_queued", agent=author and sender, corr=corr, blob=msg.render(),
                           id=msg.id, to=to, os=peer.name, classification=level)

    def _reject(self, origin: str, msg_id: str, reason: str, reply_to: str | None = None,
                corr: str | None = None) -> None:
        """Refuse a received message: a fed_rejected event (so a redelivery is not judged
        again), and, to a declared peer's sender, a `rejected` result (never to another
        OS's federation itself: two refusing each other's notes would never end)."""
        self.kernel.record("fed_rejected", corr=corr, origin=origin, id=msg_id, reason=reason)
        if reply_to is None or reply_to.startswith("federation@"):
            return
        note = message.Message(to=reply_to, body=f"rejected: {reason}\n".encode(), headers={
            "id": os.urandom(8).hex(), "from": f"federation@{self.me}", "to": reply_to,
            "date": message.format_time(time.time()),
            "type": "result", "priority": "normal", "classification": "public",
            "correlation-id": corr or msg_id})
        self.kernel.record("fed_queued", corr=note.headers["correlation-id"],
                           blob=note.render(), id=note.id, to=reply_to, os=origin,
                           classification="public")

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
        if reason is not None:
            self.kernel.log.append("delivery_refused", agent=msg.to, sender=h["from"],
                                   corr=h["correlation-id"], type=h["type"], reason=reason)
            return
        h["from"] = f"{h['from']}@{self.me}"
        self.kernel.record("fed_queued", corr=h["correlation-id"], blob=msg.render(),
                           id=msg.id, to=msg.to, os=peer.name, classification=h["classification"])

    # --- receiving -------------------------------------------------------------

    def receive(self, origin: str, data: bytes) -> None:
        """Judge and record one message from OS `origin` (the subject's): delivered to
        a local mailbox (mail_sent with fed=ORIGIN/ID) or rejected (fed_rejected)."""
        head, _, body = data.partition(b"\n\n")
        try:
            headers = dict(line.split(": ", 1) for line in head.decode().split("\n"))
        except (UnicodeDecodeError, ValueError):
            headers = {}
        msg_id = headers.get("id", "")
        if not re.fullmatch(r"[0-9a-f]{16}", msg_id):
            msg_id = f"bad-{os.urandom(8).hex()}"  # unreadable: logged once
        if f"{origin}/{msg_id}" in self.seen:
            self.counts["duplicates"] += 1
            return
        peer = self.peers.get(origin)
        if peer is None:
            return self._reject(origin, msg_id, f"{origin} is not a declared peer")
        sender, _, from_os = headers.get("from", "").partition("@")
        if from_os != origin or not NAME_RE.fullmatch(sender):
            return self._reject(origin, msg_id, f"from {headers.get('from', '')!r} is not "
                                f"an agent of {origin}")
        reply_to, corr = f"{sender}@{origin}", headers.get("correlation-id")
        to, _, to_os = headers.get("to", "").partition("@")
        if to_os != self.me:
            return self._reject(origin, msg_id, f"to {headers.get('to', '')!r} is not "
                                f"an agent of {self.me}", reply_to, corr)
        stamps = {k: headers[k] for k in RESULT_STAMPS if k in headers} \
            if headers.get("type") in RESULT_TYPES else {}
        if not all(STAMP_RE.fullmatch(v) for v in stamps.values()):
            return self._reject(origin, msg_id, f"bad result headers {stamps}"[:300],
                                reply_to, corr)
        written = "".join(f"{k}: {v}\n" for k, v in headers.items()
                          if k not in NOT_TAKEN and k not in stamps).encode()
        try:  # as if written here, but the label is never lowered: none stated is the top
            msg = message.parse(written + b"\n" + body, to=f"{to}@{self.me}", sender=reply_to,
                                label=message.CLASSIFICATIONS[-1])
        except Fs9Error as e:
            return self._reject(origin, msg_id, e.text, reply_to, corr)
        level = msg.headers["classification"]
        if not message.clearance_allows(peer.ceiling, level):
            return self._reject(origin, msg_id, f"{self.me} accepts up to {peer.ceiling} "
                                f"from {origin}, the message is {level}", reply_to, corr)
        recipient = self.kernel.bus.owner(to)
        if recipient is None or getattr(recipient, "killed", False):
            return self._reject(origin, msg_id, f"no such agent: {to}@{self.me}",
                                reply_to, corr)
        if not message.clearance_allows(recipient.manifest["clearance"], level):
            return self._reject(origin, msg_id, f"{to} is cleared for "
                                f"{recipient.manifest['clearance']}, the message is {level}",
                                reply_to, corr)
        msg.headers.update(id=msg_id, to=to, **stamps)
        msg.to = to
        corr = msg.headers.setdefault("correlation-id", msg_id)
        self.kernel.record("mail_sent", agent=to, corr=corr, blob=msg.render(), id=msg_id,
                           sender=reply_to, type=msg.headers["type"],
                           priority=msg.headers["priority"], classification=level,
                           fed=f"{origin}/{msg_id}")
        if msg.headers["type"] == "work_request" and recipient is not self.kernel.bus.operator \
                and not recipient.daemon:
            # request/response as for local mail: a task, its result back to the sender
            stored = recipient.mailbox.get(msg_id)
            self.kernel.submit(recipient, msg.body, corr=corr, request=msg_id,
                               reply_to=reply_to)
            self.kernel.bus.ack(recipient, stored.name)

    def received(self, fed: str) -> None:
        """The bus applied a mail_sent that came through the federation (its record)."""
        self.seen.add(fed)
        self.counts["received"] += 1

    # --- applying events -------------------------------------------------------

    def appliers(self) -> dict:
        return {"fed_joined": self._on_joined, "fed_left": self._on_left,
                "fed_peer": self._on_peer, "fed_paused": self._on_paused,
                "fed_resumed": self._on_resumed, "fed_rejected": self._on_rejected,
                **self.outbox.appliers()}

    def _on_joined(self, e, agent, task):
        self.url, self.me = e.data["url"], e.data["os"]
        self.changes.bump()

    def _on_left(self, e, agent, task):
        self.url = ""  # (the peers and what waits in the outbox stay, for a join again)
        self.changes.bump()

    def _on_peer(self, e, agent, task):
        old = self.peers.get(e.data["os"])
        peer = self.peers[e.data["os"]] = Peer(e.data["os"], e.data["ceiling"], e.data["auth"])
        if old is not None:
            peer.paused, peer.card = old.paused, old.card
        self.changes.bump()

    def _on_paused(self, e, agent, task):
        self.peers[e.data["os"]].paused = True

    def _on_resumed(self, e, agent, task):
        self.peers[e.data["os"]].paused = False
        self.changes.bump()

    def _on_rejected(self, e, agent, task):
        self.seen.add(f"{e.data['origin']}/{e.data['id']}")
        self.counts["rejected"] += 1
