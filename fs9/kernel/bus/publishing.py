"""Topics on the bus (a mixin of Bus, bus.py): a topic made, an event published to its
readers, its durable subscribers (as mail) and the peers it is exported to, and the
events that rebuild topics at replay. STATE/topics.toml says how much each keeps
(topic.py's Retention).
"""
import errno
import os
import time

from ...errors import Fs9Error
from .. import approvals
from ..names import NAME_RE
from .topic import MAX_EVENT, Retention, Topic

# topics an agent may make (each keeps up to its retention: topic.py), and all agents
# together; the operator's are not counted
AGENT_TOPICS, AGENTS_TOPICS = 64, 1024


class Publishing:
    """Bus's topics (it holds the kernel, the topics, deliver_event)."""

    def _retention(self) -> Retention:
        """STATE/topics.toml's retention; a bad file: the defaults, and said so."""
        try:
            return Retention.load(os.path.join(self.kernel.state_dir, "topics.toml"))
        except Fs9Error as e:
            self.kernel.log.append("topics_config_error", reason=f"{e.text}; every topic "
                                   "keeps the defaults")
            return Retention()

    def create_topic(self, name: str, by: str | None = None) -> Topic:
        """The topic NAME, created (and logged) if new; by: the agent that makes it
        (EDQUOT past its share: topics are never removed, and each keeps up to its
        retention, so their number is what bounds them)."""
        if not NAME_RE.fullmatch(name):
            raise Fs9Error(errno.EINVAL, f"bad topic name {name!r}: letters, digits, _ . -")
        if name not in self.topics:
            if by is not None and self.topics_by[by] >= AGENT_TOPICS:
                raise Fs9Error(errno.EDQUOT, f"agent {by} has made {self.topics_by[by]} "
                                             f"topics: {AGENT_TOPICS} at the most")
            if by is not None and sum(self.topics_by.values()) >= AGENTS_TOPICS:
                raise Fs9Error(errno.EDQUOT, f"agents have made {AGENTS_TOPICS} topics: "
                                             "the rest are the operator's to make")
            self.kernel.record("topic_created", topic=name, **({"by": by} if by else {}))
        return self.topics[name]

    def publish(self, topic: Topic, data: bytes, sender: str = "operator") -> None:
        """One event to every subscriber; durable subscribers (manifest `subscribe`)
        get it as mail, so they do not miss what is published while they are down. The
        event is labelled with the publisher's clearance (the operator's: internal)."""
        if "@" in topic.name:  # TOPIC@OS: a peer's, written by the federation alone
            raise Fs9Error(errno.EPERM, f"topic {topic.name} is {topic.name.partition('@')[2]}'s:"
                                        " only its events arrive here (read it)")
        if len(data) > MAX_EVENT:
            raise Fs9Error(errno.EFBIG, f"event over {MAX_EVENT} bytes")
        if not data.endswith(b"\n"):
            data += b"\n"  # events are lines to their readers
        author = self.kernel.agents.get(sender)
        if author is not None:
            self.kernel.rates.take(sender, "publish", len(data), time.monotonic())
        label = author.manifest["clearance"] if author is not None else "internal"
        if author is not None and approvals.mail_needs(author, label):
            raise Fs9Error(errno.EPERM, f"an event from {sender} is {label}: it needs the "
                                        "operator's yes (approval.mail_above), one message "
                                        "at a time: send it through mail/new")
        # what the topic keeps no longer once this event is in leaves the log in the
        # same commit
        log = self.kernel.log
        self.kernel.record("published", topic=topic.name, sender=sender, label=label,
                           size=len(data), blob=data, keep=f"topic:{topic.name}",
                           trim_below=topic.oldest_after(len(data)) or log.next_seq)
        for agent in list(self.subscribers.get(topic.name, {}).values()):
            self.deliver_event(agent, topic.name, data, sender)
        # peers subscribed to it, if it is exported (kernel/federation/topics.py)
        self.kernel.federation.topics.fan_out(topic.name, data, sender, label)

    def subscribed(self, agent) -> None:
        """agent is spawned: its manifest's `subscribe` topics deliver to it as mail."""
        for name in agent.manifest.get("subscribe", ()):
            self.subscribers.setdefault(name, {})[agent.name] = agent

    def unsubscribed(self, agent) -> None:
        """agent is killed."""
        for name in agent.manifest.get("subscribe", ()):
            subscribers = self.subscribers.get(name, {})
            if subscribers.get(agent.name) is agent:
                del subscribers[agent.name]
                if not subscribers:
                    del self.subscribers[name]

    def _topic(self, name: str) -> Topic:
        if name not in self.topics:
            self.topics[name] = Topic(name, **self.retention.of(name))
        return self.topics[name]

    def on_topic_created(self, e, agent, task):
        if e.data["topic"] not in self.topics and "by" in e.data:
            self.topics_by[e.data["by"]] += 1
        self._topic(e.data["topic"])

    def on_published(self, e, agent, task):
        if "fed" in e.data:  # a peer's event (federation/topics.py): its inbox record
            self.kernel.federation.topics.received(e)
        # (b"" at replay: the body was trimmed, the event is counted; events are never
        # empty: a newline ends each)
        self._topic(e.data["topic"]).publish(self.kernel.blob(e) or None,
                                             e.data.get("label", "internal"), e.seq)
