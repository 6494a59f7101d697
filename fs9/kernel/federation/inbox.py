"""The federation's inbox: each message from another OS judged and recorded in this OS's
log before it is acknowledged to NATS (link.py acks once these return).

Its records, each also the receiver's record that the message was processed, so a
redelivery (also after NATS's dedupe window) is acked and not processed again:
  mail_sent (fed=ORIGIN/ID)   delivered to a mailbox (req/state/seq: an answer taken
                              by a request of ours, requests.py)
  fed_rejected (origin, id, reason)   refused
  fed_stale (origin, id, corr, reason)   an answer older than the request's state
  fed_chunk (origin, id, i, n, digest)   one chunk of a large message (chunks.py)

Nothing the remote wrote is trusted beyond its peer's declaration: the origin OS is the
subject's (bind it with per-member NATS credentials, see docs/namespace.md); it must be
a declared peer; `from` must name an agent of that OS; the classification must be within
the ceiling declared for it and the recipient's clearance.
"""
import collections
import errno
import os
import re
import time

from ...errors import Fs9Error
from ..bus import message
from ..names import NAME_RE, one_line
from . import chunks, topics, trace
from .requests import Requests

# what the sending kernel stamped, and a reply-to this OS would route by (replies go to
# `from`): not taken from a remote. The other stamped keys (x-status...) it may not say:
# message.parse refuses them, so the message is rejected.
NOT_TAKEN = ("id", "from", "date", "reply-to")
# what the peer's kernel stamps on a task's result and progress (its agents cannot)
RESULT_STAMPS = ("x-task", "x-status", "x-exit", "x-seq")
RESULT_TYPES = ("result", "status_update")
STAMP_RE = re.compile(r"-?[A-Za-z0-9_]{1,32}")
SEQ_RE = re.compile(r"[0-9]{1,18}")


SEEN_MAX = 100_000  # message ids remembered for spotting a redelivery


class Seen:
    """The latest SEEN_MAX ORIGIN/ID judged (delivered or not). A redelivery comes while
    its message waits for our ack (FS9FED is a work queue: an acked one is gone), so
    what is older than that can be forgotten: the memory stays bounded."""

    def __init__(self) -> None:
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def add(self, key: str) -> None:
        self._ids[key] = None
        if len(self._ids) > SEEN_MAX:
            self._ids.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        return key in self._ids


class Inbox:
    def __init__(self, fed) -> None:
        self.fed, self.kernel = fed, fed.kernel
        self.seen = Seen()
        self.counts = dict(received=0, rejected=0, duplicates=0, stale=0)
        self.chunks = chunks.Reassembly()
        self.requests = Requests(fed.progress)

    def reject(self, origin: str, msg_id: str, reason: str, reply_to: str | None = None,
               corr: str | None = None) -> None:
        """Refuse a received message: a fed_rejected event (so a redelivery is not judged
        again), and, to a declared peer's sender, a `rejected` result (never to another
        OS's federation itself: two refusing each other's notes would never end)."""
        me = self.fed.me
        self.kernel.record("fed_rejected", corr=corr, origin=origin, id=msg_id,
                           reason=one_line(reason)[:500])
        if reply_to is None or reply_to.startswith("federation@"):
            return
        note = message.Message(to=reply_to, body=f"rejected: {reason}\n".encode(), headers={
            "id": os.urandom(8).hex(), "from": f"federation@{me}", "to": reply_to,
            "date": message.format_time(time.time()),
            "type": "result", "priority": "normal", "classification": "public",
            "correlation-id": corr or msg_id, "x-status": "rejected",
            "x-seq": str(self.kernel.log.next_seq)})
        self.kernel.record("fed_queued", corr=note.headers["correlation-id"],
                           blob=note.render(), id=note.id, to=reply_to, os=origin,
                           classification="public", type="result", deadline=None)

    def receive_chunk(self, origin: str, value: str, data: bytes) -> None:
        """One chunk of a large message: recorded, and once all are in, the whole judged."""
        chunk = chunks.parse(value, len(data))
        if isinstance(chunk, str):
            return self.reject(origin, f"bad-{os.urandom(8).hex()}", chunk)
        fed = f"{origin}/{chunk.id}"
        if fed in self.seen:
            self.counts["duplicates"] += 1
            return
        peer = self.fed.peers.get(origin)
        if peer is None:
            return self.reject(origin, chunk.id, f"{origin} is not a declared peer")
        if self.chunks.held(origin, chunk.id) is None:  # a new one: stale ones make room
            for mid in self.chunks.stale(origin, time.time() - peer.wait)[:1]:
                self.reject(origin, mid, f"its chunks stopped coming (none for {peer.wait} s)")
                self.kernel.log.trim(f"fedchunk:{origin}/{mid}", self.kernel.log.next_seq)
        why = self.chunks.admit(origin, chunk)
        if why is not None:
            return self.reject(origin, chunk.id, why)
        held = self.chunks.held(origin, chunk.id)
        if held is not None and chunk.i in held.seqs:
            self.counts["duplicates"] += 1
        else:
            self.kernel.record("fed_chunk", origin=origin, id=chunk.id, i=chunk.i, n=chunk.n,
                               digest=chunk.digest, blob=data, keep=f"fedchunk:{fed}")
            held = self.chunks.held(origin, chunk.id)
        if held.whole:  # (also when the last was recorded before a crash: a redelivery)
            whole = self.chunks.whole(origin, chunk.id, self.kernel.log.blob)
            if isinstance(whole, str):
                self.reject(origin, chunk.id, whole)
            else:
                self.receive(origin, whole, chunk.id)
            self.kernel.log.trim(f"fedchunk:{fed}", self.kernel.log.next_seq)

    def receive(self, origin: str, data: bytes, chunked: str = "") -> None:
        """Judge and record one message from OS `origin` (the subject's): delivered to
        a local mailbox (mail_sent with fed=ORIGIN/ID), rejected or stale. chunked: the
        id its chunks carried (the message must say the same)."""
        head, _, body = data.partition(b"\n\n")
        try:
            headers = dict(line.split(": ", 1) for line in head.decode().split("\n"))
        except (UnicodeDecodeError, ValueError):
            headers = {}
        msg_id = headers.get("id", "")
        if chunked and msg_id != chunked:
            return self.reject(origin, chunked, f"its id {msg_id[:40]!r} is not its chunks'")
        if not re.fullmatch(r"[0-9a-f]{16}", msg_id):
            msg_id = f"bad-{os.urandom(8).hex()}"  # unreadable: logged once
        if f"{origin}/{msg_id}" in self.seen:
            self.counts["duplicates"] += 1
            return
        peer = self.fed.peers.get(origin)
        if peer is None:
            return self.reject(origin, msg_id, f"{origin} is not a declared peer")
        sender, _, from_os = headers.get("from", "").partition("@")
        if from_os != origin or not NAME_RE.fullmatch(sender):
            return self.reject(origin, msg_id, f"from {headers.get('from', '')!r} is not "
                               f"an agent of {origin}")
        reply_to, corr = f"{sender}@{origin}", headers.get("correlation-id")
        to, _, to_os = headers.get("to", "").partition("@")
        if to_os != self.fed.me:
            return self.reject(origin, msg_id, f"to {headers.get('to', '')!r} is not "
                               f"an agent of {self.fed.me}", reply_to, corr)
        if to == sender == "federation" and trace.HEADER in headers:  # a part of a trace
            why = self.fed.traces.receive(origin, msg_id, corr, body)
            return why and self.reject(origin, msg_id, why)
        if to == sender == "federation" and topics.HEADER in headers:  # topics across OSs
            why = self.fed.topics.receive(origin, msg_id, headers, body)
            return why and self.reject(origin, msg_id, why)
        kind = headers.get("type")
        stamps = {k: headers[k] for k in RESULT_STAMPS if k in headers} \
            if kind in RESULT_TYPES else {}
        if not all(STAMP_RE.fullmatch(v) for v in stamps.values()) or \
                not SEQ_RE.fullmatch(stamps.get("x-seq", "0")):
            return self.reject(origin, msg_id, f"bad result headers {stamps}"[:300],
                               reply_to, corr)
        if chunked and kind != "result":
            return self.reject(origin, msg_id, f"over {message.MAX_MESSAGE} bytes: only a "
                               "result may be", reply_to, corr)
        written = "".join(f"{k}: {v}\n" for k, v in headers.items()
                          if k not in NOT_TAKEN and k not in stamps).encode()
        try:  # as if written here, but the label is never lowered: none stated is the top
            msg = message.parse(written + b"\n" + body, to=f"{to}@{self.fed.me}",
                                sender=reply_to, label=message.CLASSIFICATIONS[-1],
                                limit=chunks.MAX_CHUNKED if chunked else message.MAX_MESSAGE)
        except Fs9Error as e:
            return self.reject(origin, msg_id, e.text, reply_to, corr)
        level = msg.headers["classification"]
        if not message.clearance_allows(peer.ceiling, level):
            return self.reject(origin, msg_id, f"{self.fed.me} accepts up to {peer.ceiling} "
                               f"from {origin}, the message is {level}", reply_to, corr)
        corr = msg.headers["correlation-id"] = msg.headers.get("correlation-id", msg_id)
        answer = {}
        request = self.requests.find(corr, origin, sender, to) if kind in RESULT_TYPES else None
        if request is not None:  # an answer to a request of ours: its callbacks, in order
            seq = int(stamps.get("x-seq", "0"))
            to, state, stale = self.requests.judge(request, kind, stamps.get("x-status", ""),
                                                   seq)
            req = f"{request.corr} {request.to}"
            if stale:
                return self.kernel.record("fed_stale", corr=corr, origin=origin, id=msg_id,
                                          req=req, reason=stale)
            answer = dict(req=req, state=state, seq=seq)
        recipient = self.kernel.bus.owner(to)
        if recipient is None or getattr(recipient, "killed", False) or (
                request is not None and recipient.spawn_seq > request.asked):
            # (an answer for an agent killed since it asked goes nowhere, even once its
            # name is spawned again: the new holder is another agent)
            return self.reject(origin, msg_id, f"no such agent: {to}@{self.fed.me}",
                               reply_to, corr)
        if not message.clearance_allows(recipient.manifest["clearance"], level):
            return self.reject(origin, msg_id, f"{to} is cleared for "
                               f"{recipient.manifest['clearance']}, the message is {level}",
                               reply_to, corr)
        full = recipient.mailbox.full(operator=False)
        if full:  # nothing recorded, nothing acked: JetStream delivers it again later
            raise Fs9Error(errno.EDQUOT, f"{to}'s mailbox: {full}")  # (link.py)
        if kind == "work_request" and recipient is not self.kernel.bus.operator \
                and not recipient.daemon:  # no room for the task: likewise, later
            self.kernel.check_queue(recipient, operator=False)
        msg.headers.update(id=msg_id, to=to, **stamps)
        msg.to = to
        if kind == "work_request":  # work asked of this OS: its authorization mode says
            governance = self.fed.governance
            decision, why = governance.decide(peer, msg.headers)
            if decision == "deny":
                return self.reject(origin, msg_id, f"refused by {why}", reply_to, corr)
            if decision == "ask":
                full = governance.hold(origin, msg, corr, why)
                return full and self.reject(origin, msg_id, full, reply_to, corr)
            if peer.auth == "policy":
                self.kernel.record("fed_decided", corr=corr, origin=origin, id=msg_id,
                                   decision="approve", by="policy", reason=why)
        self.deliver(origin, msg, recipient, answer)

    def deliver(self, origin: str, msg, recipient, answer: dict) -> None:
        """Into recipient's mailbox (its inbox record); a work_request to a task-mode
        agent becomes a task, as local mail does, its result back to the sender."""
        h = msg.headers
        corr, reply_to = h["correlation-id"], h["from"]
        self.kernel.record("mail_sent", agent=msg.to, corr=corr, blob=msg.render(), id=msg.id,
                           sender=reply_to, type=h["type"], priority=h["priority"],
                           classification=h["classification"], fed=f"{origin}/{msg.id}",
                           **answer)
        if h["type"] == "work_request" and recipient is not self.kernel.bus.operator \
                and not recipient.daemon:
            stored = recipient.mailbox.get(msg.id)
            self.kernel.submit(recipient, msg.body, corr=corr, request=msg.id,
                               reply_to=reply_to)
            self.kernel.bus.ack(recipient, stored.name)

    # --- applying events -------------------------------------------------------

    def received(self, e) -> None:
        """The bus applied a mail_sent that came through the federation (its record)."""
        self.seen.add(e.data["fed"])
        self.counts["received"] += 1
        self.chunks.drop(*e.data["fed"].split("/", 1))
        if "req" in e.data:
            text = self.kernel.blob(e).partition(b"\n\n")[2][:200]
            self.requests.on_answer(e.data, one_line(text.decode(errors="replace").strip()
                                                     .split("\n", 1)[0])[:120])

    def appliers(self) -> dict:
        return {"fed_rejected": self._on_rejected, "fed_stale": self._on_stale,
                "fed_chunk": lambda e, agent, task: self.chunks.on_chunk(e)}

    def _on_rejected(self, e, agent, task):
        self.seen.add(f"{e.data['origin']}/{e.data['id']}")
        self.chunks.drop(e.data["origin"], e.data["id"])
        self.counts["rejected"] += 1

    def _on_stale(self, e, agent, task):
        self.seen.add(f"{e.data['origin']}/{e.data['id']}")
        self.counts["stale"] += 1
        self.requests.on_stale(e.data)
