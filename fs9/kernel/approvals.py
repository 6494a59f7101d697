"""Human approval as files: an action an agent's manifest says needs a person's yes
waits for the operator's answer in `approvals/ID`.

Plan 9's factotum asks through its `confirm` file, OpenAI's agents SDK marks a tool
`needs_approval`; here the request is a file any tool can read (`approvals/ID/status`:
what, who, why, the data it concerns, its correlation id, its deadline) and answer
(`echo approve > approvals/ID/ctl`, or `deny [REASON]`). Only the operator sees and
answers them: never an agent, whatever it unveils.

The agent is not blocked: the action is refused with EAGAIN and "pending approval
ID" (the llm driver's tool result says the same), and trying the same action again
once approved goes through, using the approval up (one yes, one action). A denied
request answers the next try with EACCES and the operator's reason; one past its
deadline (the manifest's `timeout_s`, default 300 s) is denied by default. Every
request, answer and use is an event (`approval_requested`, `approval_answered`,
`approval_used`), applied at replay: pending approvals and their deadlines survive a
remount.

Manifest:
    [approval]
    model_tokens = 2000   # a model call of more tokens (prompt + reply limit) needs a yes
    spawn = true          # so does each agent it spawns (the `spawn` line is the data)
    mail_above = "public" # mail it sends classified above this label (recipient, label)
    vault_write = ["vault/reports"]  # a change under these vault paths (the path)
    tools = ["write", "send"]  # these tools of the llm driver (the call; agents/NAME/approve)
    timeout_s = 300       # then it is denied

Held in memory: the approvals still to be answered or used, indexed by (agent, action,
data) so a gated action costs one lookup, and the latest RECENT ones used up, so the
operator can read what was just decided; older ones are in the log only.
"""
import collections
import errno
import functools
import heapq
import json
import time

import trio

from . import cmd
from ..errors import Fs9Error
from .bus.message import CLASSIFICATIONS
from .names import one_line

ACTIONS = {"model_tokens": "a model call over this many tokens (prompt + reply limit)",
           "spawn": "true: spawning an agent (a `spawn` line in the root ctl)",
           "mail_above": "a label: mail sent classified above it",
           "vault_write": "vault paths: a change of a file or folder under one of them",
           "tools": "names of the llm driver's tools: a call of one of them"}
KEYS = frozenset(ACTIONS) | {"timeout_s"}
TIMEOUT_S = 300.0
MAX_CALL = 4096  # characters of a tool call the operator is asked about
PENDING_MAX = 32  # approvals one agent may have waiting for an answer at once
RECENT = 100  # approvals used up kept in memory (listed in approvals/); the rest: the log
CMDS = (cmd.Cmd("approve", "approve", 0, None, usage="approve [REASON]"),
        cmd.Cmd("deny", "deny", 0, None, usage="deny [REASON]"))


def policy(manifest: dict) -> dict:
    """The manifest's [approval] table, checked (EINVAL says what is wrong)."""
    table = manifest.get("approval", {})
    if not isinstance(table, dict) or set(table) - KEYS:
        raise Fs9Error(errno.EINVAL, f"approval must be a table of {', '.join(sorted(KEYS))}")
    for key, value in table.items():
        if key == "spawn":
            if not isinstance(value, bool):
                raise Fs9Error(errno.EINVAL, "approval.spawn must be true or false")
        elif key == "mail_above":
            if value not in CLASSIFICATIONS[:-1]:
                raise Fs9Error(errno.EINVAL, "approval.mail_above must be one of "
                                             f"{', '.join(CLASSIFICATIONS[:-1])}")
        elif key in ("vault_write", "tools"):
            if not isinstance(value, list) or not all(
                    isinstance(v, str) and v.strip("/") for v in value):
                raise Fs9Error(errno.EINVAL, f"approval.{key} must be a list of names")
            if key == "vault_write" and not all(
                    v.strip("/").split("/")[0] == "vault" for v in value):
                raise Fs9Error(errno.EINVAL, "approval.vault_write: paths under vault/")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise Fs9Error(errno.EINVAL, f"approval.{key} must be a number > 0")
    return table


def mail_needs(agent, level: str) -> bool:
    """agent's mail classified `level` needs a yes (approval.mail_above)."""
    above = agent.manifest.get("approval", {}).get("mail_above")
    return above is not None and CLASSIFICATIONS.index(level) > CLASSIFICATIONS.index(above)


def vault_needs(agent, path: tuple[str, ...]) -> bool:
    """A change at the namespace path (vault, ...) needs a yes (approval.vault_write)."""
    paths = agent.manifest.get("approval", {}).get("vault_write")
    return bool(paths) and any(path[:len(p)] == p for p in _split(tuple(paths)))


def vault_gated(agent) -> tuple[tuple[str, ...], ...]:
    """The vault paths under which agent's changes need a yes (approval.vault_write)."""
    return _split(tuple(agent.manifest.get("approval", {}).get("vault_write") or ()))


@functools.lru_cache(maxsize=1024)
def _split(paths: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Paths as tuples of names (once per manifest: this is on every vault write)."""
    return tuple(tuple(p.strip("/").split("/")) for p in paths)


def tool_call(data: bytes) -> tuple[str, str]:
    """agents/NAME/approve: one JSON object {"tool": NAME, "args": {...}}: (the tool, the
    call as one line: the approval's data); EINVAL if it is not."""
    try:
        call = json.loads(data)
    except (ValueError, RecursionError):
        call = None
    if not isinstance(call, dict) or not isinstance(call.get("tool"), str):
        raise Fs9Error(errno.EINVAL, 'approve: expected {"tool": NAME, "args": {...}}')
    return call["tool"], one_line(f"{call['tool']} {json.dumps(call.get('args'), sort_keys=True)}")


class Approval:
    def __init__(self, id: str, e) -> None:
        d = e.data
        self.id, self.agent, self.action, self.key = id, e.agent, d["action"], d["key"]
        self.what, self.corr, self.requested = d["what"], e.corr or "", e.ts
        self.deadline = d["deadline"]
        self.size = d.get("size")  # the most a yes covers (a model call's tokens), or None
        self.state, self.reason, self.used = "pending", "", False

    def status(self) -> str:
        fields = {"id": self.id, "state": self.state, "agent": self.agent,
                  "action": self.action, "data": self.key, "corr": self.corr,
                  "requested": _iso(self.requested), "deadline": _iso(self.deadline),
                  "used": "yes" if self.used else "no", "what": self.what,
                  "reason": self.reason}
        return "".join(f"{k}={v}\n" for k, v in fields.items())


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Approvals:
    """The approvals asked for, answered and used, rebuilt from the log."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.live: dict[str, Approval] = {}  # id -> not yet used up (pending or answered)
        self.by_action: dict[tuple[str, str, str], Approval] = {}  # (agent, action, data)
        self.pending: dict[str, dict[str, Approval]] = {}  # agent -> id -> awaiting a yes
        self.unused: collections.Counter[str] = collections.Counter()  # agent -> live ones
        self.recent: collections.OrderedDict[str, Approval] = collections.OrderedDict()
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, id) once pending
        self._next = 1
        self._changed = trio.Event()  # a new deadline to wait for

    def ids(self) -> list[str]:
        """approvals/: the live ones and the recent used up, oldest first."""
        return sorted([*self.live, *self.recent], key=int)

    def get(self, id: str) -> "Approval | None":
        return self.live.get(id) or self.recent.get(id)

    def appliers(self) -> dict:
        return {"approval_requested": self._on_requested,
                "approval_answered": self._on_answered, "approval_used": self._on_used}

    def _on_requested(self, e, agent, task) -> None:
        a = Approval(str(self._next), e)
        self._next += 1
        self.live[a.id] = self.by_action[(a.agent, a.action, a.key)] = a
        self.pending.setdefault(a.agent, {})[a.id] = a
        self.unused[a.agent] += 1
        heapq.heappush(self._deadlines, (a.deadline, int(a.id)))

    def _on_answered(self, e, agent, task) -> None:
        a = self.live.get(e.data["id"])
        if a is not None:
            a.state, a.reason = e.data["answer"], e.data.get("reason", "")
            self._unpend(a)

    def _on_used(self, e, agent, task) -> None:
        a = self.live.pop(e.data["id"], None)
        if a is None:
            return
        a.used = True
        self._unpend(a)
        self.unused[a.agent] -= 1
        if self.unused[a.agent] <= 0:
            del self.unused[a.agent]
        if self.by_action.get((a.agent, a.action, a.key)) is a:
            del self.by_action[(a.agent, a.action, a.key)]
        self.recent[a.id] = a
        if len(self.recent) > RECENT:
            self.recent.popitem(last=False)

    def _unpend(self, a: Approval) -> None:
        mine = self.pending.get(a.agent)
        if mine is not None and mine.pop(a.id, None) is not None and not mine:
            del self.pending[a.agent]

    def pending_of(self, agent: str) -> str:
        """agent's approvals waiting for an answer (its status): their ids."""
        return ",".join(self.pending.get(agent, ()))

    def gate(self, agent, action: str, key: str, what: str, corr: str | None,
             use: bool, size: int | None = None) -> None:
        """Let agent's action (one its manifest says needs a yes: the caller checked)
        through if the operator approved it (the approval used up when `use`: a check
        before the action, like a request's first write, leaves it); else refuse it,
        asking the operator first if nobody was asked yet. An action with a size (a model
        call's tokens) is covered by a yes given for at least that size: a larger one
        retires the yes and is asked for anew. One lookup, whatever the number of
        approvals."""
        a = self.by_action.get((agent.name, action, key))
        if a is not None and a.state == "approved" and size is not None \
                and a.size is not None and size > a.size:
            self.kernel.record("approval_used", agent=agent.name, id=a.id, outgrown=size)
            a = None
        if a is not None:
            if a.state == "pending":
                raise Fs9Error(errno.EAGAIN, f"pending approval {a.id}: {what} (the "
                               f"operator answers in approvals/{a.id}; try again then)")
            if a.state == "approved":
                if use:
                    self.kernel.record("approval_used", agent=agent.name, id=a.id)
                return
            # denied or expired: said once, then a new try asks again
            self.kernel.record("approval_used", agent=agent.name, id=a.id)
            raise Fs9Error(errno.EACCES, f"approval {a.id} {a.state}"
                           + (f": {a.reason}" if a.reason else ""))
        if self.unused[agent.name] >= PENDING_MAX:
            # a prompt-injected agent must not bury the operator (or the log) in requests:
            # its oldest answered no (denied, expired) goes first, unsaid; pending ones and
            # yeses not used yet stay, and past PENDING_MAX of those, no more are asked
            said_no = next((a for a in self.live.values() if a.agent == agent.name
                            and a.state in ("denied", "expired")), None)
            if said_no is None:
                raise Fs9Error(errno.EDQUOT, f"{PENDING_MAX} approvals of agent "
                                             f"{agent.name} are pending or unused already: no "
                                             f"more asked until some are answered ({what})")
            self.kernel.record("approval_used", agent=agent.name, id=said_no.id)
        timeout = agent.manifest.get("approval", {}).get("timeout_s", TIMEOUT_S)
        self.kernel.record("approval_requested", agent=agent.name, action=action, key=key,
                           what=one_line(what), corr=corr, deadline=time.time() + timeout,
                           **({"size": size} if size is not None else {}))
        self._changed.set()
        a = self.by_action[(agent.name, action, key)]
        raise Fs9Error(errno.EAGAIN, f"pending approval {a.id}: {what} (the operator "
                       f"answers in approvals/{a.id})")

    def owner_killed(self, name: str) -> None:
        """Agent `name` was killed: its live approvals (asked, or yeses not yet used) go
        with it; the name's next holder asks anew (they are found by name)."""
        mine = [a for a in self.live.values() if a.agent == name]
        items = [("approval_answered", dict(agent=name, id=a.id, answer="expired",
                                            reason="agent killed", corr=a.corr or None))
                 for a in mine if a.state == "pending"]
        items += [("approval_used", dict(agent=name, id=a.id)) for a in mine]
        if items:
            self.kernel.record_many(items)

    def tool(self, agent, data: bytes, by: str | None) -> None:
        """agents/NAME/approve, written by the agent before it runs a tool call (the llm
        driver does): the write succeeds if the tool needs no yes or has one (used up);
        EAGAIN while it is asked for, EACCES once denied."""
        if by != agent.name:  # another's yes is not its to use up
            raise Fs9Error(errno.EPERM, f"only agent {agent.name} asks for its tool calls")
        tool, line = tool_call(data)
        if tool not in agent.manifest.get("approval", {}).get("tools", ()):
            return
        if len(line) > MAX_CALL:  # the operator reads the whole call before saying yes
            raise Fs9Error(errno.EFBIG, f"tool call over {MAX_CALL} characters: too long "
                                        "to ask the operator about")
        self.gate(agent, "tool", line, f"tool call {line}",
                  agent.current.corr if agent.current else None, True)

    def ctl(self, a: Approval, data: bytes) -> None:
        """approvals/ID/ctl: the operator's approve or deny."""
        for p in cmd.parse(CMDS, data):
            if a.state != "pending":
                raise Fs9Error(errno.EINVAL, f"approval {a.id} is already {a.state}")
            self.kernel.record("approval_answered", agent=a.agent, id=a.id,
                               answer="approved" if p.cmd.verb == "approve" else "denied",
                               reason=one_line(" ".join(p.args)), corr=a.corr or None)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Deny what is past its deadline, when it is (the earliest deadline first)."""
        task_status.started()
        heap = self._deadlines
        while True:
            now = time.time()
            while heap and heap[0][0] <= now:
                _, id = heapq.heappop(heap)
                a = self.live.get(str(id))
                if a is not None and a.state == "pending":
                    self.kernel.record("approval_answered", agent=a.agent, id=a.id,
                                       answer="expired", reason="no answer by the deadline",
                                       corr=a.corr or None)
            self._changed = trio.Event()
            with trio.move_on_after(max(0.05, heap[0][0] - now) if heap else 3600):
                await self._changed.wait()
