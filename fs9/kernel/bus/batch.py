"""The batch path of a mailbox: many messages per write, per read and per commit.

For programs that move many messages (docs/namespace.md, "Mail in batches"):
- `agents/NAME/mail/batch`, written: every line is one message, its body (the line and
  its newline; empty lines are skipped). A header block at the start of the first write
  (as mail/new's, ended by a blank line) applies to every message of that open. Each
  write(2) sends the whole lines it completes, all logged in one commit before it
  returns; a last line without a newline is sent at close.
- `agents/NAME/mail/batch`, read: waits until a message is pending, then the pending
  messages in delivery order (at most BATCH_MAX of them, about BATCH_BYTES), one line
  each, `ID<TAB>FROM<TAB>BODY`, the body escaped to stay one line; then EOF. Their
  deliveries are logged in one commit. Nothing is acknowledged by reading.
- `agents/NAME/mail/ack`, written: message ids (or file names) separated by white
  space, acknowledged in one commit; one that is not pending refuses the whole write.
The guarantees are mail/new's, next's and rm's: a message is in the log before the write
that sent it returns; it stays pending until acknowledged (at-least-once).
"""
import errno
import time

from ...errors import Fs9Error
from .. import approvals
from ..names import OPERATOR
from . import message
from .message import MAX_MESSAGE, Message

BATCH_MAX, BATCH_BYTES = 1000, 1 << 20  # what one read of mail/batch returns at most
ONE_BY_ONE = ("work_request", "handoff")  # become tasks: sent through mail/new
ESCAPES = ((b"\\", b"\\\\"), (b"\t", b"\\t"), (b"\n", b"\\n"), (b"\r", b"\\r"))


def send(bus, agent, head: bytes, lines: list[bytes], sender: str = OPERATOR,
         checked: str | None = None) -> None:
    """Send each line to agent as one message with headers `head` (b"": none), all in
    one commit, or none (Fs9Error naming the first problem). checked: the sender's
    clearance, its node having checked what it may say (Bus.send's; cluster/proxy.py)."""
    lines = [line for line in lines if line.strip(b"\n")]
    if not lines:
        return
    if agent.killed:
        raise Fs9Error(errno.ENOENT, f"no such agent: {agent.name} (killed)")
    room = agent.mailbox.room(operator=sender == OPERATOR)
    if len(lines) > room:
        raise Fs9Error(errno.EDQUOT, f"{agent.name}: room for {room} more messages, "
                                     f"{len(lines)} sent at once")
    try:
        bus.kernel.record_many(_checked(bus, agent, head, lines, sender, checked))
    finally:
        bus.sending.clear()


def _checked(bus, agent, head: bytes, lines: list[bytes], sender: str,
             checked: str | None) -> list[tuple[str, dict]]:
    """The events that send each line (Fs9Error naming the first refused), each message
    left in bus.sending for its mail_sent to take."""
    items = []
    for line in lines:
        if checked is None and sender != OPERATOR and bus.owner(sender) is not None:
            bus.kernel.rates.take(sender, "mail", len(line), time.monotonic())
        msg, floor = bus.check(agent, head + b"\n\n" + line if head else line, sender,
                               checked)
        h = msg.headers
        if "idempotency-key" in h or h["type"] in ONE_BY_ONE:
            raise Fs9Error(errno.EINVAL, "a batch takes neither an idempotency-key nor a "
                                         f"{h['type']}: send those through mail/new")
        author = bus.kernel.agents.get(sender) if checked is None else None
        if author is not None and approvals.mail_needs(author, h["classification"]):
            raise Fs9Error(errno.EPERM, f"mail classified {h['classification']} needs the "
                                        "operator's yes, one message at a time "
                                        "(approval.mail_above): send it through mail/new")
        msg.headers["id"] = bus.new_id()
        corr = h.setdefault("correlation-id", msg.id)
        if bus.declassifies(h["classification"], floor):
            items.append(("declassified", dict(agent=sender, corr=corr, id=msg.id,
                                               to=agent.name, to_label=h["classification"],
                                               **{"from": floor})))
        items.append(("mail_sent", dict(agent=agent.name, corr=corr, blob=msg.render(),
                                        id=msg.id, sender=sender, type=h["type"],
                                        priority=h["priority"],
                                        classification=h["classification"])))
        bus.sending[msg.id] = msg
    return items


def take(bus, agent) -> bytes:
    """The pending messages as mail/batch reads them (b"": none), their deliveries
    logged in one commit."""
    box, batch, size = agent.mailbox, [], 0
    for name in box.order[:BATCH_MAX]:
        msg = box.pending[name]
        batch.append(msg)
        size += len(msg.body)
        if size >= BATCH_BYTES:
            break
    if not batch:
        return b""
    first = [m for m in batch if not m.logged]  # (a reread is on the record already)
    if first:
        bus.kernel.log.append_many([("mail_delivered", dict(
            agent=agent.name, corr=m.headers["correlation-id"], id=m.id, name=m.name))
            for m in first])
        for m in first:
            m.logged = True
    return b"".join(line(m) for m in batch)


def line(msg: Message) -> bytes:
    """One message as one line: ID, FROM, the body (without its last newline) escaped."""
    body = msg.body[:-1] if msg.body.endswith(b"\n") else msg.body
    for raw, escaped in ESCAPES:
        body = body.replace(raw, escaped)
    return b"%s\t%s\t%s\n" % (msg.id.encode(), msg.headers["from"].encode(), body)


def ack(bus, agent, data: bytes) -> None:
    """Acknowledge the ids (or names) in data, in one commit; ENOENT (none acknowledged)
    if one is not pending."""
    try:
        words = data.decode().split()
    except UnicodeDecodeError:
        raise Fs9Error(errno.EINVAL, "message ids are text")
    taken: dict[str, Message] = {}
    for word in words:
        msg = agent.mailbox.get(word)
        if msg is None:
            raise Fs9Error(errno.ENOENT, f"no such message: {word[:80]} (nothing acknowledged)")
        taken[msg.name] = msg
    if taken:
        bus.kernel.record_many([("mail_acked", dict(
            agent=agent.name, corr=m.headers["correlation-id"], id=m.id, name=m.name))
            for m in taken.values()])
        bus.forget(list(taken.values()))


def split_head(data: bytes) -> tuple[bytes, bytes]:
    """(the header block, the rest) of a batch's first write; (b"", data) without one
    (told apart as mail/new tells a message's headers from its body)."""
    head, sep, rest = data.partition(b"\n\n")
    if sep and message.HEADED.match(head) and len(head) < MAX_MESSAGE:
        return head, rest
    return b"", data



def may_be_head(data: bytes) -> bool:
    """data may still become a header block: header-like lines, no blank line yet."""
    return bool(message.HEADED.match(data)) and b"\n\n" not in data and \
        len(data) <= EARLY_BYTES


EARLY_BYTES = 64 << 10  # a header block longer than this is a body (as mail/new's check)
