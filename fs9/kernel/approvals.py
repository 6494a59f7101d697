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
    timeout_s = 300       # then it is denied
"""
import errno
import time

import trio

from . import cmd
from ..errors import Fs9Error
from .names import one_line

ACTIONS = {"model_tokens": "a model call over this many tokens (prompt + reply limit)",
           "spawn": "true: spawning an agent (a `spawn` line in the root ctl)"}
KEYS = frozenset(ACTIONS) | {"timeout_s"}
TIMEOUT_S = 300.0
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
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise Fs9Error(errno.EINVAL, f"approval.{key} must be a number > 0")
    return table


class Approval:
    def __init__(self, id: str, e) -> None:
        d = e.data
        self.id, self.agent, self.action, self.key = id, e.agent, d["action"], d["key"]
        self.what, self.corr, self.requested = d["what"], e.corr or "", e.ts
        self.deadline = d["deadline"]
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
        self.items: dict[str, Approval] = {}
        self._next = 1
        self._changed = trio.Event()  # a new deadline to wait for

    def appliers(self) -> dict:
        return {"approval_requested": self._on_requested,
                "approval_answered": self._on_answered, "approval_used": self._on_used}

    def _on_requested(self, e, agent, task) -> None:
        self.items[str(self._next)] = Approval(str(self._next), e)
        self._next += 1

    def _on_answered(self, e, agent, task) -> None:
        a = self.items.get(e.data["id"])
        if a is not None:
            a.state, a.reason = e.data["answer"], e.data.get("reason", "")

    def _on_used(self, e, agent, task) -> None:
        a = self.items.get(e.data["id"])
        if a is not None:
            a.used = True

    def pending_of(self, agent: str) -> str:
        """agent's approvals waiting for an answer (its status): their ids."""
        return ",".join(a.id for a in self.items.values()
                        if a.agent == agent and a.state == "pending")

    def gate(self, agent, action: str, key: str, what: str, corr: str | None,
             use: bool) -> None:
        """Let agent's action (one its manifest says needs a yes: the caller checked)
        through if the operator approved it (the approval used up when `use`: a check
        before the action, like a request's first write, leaves it); else refuse it,
        asking the operator first if nobody was asked yet."""
        for a in reversed(list(self.items.values())):
            if (a.agent, a.action, a.key) != (agent.name, action, key) or a.used:
                continue
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
        timeout = agent.manifest.get("approval", {}).get("timeout_s", TIMEOUT_S)
        self.kernel.record("approval_requested", agent=agent.name, action=action, key=key,
                           what=one_line(what), corr=corr, deadline=time.time() + timeout)
        self._changed.set()
        a = list(self.items.values())[-1]
        raise Fs9Error(errno.EAGAIN, f"pending approval {a.id}: {what} (the operator "
                       f"answers in approvals/{a.id})")

    def ctl(self, a: Approval, data: bytes) -> None:
        """approvals/ID/ctl: the operator's approve or deny."""
        for p in cmd.parse(CMDS, data):
            if a.state != "pending":
                raise Fs9Error(errno.EINVAL, f"approval {a.id} is already {a.state}")
            self.kernel.record("approval_answered", agent=a.agent, id=a.id,
                               answer="approved" if p.cmd.verb == "approve" else "denied",
                               reason=one_line(" ".join(p.args)), corr=a.corr or None)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Deny what is past its deadline, when it is."""
        task_status.started()
        while True:
            now = time.time()
            for a in list(self.items.values()):
                if a.state == "pending" and a.deadline <= now:
                    self.kernel.record("approval_answered", agent=a.agent, id=a.id,
                                       answer="expired", reason="no answer by the deadline",
                                       corr=a.corr or None)
            waits = [a.deadline - now for a in self.items.values() if a.state == "pending"]
            self._changed = trio.Event()
            with trio.move_on_after(max(0.05, min(waits)) if waits else 3600):
                await self._changed.wait()
