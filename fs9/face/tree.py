"""The namespace as one table: path pattern -> the node that serves it (our Dirtab;
walk.py resolves paths through it).

To find where any path is served, find its row here. `{agent}`, `{task}`,
`{msg}`, `{dead}`, `{omsg}`, `{odead}`, `{topic}`, `{corr}`, `{provider}`, `{cap}`,
`{query}`, `{note}`, `{peer}`, `{fdead}`, `{model}`, `{conv}` and `{approval}` are bound to kernel objects while walking (VARS below); a name that
binds to nothing is ENOENT, and so is any name that is not UTF-8 but a query (kernel
objects have text names). Directories list the rows one level below them; a Dir with
`create` takes new names (mail/, outbox/, topics/). A row ending in `/...` serves a
subtree: the vault, a real directory on disk whose every file is a vault node
(face/vault.py), reached beneath the vault's directory fd.

Views: `agents/NAME/view/P` is path P as agent NAME sees it (kernel/agents/view.py):
the same rows, filtered by its unveil and pledge, with NAME as the one asking
(`me`: a factory that takes `me` learns who asks; None is the operator). A
confined agent's sandbox binds that directory over the mount point, so the view
a request arrives through is its identity.
"""
import errno
import inspect
import os
from typing import Callable

from ..errors import Fs9Error
from ..kernel.agents import manifest as manifests, registry
from ..kernel import finished, labels, supervision
from ..kernel.bus.message import CLASSIFICATIONS
from ..kernel.names import OPERATOR
from ..kernel.stream import Stream
from ..kernel.bus import batch
from ..kernel.bus.mailstream import MailStream
from .cursors import (AuditCursor, BatchCursor, Chain, EventCursor, NextCursor, ReplyCursor,
                      StreamCursor, TaskCursor, TopicCursor)
from .kinds import Clone, Ctl, Dir, Status, StreamNode
from .node import Node
from . import mailfiles, remote
from .vault import VaultNode


def _agent_out(k, agent):
    return StreamNode(lambda: TaskCursor(k, agent.shown_task(), 1))


def _agent_err(k, agent):
    """The shown task's stderr, then the agent's notes on refused commands."""
    return StreamNode(lambda: Chain(TaskCursor(k, agent.shown_task(), 2),
                                    StreamCursor(Stream(bytes(agent.notes), ended=True))))


def _operator_only(me, what: str) -> None:
    if me is not None:
        raise Fs9Error(errno.EACCES, f"{what} is the operator's")


def _cluster(k) -> None:
    if k.cluster is None:
        raise Fs9Error(errno.ENOENT, "not in a cluster (fs9 mount --cluster URLS)")


def _topic(k, topic, me=None):
    """topics/NAME: each write publishes one event; each open subscribes (the gate
    admitted a reader cleared for the topic's label: kernel/labels.py), and the events
    above the reader's clearance are withheld (the operator is cleared for all)."""
    def subscribe():
        return TopicCursor(topic, k.agent(me).manifest["clearance"] if me
                           else CLASSIFICATIONS[-1])
    return StreamNode(subscribe,
                      publish=lambda data: k.guarded(k.bus.publish, topic, data, me or OPERATOR,
                                                     agent=me, file=f"topics/{topic.name}"))


def _search(k, query: str | None, me=None):
    """search/QUERY: the ranked hits, as the one asking may read the vault (its view, less
    what is labelled above its clearance: kernel/labels.py; kernel/vault/search.py);
    query None: search/status, the index's state as the one asking sees it."""
    if k.search is None:
        raise Fs9Error(errno.ENOENT, "no vault (fs9 mount --vault DIR)")
    view = None if me is None else labels.cleared_view(k, k.agent(me))
    if query is None:
        return Status(lambda: k.search.status(view))
    # the query is text: a byte of the name that is not UTF-8 is U+FFFD (a surrogate
    # escape would reach an embedding endpoint as JSON it may refuse)
    query = os.fsencode(query).decode("utf-8", "replace")
    return Status(lambda: k.search.query(query, view),
                  prepare=lambda: k.search.prepare(query, view))


def _conv_request(k, conv):
    """request: everything written between open and close is one turn of the
    conversation (plain text: a user message; JSON: messages, tools...)."""
    who = conv.owner
    return Ctl(lambda d: k.guarded(k.models.request, conv, d, agent=who, file="models"),
               whole=True, refused=lambda e: k.refused(e, agent=who, file="models"),
               early=lambda data: k.guarded(k.models.precheck, conv, data, agent=who,
                                            file="models"))


def _note(k, agent, key: str, me=None):
    """memory/KEY: an agent's note (kernel/agents/memory.py), written whole, kept across
    restarts; me: who writes (an agent's writes have a rate)."""
    said = dict(agent=agent.name, file="memory")
    return Ctl(lambda d: k.guarded(k.memory.set, agent, key, d, me, **said),
               lambda: k.memory.get(agent, key) or b"", whole=True,
               refused=lambda e: k.refused(e, **said),
               remove=lambda: k.guarded(k.memory.delete, agent, key, **said))


def _vault(k, at: tuple[str, ...], rel: tuple[str, ...], view):
    """vault/REL (asked as `at`, in `view` or None): the file on disk, or ENOENT."""
    if k.vault_root is None:
        raise Fs9Error(errno.ENOENT, "no vault (fs9 mount --vault DIR)")
    return VaultNode.at(k, at, rel, view)


# pattern -> factory(kernel, **bound objects) -> Node (Dir rows get their names from the
# tree); PREFIX/...: factory(kernel, the path as asked, the names below PREFIX, the view)
ROWS: dict[str, Callable[..., Node | None]] = {
    "": None,
    "ctl": lambda k, me=None: Ctl(lambda d: k.guarded(k.ctl, d, me, agent=me), k.state_line),
    "status": lambda k: Status(k.status),
    "err": lambda k: Status(k.err),  # what the operator should know (Kernel.err)
    "events": lambda k: StreamNode(lambda: EventCursor(k.log)),
    "tree": lambda k: Status(lambda: supervision.render(k)),  # the supervision trees
    "metrics": lambda k, me=None: Status(lambda: k.metrics.text(me)),  # Prometheus text
    "agents": None,
    "agents/{agent}": None,
    "agents/{agent}/ctl": lambda k, agent, me=None: Ctl(
        lambda d: k.guarded(agent.ctl, d, me, agent=me or agent.name), agent.status_line),
    "agents/{agent}/in": lambda k, agent, me=None: Ctl(
        lambda d: k.guarded(lambda: k.bus.check_input(agent, me, len(d)) or k.submit(
            agent, d, reply_to=me if me != agent.name else ""), agent=me or agent.name,
                            file="in"), whole=True,  # (a refusal is the writer's: its err)
        refused=lambda e: k.refused(e, agent=me or agent.name, file="in")),
    "agents/{agent}/view": None,  # the namespace as agent sees it (operator only)
    "agents/{agent}/memory": lambda k, agent, me=None: Dir(
        create=lambda name: _note(k, agent, name, me)),
    "agents/{agent}/memory/{note}": lambda k, agent, note, me=None: _note(k, agent, note, me),
    "agents/{agent}/steps": lambda k, agent: Ctl(  # each line: one agent_step event
        lambda d: k.guarded(agent.steps, d, agent=agent.name, file="steps")),
    "agents/{agent}/approve": lambda k, agent, me=None: Ctl(  # a tool call, before it runs
        lambda d: k.guarded(k.approvals.tool, agent, d, me, agent=me or agent.name,
                            file="approve")),
    "agents/{agent}/out": _agent_out,
    "agents/{agent}/err": _agent_err,
    "agents/{agent}/status": lambda k, agent: Status(agent.status),
    "agents/{agent}/manifest": lambda k, agent: Status(lambda: manifests.text(agent.manifest)),
    "agents/{agent}/supervisor": lambda k, agent, me=None: Status(
        lambda: supervision.supervisor_text(k, agent, me)),
    "agents/{agent}/children": lambda k, agent, me=None: Status(
        lambda: supervision.children_text(k, agent, me)),
    "agents/{agent}/tasks": None,
    "agents/{agent}/tasks/{task}": None,
    "agents/{agent}/tasks/{task}/input": lambda k, agent, task: Status(lambda: k.task_input(task)),
    "agents/{agent}/tasks/{task}/out": lambda k, agent, task: StreamNode(
        lambda: TaskCursor(k, task, 1)),
    "agents/{agent}/tasks/{task}/err": lambda k, agent, task: StreamNode(
        lambda: TaskCursor(k, task, 2)),
    "agents/{agent}/tasks/{task}/status": lambda k, agent, task: Status(task.status),
    "agents/{agent}/tasks/{task}/progress": lambda k, agent, task: Ctl(
        lambda data: k.guarded(k.bus.progress, agent, task, data, agent=agent.name,
                               file="progress")),
    "agents/{agent}/mail": lambda k, agent, me=None: Dir(
        create=lambda name: mailfiles.mail_new(k, agent, me)),
    "agents/{agent}/mail/new": mailfiles.mail_new,
    "agents/{agent}/mail/batch": mailfiles.mail_batch,  # (unlisted, as ack: see UNLISTED)
    "agents/{agent}/mail/ack": mailfiles.mail_ack,
    # held open: one message a read, never EOF (kernel/bus/mailstream.py; unlisted)
    "agents/{agent}/mail/stream": lambda k, agent: StreamNode(
        lambda: MailStream(k.bus, agent)),
    "agents/{agent}/outbox": lambda k, agent, me=None: Dir(
        create=lambda name: mailfiles.outbox(k, agent, name, me)),
    "agents/{agent}/mail/next": lambda k, agent: StreamNode(lambda: NextCursor(k, agent)),
    "agents/{agent}/mail/dead": None,
    "agents/{agent}/mail/dead/{dead}": lambda k, agent, dead: Status(dead.render),
    "agents/{agent}/mail/{msg}": lambda k, agent, msg: Status(
        msg.render, opened=lambda: k.bus.delivered(agent, msg),
        remove=lambda: k.guarded(k.bus.ack, agent, msg.name, agent=agent.name, file="mail")),
    "topics": lambda k, me=None: Dir(
        create=lambda name: _topic(k, k.guarded(k.bus.create_topic, name, me, agent=me,
                                                file="topics"), me)),
    "topics/{topic}": _topic,
    "mail": None,  # the operator's mailbox: results of the requests it sent
    "mail/next": lambda k: StreamNode(lambda: NextCursor(k, k.bus.operator)),
    "mail/batch": lambda k: StreamNode(lambda: BatchCursor(k, k.bus.operator)),
    "mail/stream": lambda k: StreamNode(lambda: MailStream(k.bus, k.bus.operator)),
    "mail/ack": lambda k, me=None: _operator_only(me, "mail/ack") or Ctl(
        lambda data: k.guarded(batch.ack, k.bus, k.bus.operator, data, file="mail/ack")),
    "mail/dead": None,
    "mail/dead/{odead}": lambda k, odead: Status(odead.render),
    "mail/{omsg}": lambda k, omsg: Status(
        omsg.render, opened=lambda: k.bus.delivered(k.bus.operator, omsg),
        remove=lambda: k.guarded(k.bus.ack, k.bus.operator, omsg.name, file="mail")),
    "log": None,
    "log/audit": lambda k: StreamNode(lambda: AuditCursor(k.log)),
    "log/trace": None,
    "log/trace/{corr}": lambda k, corr: Status(lambda: k.federation.traces.render(corr)),
    # the federation (kernel/federation/): the operator's to drive, off until joined
    "federation": None,
    "federation/ctl": lambda k, me=None: _operator_only(me, "federation/ctl") or Ctl(
        lambda d: k.guarded(k.federation.ctl, d, file="federation/ctl"),
        k.federation.state_line),
    "federation/status": lambda k: Status(k.federation.status),
    "federation/card": lambda k: Status(k.federation.card_text),
    # topics offered to peers and peers' topics subscribed to (kernel/federation/topics.py)
    "federation/topics": lambda k: Status(k.federation.topics.text),
    "federation/outbox": lambda k, me=None: _operator_only(me, "federation/outbox") or Dir(
        create=lambda name: mailfiles.federated(k, name, OPERATOR,
                                                dict(file="federation/outbox"))),
    "federation/dead": None,  # dead letters: given up before JetStream had them
    "federation/dead/{fdead}": lambda k, fdead: Status(lambda: fdead.data),
    "federation/requests": None,  # the work requests we sent: state, callbacks (requests.py)
    # (what was asked and answered: the operator's, as approvals are)
    "federation/requests/{freq}": lambda k, freq, me=None: _operator_only(
        me, "federation/requests") or Status(lambda: k.federation.requests.text(freq)),
    "federation/sagas": None,  # multi-step cross-OS workflows (kernel/federation/sagas.py)
    "federation/sagas/new": lambda k, me=None: _operator_only(me, "federation/sagas") or Ctl(
        lambda d: k.guarded(k.federation.sagas.start, d, file="federation/sagas/new"),
        whole=True, refused=lambda e: k.refused(e, file="federation/sagas/new")),
    "federation/sagas/{saga}": None,
    "federation/sagas/{saga}/status": lambda k, saga, me=None: _operator_only(
        me, "federation/sagas") or Status(saga.status),
    "federation/sagas/{saga}/steps": lambda k, saga, me=None: _operator_only(
        me, "federation/sagas") or Status(saga.steps_text),
    "federation/sagas/{saga}/ctl": lambda k, saga, me=None: _operator_only(
        me, "federation/sagas") or Ctl(lambda d: k.guarded(k.federation.sagas.ctl, saga, d,
                                                           file="federation/sagas"),
                                       lambda: f"state={saga.state}\n"),
    "federation/approvals": None,  # peers' work requests waiting for the operator
    "federation/approvals/{fheld}": lambda k, fheld, me=None: _operator_only(
        me, "federation/approvals") or Ctl(
        lambda d: k.guarded(k.federation.governance.answer, fheld, d,
                            file="federation/approvals"), fheld.text),
    "federation/peers": None,
    "federation/peers/{peer}": None,
    "federation/peers/{peer}/card": lambda k, peer: Status(lambda: peer.card or b""),
    "federation/peers/{peer}/status": lambda k, peer: Status(
        lambda: k.federation.peer_status(peer)),
    # the cluster (kernel/cluster/): the nodes of this fs9, the operator's (ENOENT until
    # mounted with --cluster); remote agents are served by face/remote.py
    "nodes": None,
    "nodes/ctl": lambda k, me=None: _operator_only(me, "nodes/ctl") or _cluster(k) or Ctl(
        lambda d: remote.guarded(k, k.cluster.ctl(d), dict(file="nodes/ctl")),
        k.cluster.state_line),
    "nodes/{node}": lambda k, node, me=None: _operator_only(me, "nodes/") or Status(
        lambda: k.cluster.node_text(node)),
    "vault/...": _vault,  # the vault directory on disk, served as it is
    "registry": None,
    "registry/by-capability": None,  # (before {provider}: these names, cards too, are reserved)
    "registry/owners": lambda k: Status(lambda: registry.owners(k.agents)),
    "registry/cards": None,  # each agent as an A2A AgentCard
    "registry/cards/{provider}": lambda k, provider: Status(lambda: registry.card(provider)),
    "registry/{provider}": lambda k, provider: Status(lambda: registry.entry(provider)),
    "registry/by-capability/{cap}": lambda k, cap: Status(  # then peers' agents, AGENT@OS
        lambda: registry.providers_text(k.agents, cap) + "".join(
            f"{p}\n" for p in k.federation.remote_providers().get(cap, []))),
    "search": None,  # ranked vault search; `ls` shows only status (queries are private)
    "search/status": lambda k, me=None: _search(k, None, me),
    "search/{query}": _search,
    "approvals": None,  # actions waiting for the operator's yes (kernel/approvals.py)
    "approvals/{approval}": None,
    "approvals/{approval}/status": lambda k, approval: Status(approval.status),
    "approvals/{approval}/ctl": lambda k, approval: Ctl(
        lambda d: k.guarded(k.approvals.ctl, approval, d, file="approvals"), approval.status),
    "models": None,  # the configured models (kernel/models/models.py)
    "models/usage": lambda k: Status(k.models.usage_text),
    "models/{model}": None,
    "models/{model}/info": lambda k, model: Status(model.info),
    "models/{model}/clone": lambda k, model, me=None: Clone(
        lambda: k.guarded(k.models.clone, model, me, agent=me, file="clone").id),
    "models/{model}/{conv}": None,
    "models/{model}/{conv}/request": lambda k, model, conv: _conv_request(k, conv),
    "models/{model}/{conv}/reply": lambda k, model, conv: StreamNode(
        lambda: ReplyCursor(conv.turn)),
    "models/{model}/{conv}/last": lambda k, model, conv: Status(conv.last),
    "models/{model}/{conv}/status": lambda k, model, conv: Status(conv.status),
    "models/{model}/{conv}/history": lambda k, model, conv: Status(conv.history),
    "models/{model}/{conv}/ctl": lambda k, model, conv: Ctl(
        lambda d: k.guarded(k.models.ctl, conv, d, agent=conv.owner, file="models"),
        conv.status),
}


# variable -> (names under the bound parents, bind a name to an object or None)
VARS = {
    # (in a cluster, agents/ lists the agents of every node: face/remote.py serves the
    # others' to the operator; to an agent, as its view shows them, they are not there)
    "agent": (lambda k: sorted(k.agents) if k.cluster is None else k.cluster.agent_names(),
              lambda k, name: k.agents.get(name)),
    "node": (lambda k, me=None: sorted(k.cluster.cards()) if k.cluster and me is None else [],
             lambda k, name, me=None: name if k.cluster and me is None
             and name in k.cluster.cards() else None),
    "task": (lambda k, agent: [str(t.id) for t in agent.tasks],
             lambda k, name, agent: _task_of(k, agent, name)),
    "msg": (lambda k, agent: list(agent.mailbox.order),
            lambda k, name, agent: agent.mailbox.get(name)),
    "dead": (lambda k, agent: sorted(agent.mailbox.dead),
             lambda k, name, agent: agent.mailbox.dead.get(name)),
    "omsg": (lambda k: list(k.bus.operator.mailbox.order),
             lambda k, name: k.bus.operator.mailbox.get(name)),
    "odead": (lambda k: sorted(k.bus.operator.mailbox.dead),
              lambda k, name: k.bus.operator.mailbox.dead.get(name)),
    "topic": (lambda k: sorted(k.bus.topics), lambda k, name: k.bus.topics.get(name)),
    "corr": (lambda k: k.log.correlations(),
             lambda k, name: name if k.log.has_corr(name) else None),
    "provider": (lambda k: sorted(k.agents), lambda k, name: k.agents.get(name)),
    "cap": (lambda k: sorted(set(registry.providers(k.agents))
                             | set(k.federation.remote_providers())),
            lambda k, name: name if name in registry.providers(k.agents)
            or name in k.federation.remote_providers() else None),
    "query": (lambda k: [], lambda k, name: name if k.search is not None and name.strip()
              else None),
    "note": (lambda k, agent: k.memory.keys(agent),
             lambda k, name, agent: name if k.memory.get(agent, name) is not None else None),
    "peer": (lambda k: sorted(k.federation.peers), lambda k, name: k.federation.peers.get(name)),
    "freq": (lambda k: [c for c in k.federation.requests.by_corr if "/" not in c],
             lambda k, name: name if name in k.federation.requests.by_corr else None),
    "saga": (lambda k: sorted(k.federation.sagas.sagas),
             lambda k, name: k.federation.sagas.sagas.get(name)),
    "fheld": (lambda k: sorted(k.federation.governance.held),
              lambda k, name: k.federation.governance.held.get(name)),
    "fdead": (lambda k: sorted(k.federation.outbox.dead),
              lambda k, name: k.federation.outbox.dead.get(name)),
    "model": (lambda k: sorted(k.models.models), lambda k, name: k.models.model(name)),
    # the operator's alone: an agent never sees an approval, even its own, whatever it unveils
    "approval": (lambda k, me=None: k.approvals.ids() if me is None else [],
                 lambda k, name, me=None: k.approvals.get(name) if me is None else None),
    # a conversation is its opener's: others (but the operator) do not see it
    "conv": (lambda k, model, me=None: k.models.visible(model, me),
             lambda k, name, model, me=None: k.models.conversation(model, name, me)),
}
# Served but not listed: a mailbox lists its messages and new, next and dead, and
# programs count any other name there as a message
UNLISTED = {"agents/{agent}/mail/batch", "agents/{agent}/mail/ack",
            "agents/{agent}/mail/stream", "mail/batch", "mail/ack", "mail/stream"}
_ASKS = {var for var, fns in VARS.items()
         if any("me" in inspect.signature(f).parameters for f in fns)}


def _task_of(k, agent, name: str):
    if not (name.isascii() and name.isdigit()) or name != str(int(name)):
        return None  # one name per task: 0005 is not 5
    return finished.of(k, agent, int(name))

