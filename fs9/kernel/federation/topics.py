"""Topics across OSs: event-driven coordination between members (docs/namespace.md,
"Federation", "Topics across OSs").

A member offers a local topic to its peers (`export TOPIC`, listed in its card); a peer
asks for it (`subscribe OS TOPIC`), and from then on each event published on the topic,
by whichever local agent, is sent to each subscribed peer whose ceiling takes the
event's label; it arrives there on the topic `TOPIC@OS` (a local topic only the
federation writes), where agents read it as any topic or get it as `type: event` mail
(manifest `subscribe = ["TOPIC@OS"]`). The publishing agent does not know who listens;
the publishing OS does (which peers subscribed), because the ceiling it declared for
each peer can only be honoured by the OS that holds the event: an event above a peer's
ceiling is never sent to it (`delivery_refused`).

Each event to a peer is one cross-OS message of the outbox (`fed_queued`, from
`federation@US` to `federation@PEER`, headers HEADER = the topic, `x-fed-publisher`),
so it has the outbox's durability: published again after a crash until JetStream acks
it. The receiver records it (a `published` event with `fed=ORIGIN/ID` on the topic
TOPIC@ORIGIN, and the durable subscribers' mail, in one commit) before NATS is acked,
so a redelivery is dropped (the inbox's record) and nothing acked is lost.

Subscribing is itself a pair of messages between the two federations: SUB_HEADER
`subscribe` / `unsubscribe` (subscriber to publisher), `active` / `refused` (the answer).
Their records: fed_subscribe / fed_unsubscribe (os, topic) and fed_subscription (origin,
id, topic, state, reason) on the subscriber, fed_subscriber (origin, id, topic, state)
on the publisher; fed_exported / fed_unexported (topic).

Nothing a peer wrote is trusted: the topic an event lands on is named by the NATS
subject's origin and a subscription of ours to it (a peer cannot publish into a topic
we did not subscribe to at that peer, nor as another OS); its label is what it states
(none: confidential) and within our ceiling for the peer; its size is a topic event's;
the publisher's name is a name. Bounded: MAX_EXPORTS, MAX_SUBS per peer, MAX_BEHIND
events for one peer in our outbox, and what each mirror topic keeps (topic.py).
"""
import errno
import os
import time
from dataclasses import dataclass

from ...errors import Fs9Error
from ..bus import message
from ..bus.bus import SUBSCRIPTIONS
from ..bus.topic import MAX_EVENT
from ..names import NAME_RE, one_line

HEADER = "x-fed-topic"  # the topic an event (or a subscription's note) is about
SUB_HEADER = "x-fed-sub"  # a subscription's note: subscribe|unsubscribe|active|refused
PUBLISHER = "x-fed-publisher"  # who published the event on its OS (a name, shown only)
MAX_EXPORTS = 64  # topics this OS offers
MAX_SUBS = 64  # topics this OS subscribes to at one peer
MAX_BEHIND = 10_000  # events for one peer waiting in our outbox; past it, withheld (NATS
# away or the stream full for long: the outbox would otherwise grow with the publish rate)


def mirror(topic: str, osname: str) -> str:
    """The local topic a peer's exported topic arrives on."""
    return f"{topic}@{osname}"


@dataclass
class Subscription:
    state: str  # requested (asked, no answer yet), active, refused
    reason: str = ""
    received: int = 0


class Topics:
    def __init__(self, fed) -> None:
        self.fed, self.kernel = fed, fed.kernel
        self.exports: set[str] = set()
        self.subscribers: dict[str, set[str]] = {}  # our topic -> peers subscribed to it
        self.subscriptions: dict[tuple[str, str], Subscription] = {}  # (os, topic) ->
        self.withheld = 0  # events not sent to a subscribed peer since the mount (its
        # ceiling, or behind): each is a delivery_refused in the log, which is the record

    # --- the ctl (federation.py) ---------------------------------------------

    def export(self, topic: str) -> None:
        if not NAME_RE.fullmatch(topic):
            raise Fs9Error(errno.EINVAL, f"bad topic name {topic!r}: letters, digits, _ . -")
        if topic in self.exports:
            return
        if len(self.exports) >= MAX_EXPORTS:
            raise Fs9Error(errno.ENOSPC, f"{MAX_EXPORTS} topics exported already")
        self.kernel.bus.create_topic(topic)
        self.kernel.record("fed_exported", topic=topic)

    def unexport(self, topic: str) -> None:
        if topic not in self.exports:
            raise Fs9Error(errno.ENOENT, f"topic {topic!r} is not exported")
        self.kernel.record("fed_unexported", topic=topic)

    def subscribe(self, osname: str, topic: str) -> None:
        self.fed._peer(osname)
        if not NAME_RE.fullmatch(topic):
            raise Fs9Error(errno.EINVAL, f"bad topic name {topic!r}: letters, digits, _ . -")
        if not self.fed.url:
            raise Fs9Error(errno.ENOTCONN, "not in a federation (federation/ctl: join ...)")
        sub = self.subscriptions.get((osname, topic))
        if sub is not None and sub.state != "refused":
            raise Fs9Error(errno.EEXIST, f"subscribed to {mirror(topic, osname)} already")
        if sub is None and sum(1 for o, _ in self.subscriptions if o == osname) >= MAX_SUBS:
            raise Fs9Error(errno.ENOSPC, f"{MAX_SUBS} topics of {osname} subscribed already")
        items = [] if mirror(topic, osname) in self.kernel.bus.topics else \
            [("topic_created", dict(topic=mirror(topic, osname)))]
        self.kernel.record_many(items + [("fed_subscribe", dict(os=osname, topic=topic)),
                                         self._note(osname, "subscribe", topic)])

    def unsubscribe(self, osname: str, topic: str) -> None:
        if (osname, topic) not in self.subscriptions:
            raise Fs9Error(errno.ENOENT, f"not subscribed to {mirror(topic, osname)}")
        self.kernel.record_many([("fed_unsubscribe", dict(os=osname, topic=topic)),
                                 self._note(osname, "unsubscribe", topic)])

    def _note(self, osname: str, verb: str, topic: str, text: str = "") -> tuple[str, dict]:
        """A subscription's note from our federation to the peer's (a fed_queued record)."""
        kind, fields = self._queued(osname, topic, (text + "\n").encode(), "public",
                                    **{SUB_HEADER: verb})
        return kind, dict(fields, note=verb)

    def _queued(self, osname: str, topic: str, body: bytes, label: str,
                **extra: str) -> tuple[str, dict]:
        me, to = self.fed.me, f"federation@{osname}"
        msg = message.Message(to=to, body=body, headers={
            "id": os.urandom(8).hex(), "from": f"federation@{me}", "to": to,
            "date": message.format_time(time.time()), "type": "event", "priority": "normal",
            "classification": label, HEADER: topic, **extra})
        msg.headers["correlation-id"] = msg.id
        return ("fed_queued", dict(corr=msg.id, blob=msg.render(), id=msg.id, to=to,
                                   os=osname, classification=label, type="event",
                                   deadline=None, topic=topic))

    # --- publishing (bus.publish, after its own record) -------------------------

    def fan_out(self, topic: str, data: bytes, sender: str, label: str) -> None:
        """An event published here on `topic`: to each peer subscribed to it, if it is
        exported, we are joined, and the peer's ceiling takes its label (else withheld,
        said in the log). One commit for all the peers' messages."""
        peers = self.subscribers.get(topic)
        if not peers or topic not in self.exports or not self.fed.url:
            return
        items = []
        for osname in sorted(peers):
            peer = self.fed.peers.get(osname)
            if peer is None:
                continue
            why = None
            if not message.clearance_allows(peer.ceiling, label):
                why = f"{osname} accepts up to {peer.ceiling} from us, the event is {label}"
            elif self.fed.outbox.topic_events.get(osname, 0) >= MAX_BEHIND:
                why = f"{MAX_BEHIND} events for {osname} wait in the outbox already"
            if why is None:
                items.append(self._queued(osname, topic, data, label, **{PUBLISHER: sender}))
                continue
            self.withheld += 1
            extra = self.kernel.bus.withheld.admit(f"federation@{osname}", int(time.monotonic()))
            if extra is not None:  # (a flood above a ceiling: counted, not each logged)
                self.kernel.log.append("delivery_refused", agent=f"federation@{osname}",
                                       sender=sender, type="event", topic=topic,
                                       reason=why, **extra)
        if items:
            self.kernel.record_many(items)

    # --- receiving (inbox.py: from federation@ORIGIN, HEADER set) ----------------

    def receive(self, origin: str, msg_id: str, headers: dict, body: bytes) -> str | None:
        """Judge and record one topic message from `origin` (a declared peer, the
        subject's); returns why it is refused (the inbox rejects it), None if recorded.
        Fs9Error(EDQUOT): a durable subscriber's mailbox is full: not recorded, NATS
        delivers it again later (as for mail)."""
        topic, verb = headers.get(HEADER, ""), headers.get(SUB_HEADER)
        if not NAME_RE.fullmatch(topic):
            return f"bad topic name {topic[:80]!r}"
        if verb in ("subscribe", "unsubscribe"):
            return self._asked(origin, msg_id, topic, verb)
        if verb in ("active", "refused"):
            if (origin, topic) not in self.subscriptions:
                return f"a note on {mirror(topic, origin)}, which we did not subscribe to"
            text = body.decode(errors="replace").strip().split("\n", 1)[0]
            self.kernel.record("fed_subscription", origin=origin, id=msg_id, topic=topic,
                               state=verb, reason=one_line(text)[:200])
            return None
        if verb is not None:
            return f"bad {SUB_HEADER} {verb[:40]!r}"
        return self._event(origin, msg_id, topic, headers, body)

    def _asked(self, origin: str, msg_id: str, topic: str, verb: str) -> None:
        """A peer subscribes to (or leaves) one of our topics: taken if we export it."""
        if verb == "unsubscribe":
            self.kernel.record("fed_subscriber", origin=origin, id=msg_id, topic=topic,
                               state="gone")
            return None
        if topic in self.exports:
            state, why = "active", ""
        else:
            state, why = "refused", f"{self.fed.me} does not export {topic}"
        items = [("fed_subscriber", dict(origin=origin, id=msg_id, topic=topic, state=state,
                                         reason=why))]
        if self.fed.outbox.topic_events.get(origin, 0) < MAX_BEHIND:  # (a peer that asks
            items.append(self._note(origin, state, topic, why))  # and never reads: no answer)
        self.kernel.record_many(items)
        return None

    def _event(self, origin: str, msg_id: str, topic: str, headers: dict,
               body: bytes) -> str | None:
        sub = self.subscriptions.get((origin, topic))
        if sub is None or sub.state == "refused":
            return f"{origin} published on {topic}, which we are not subscribed to there"
        if headers.get("type") != "event":
            return f"a topic's message of type {headers.get('type', '')[:40]!r}, not event"
        level = headers.get("classification", message.CLASSIFICATIONS[-1])  # never lowered
        if level not in message.CLASSIFICATIONS:
            return f"bad classification {level[:40]!r}"
        peer = self.fed.peers[origin]
        if not message.clearance_allows(peer.ceiling, level):
            return (f"{self.fed.me} accepts up to {peer.ceiling} from {origin}, the event "
                    f"is {level}")
        publisher = headers.get(PUBLISHER, "")
        if not NAME_RE.fullmatch(publisher):
            return f"bad {PUBLISHER} {publisher[:80]!r}"
        if not body or len(body) > MAX_EVENT:
            return f"an event of {len(body)} bytes (1 to {MAX_EVENT})"
        name, sender = mirror(topic, origin), f"{publisher}@{origin}"
        items = [("published", dict(topic=name, sender=sender, label=level, size=len(body),
                                    blob=body, keep=f"topic:{name}", fed=f"{origin}/{msg_id}"))]
        refused = []
        bus = self.kernel.bus
        for agent in list(bus.subscribers.get(name, {}).values()):  # durable subscribers
            if agent.killed:
                continue
            if not message.clearance_allows(agent.manifest["clearance"], level):
                refused.append((agent.name, f"{agent.name} is cleared for "
                                f"{agent.manifest['clearance']}, the event is {level}"))
                continue
            full = agent.mailbox.full(operator=False)
            if full:  # nothing recorded, nothing acked: JetStream delivers it again later
                raise Fs9Error(errno.EDQUOT, f"{agent.name}'s mailbox: {full}")
            msg = bus.compose(agent.name, sender, body, type="event", classification=level,
                              **{"x-topic": name})
            items.append(("mail_sent", dict(agent=agent.name, corr=msg.headers["correlation-id"],
                                            blob=msg.render(), id=msg.id, sender=sender,
                                            type="event", keep=SUBSCRIPTIONS)))
        self.kernel.record_many(items)  # the event and its mail: one commit, our record
        self.kernel.log.trim(f"topic:{name}", bus.topics[name].oldest_seq)
        for agent, why in refused:
            self.kernel.log.append("delivery_refused", agent=agent, sender=sender,
                                   type="event", topic=name, reason=why)
        return None

    # --- what it shows ---------------------------------------------------------

    def text(self) -> str:
        """federation/topics: what we export (and who subscribed), what we subscribe to."""
        lines = [f"export {t} subscribers={','.join(sorted(self.subscribers.get(t, ()))) or '-'}"
                 for t in sorted(self.exports)]
        lines += [f"subscription {mirror(t, o)} state={s.state} received={s.received}"
                  + (f" reason={s.reason}" if s.reason else "")
                  for (o, t), s in sorted(self.subscriptions.items())]
        lines.append(f"withheld={self.withheld}")
        return "\n".join(lines) + "\n"

    # --- applying events -------------------------------------------------------

    def appliers(self) -> dict:
        return {"fed_exported": lambda e, a, t: self.exports.add(e.data["topic"]),
                "fed_unexported": lambda e, a, t: self.exports.discard(e.data["topic"]),
                "fed_subscribe": self._on_subscribe, "fed_unsubscribe": self._on_unsubscribe,
                "fed_subscription": self._on_subscription,
                "fed_subscriber": self._on_subscriber}

    def _on_subscribe(self, e, agent, task):
        old = self.subscriptions.get((e.data["os"], e.data["topic"]))
        self.subscriptions[(e.data["os"], e.data["topic"])] = Subscription(
            "requested", received=old.received if old else 0)

    def _on_unsubscribe(self, e, agent, task):
        self.subscriptions.pop((e.data["os"], e.data["topic"]), None)

    def _on_subscription(self, e, agent, task):
        self.fed.inbox.seen.add(f"{e.data['origin']}/{e.data['id']}")
        sub = self.subscriptions.get((e.data["origin"], e.data["topic"]))
        if sub is not None:
            sub.state, sub.reason = e.data["state"], e.data.get("reason", "")

    def _on_subscriber(self, e, agent, task):
        self.fed.inbox.seen.add(f"{e.data['origin']}/{e.data['id']}")
        peers = self.subscribers.setdefault(e.data["topic"], set())
        if e.data["state"] == "active":
            peers.add(e.data["origin"])
        else:
            peers.discard(e.data["origin"])
            if not peers:
                del self.subscribers[e.data["topic"]]

    def received(self, e) -> None:
        """The bus applied a `published` that came from a peer (its record)."""
        self.fed.inbox.seen.add(e.data["fed"])
        self.fed.inbox.counts["received"] += 1
        origin = e.data["fed"].split("/", 1)[0]
        sub = self.subscriptions.get((origin, e.data["topic"].rpartition("@")[0]))
        if sub is not None:
            sub.received += 1
            if sub.state == "requested":  # (its events came before its note: as good)
                sub.state = "active"
