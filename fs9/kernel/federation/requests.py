"""What this OS asked of other OSs: each cross-OS work_request, its state as the
answers tell it, and where its answers go (callbacks).

A work_request to AGENT@OS may say where, on this OS, its answers go:
    on-status-change: NAME   each status_update to NAME's mailbox
    on-completion: NAME      the result to NAME's mailbox
NAME is `operator` or an agent of this OS the sender may write to (itself, or a
mailbox its view lets it write); unset, answers go to the sender, as for local mail.
The callbacks are kept here, on the requesting OS, and never taken from the answer:
the peer's answer names only the correlation id, and an answer routes by a request
only if it comes from the agent (or the federation) of the OS the request went to.

Status synchronisation: the request's state moves queued -> sent -> running -> done |
failed | cancelled | rejected, and never back. The answering kernel stamps each
answer with `x-seq` (its log's sequence number, increasing); an answer older than one
already taken, or a status_update after the result, is stale: recorded (`fed_stale`)
and delivered to nobody, so this OS never reports a state the other OS has left.

The record is the log's: a request is the `fed_queued` event of a work_request (its
callbacks in its data), each answer taken the `mail_sent` carrying `req`, `state` and
`seq`. federation/requests/CORR shows them; the most recent MAX_KEPT stay in memory.
"""
import errno
from collections import OrderedDict
from dataclasses import dataclass

from ...errors import Fs9Error
from ..names import NAME_RE, OPERATOR

MAX_KEPT = 10_000  # requests shown (the oldest ended ones leave memory, not the log)
TERMINAL = ("done", "failed", "cancelled", "rejected")
RANK = {"queued": 0, "sent": 1, "running": 2, **{s: 3 for s in TERMINAL}}
CALLBACKS = {"on-status-change": "on_status", "on-completion": "on_completion"}


@dataclass
class Request:
    id: str  # its message id
    corr: str
    to: str  # AGENT@OS
    sender: str  # who asked, on this OS
    on_status: str
    on_completion: str
    state: str = "queued"
    seq: int = -1  # the highest x-seq taken from the peer
    updates: int = 0
    stale: int = 0
    last: str = ""  # the latest status text (its first line)
    asked: int = 0  # its fed_queued's seq: an agent spawned after it is not who asked

    def line(self) -> str:
        return (f"to={self.to} sender={self.sender} state={self.state} updates={self.updates} "
                f"stale={self.stale} on_status_change={self.on_status or '-'} "
                f"on_completion={self.on_completion or '-'} last={self.last or '-'}")


def callbacks(kernel, sender: str, headers: dict[str, str]) -> dict[str, str]:
    """A work_request's callbacks as fed_queued fields, checked: EPERM for a mailbox
    the sender may not write, ENOENT for none (an agent: as for one it does not know)."""
    fields = {}
    for header, key in CALLBACKS.items():
        target = headers.get(header)
        if target is None:
            continue
        if headers.get("type") != "work_request":
            raise Fs9Error(errno.EINVAL, f"{header}: only on a work_request")
        author = kernel.agents.get(sender)
        if target != OPERATOR and (not NAME_RE.fullmatch(target)
                                   or kernel.bus.owner(target) is None
                                   or (author is not None and not kernel.knows(sender, target))):
            raise Fs9Error(errno.ENOENT, f"{header}: no such agent: {target}")
        if author is not None and target != sender:
            try:
                author.view.check_write(("agents", target, "mail", "new")
                                        if target != OPERATOR else ("mail", "new"))
            except Fs9Error:
                raise Fs9Error(errno.EPERM, f"{header}: {sender} may name itself or a "
                                            "mailbox it may write")
        fields[key] = target
    return fields


class Requests:
    def __init__(self, changes) -> None:
        self.changes = changes  # bumped as a request moves (sagas.py waits on it)
        self.by_corr: OrderedDict[str, dict[str, Request]] = OrderedDict()
        self.by_id: dict[str, Request] = {}  # the request's message id, until it is sent
        self.stale = 0

    def find(self, corr: str, origin: str, sender: str, to: str) -> Request | None:
        """The request an answer from SENDER@ORIGIN to TO (a local name) on corr answers:
        from the agent it went to, or from that OS's federation (a rejection)."""
        for r in self.by_corr.get(corr, {}).values():
            agent, _, osname = r.to.partition("@")
            if osname == origin and sender in (agent, "federation") and to == r.sender:
                return r
        return None

    def judge(self, r: Request, kind: str, status: str, seq: int) -> tuple[str, str, str]:
        """(target mailbox, new state, why stale or "") for an answer to r."""
        state = status if kind == "result" else "running"
        if kind == "result" and state not in TERMINAL:
            state = "failed"
        if RANK[r.state] == 3:
            return "", state, f"request {r.corr} to {r.to} is already {r.state}"
        if seq <= r.seq:
            return "", state, f"update {seq} is older than {r.seq}, already taken"
        target = (r.on_completion if kind == "result" else r.on_status) or r.sender
        return target, state, ""

    def text(self, corr: str) -> str:
        return "".join(r.line() + "\n" for r in self.by_corr.get(corr, {}).values())

    # --- applying events (through federation.py) ------------------------------

    def on_queued(self, e) -> None:
        d = e.data
        if d.get("type") != "work_request":
            return
        r = Request(d["id"], e.corr, d["to"], e.agent or OPERATOR,
                    d.get("on_status", ""), d.get("on_completion", ""), asked=e.seq)
        self.by_corr.setdefault(e.corr, {})[r.to] = r
        self.by_corr.move_to_end(e.corr)
        self.by_id[d["id"]] = r
        while len(self.by_corr) > MAX_KEPT:
            oldest = next(iter(self.by_corr))
            for old in self.by_corr.pop(oldest).values():
                self.by_id.pop(old.id, None)

    def on_sent(self, mid: str) -> None:
        r = self.by_id.pop(mid, None)
        if r is not None and r.state == "queued":
            r.state = "sent"
            self.changes.bump()

    def on_answer(self, d: dict, text: str) -> None:
        """A mail_sent that took an answer to a request (its `req` field)."""
        corr, to = d["req"].split(" ", 1)
        r = self.by_corr.get(corr, {}).get(to)
        if r is None:
            return
        r.state, r.seq = d["state"], max(r.seq, d.get("seq", -1))
        r.updates += 1
        r.last = text
        self.changes.bump()

    def on_stale(self, d: dict) -> None:
        self.stale += 1
        corr, to = d.get("req", " ").split(" ", 1)
        r = self.by_corr.get(corr, {}).get(to)
        if r is not None:
            r.stale += 1
