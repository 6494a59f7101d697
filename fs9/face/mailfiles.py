"""The files mail is sent through, as the namespace table (tree.py) makes them for one
request: `mail/new` (a message at close), `mail/batch` (a line a message), `mail/ack`,
`outbox/TO` (an agent's own, to an agent here, in the cluster or of a peer OS), and
`federation/outbox/NAME@OS`. `me` is the agent whose view asks (None: the operator).
"""
import errno

from ..errors import NO_AGENT, Fs9Error
from ..kernel.bus import batch
from ..kernel.names import OPERATOR
from . import remoteview
from .batchfile import Batch, readers_first
from .cursors import BatchCursor
from .kinds import Ctl


def mail_new(k, agent, me=None):
    """Everything written between open and close is one message to agent, from
    whoever asks (the operator, or the agent whose view this is). A refusal is said
    to the sender (in its err), or, the operator's, in the recipient's."""
    said = dict(agent=me or agent.name, file=f"agents/{agent.name}/mail/new")

    def send(data: bytes):
        k.guarded(k.bus.send, agent, data, me or OPERATOR, **said)
        return readers_first(agent.mailbox)  # (awaited by close(2): CtlHandle.flush)
    return Ctl(send, whole=True, refused=lambda e: k.refused(e, **said),
               early=lambda data: k.guarded(k.bus.precheck, agent, data, me or OPERATOR,
                                            **said), early_until=b"\n\n")


def mail_batch(k, agent, me=None):
    """Many messages a write, many a read (kernel/bus/batch.py), from whoever asks."""
    said = dict(agent=me or agent.name, file=f"agents/{agent.name}/mail/batch")

    def send(head: bytes, lines: list[bytes]):
        k.guarded(batch.send, k.bus, agent, head, lines, me or OPERATOR, **said)
        return readers_first(agent.mailbox)  # (awaited by the write: BatchHandle)
    return Batch(lambda: BatchCursor(k, agent), send)


def mail_ack(k, agent, me=None):
    """Acknowledge many messages a write: the mailbox's owner's (or the operator's) to do,
    as it reads them (EACCES for anyone else, whose open must not create a message
    named `ack` either)."""
    if me is not None and me != agent.name:
        raise Fs9Error(errno.EACCES, f"only {agent.name} acknowledges its mail")
    return Ctl(lambda data: k.guarded(batch.ack, k.bus, agent, data, agent=agent.name,
                                      file="mail/ack"))


def outbox(k, agent, to: str, me=None):
    """outbox/TO: one message from agent to TO, sent at close. Only the agent itself
    (or the operator acting for it) may send from its outbox, and the agent only to an
    agent it knows of (Kernel.knows): any other answers as a name nobody has."""
    if me is not None and me != agent.name:
        raise Fs9Error(errno.EACCES, f"{me} may not send as {agent.name}")
    if "@" in to:  # NAME@OS: an agent of another OS
        return federated(k, to, agent.name, dict(agent=agent.name, file="outbox"))
    if k.cluster is not None and k.cluster.placed(to) is not None:
        # placed in the cluster (here or on another node): through JetStream, so that the
        # message outlives either node (kernel/cluster/mail.py)
        if me is not None and not k.cluster.mail.knows(me, to):
            k.guarded(no_agent, to, agent=agent.name, file="outbox")  # (raises)
        return remoteview.agent_mail(k, to, agent.name, dict(agent=agent.name, file="outbox"))
    recipient = k.guarded(k.agent, to, me, agent=agent.name, file="outbox")
    return Ctl(lambda data: k.guarded(k.bus.send, recipient, data, agent.name,
                                      agent=agent.name, file="outbox"),
               whole=True, refused=lambda e: k.refused(e, agent=agent.name, file="outbox"),
               early=lambda data: k.guarded(k.bus.precheck, recipient, data, agent.name,
                                            agent=agent.name, file="outbox"),
               early_until=b"\n\n")


def no_agent(name: str):
    raise Fs9Error(errno.ENOENT, f"{NO_AGENT}: {name}")


def federated(k, to: str, sender: str, said: dict):
    """One message to NAME@OS through the federation (kernel/federation/), from sender;
    an address that names no peer's agent is refused at open, as a name nobody has."""
    fed = k.federation
    k.guarded(fed.address, to, **said)
    return Ctl(lambda data: k.guarded(fed.send, to, data, sender, **said), whole=True,
               refused=lambda e: k.refused(e, **said),
               early=lambda data: k.guarded(fed.precheck, to, data, sender, **said),
               early_until=b"\n\n")
