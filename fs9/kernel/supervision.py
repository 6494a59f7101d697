"""Supervision trees: the kernel's side of supervisor.py's decisions.

A supervisor is an agent with `mode = "supervisor"`: it runs no program; its manifest
names its children (agents it spawns with itself, in order), a strategy and an
intensity (max_restarts within within_s). When a supervised daemon's run ends and its
restart type says restart, its supervisor applies its strategy; past its intensity it
gives up: its subtree is stopped, it fails, and its own supervisor treats that as the
death of a child (restarting the subtree, or giving up in turn). A supervisor nobody
supervises, and a daemon nobody supervises, escalate to the kernel: an `escalated`
event and a message of type `escalation` in the operator's mail/.
Every change goes through Kernel.record (agent_start, agent_restart, agent_stop,
agent_failed); `supervisor_restart` and `escalated` are for the record.
"""
import errno

import trio

from ..errors import Fs9Error
from .agents import spawn, view as views
from .names import OPERATOR
from . import supervisor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .agents.agent import Agent
    from .kernel import Kernel


def plan(kernel: "Kernel", name: str, *overrides: str, by: str | None = None,
         depth: int = 0) -> list[tuple[str, dict, str, str | None]]:
    """Check the spawn of NAME and, for a supervisor, of its whole subtree; nothing
    changes. [(name, manifest, home, its supervisor)] in spawn order (parents first)."""
    manifest, home = spawn.prepare(kernel, name, *overrides, by=by)
    out = [(name, manifest, home, None)]
    if manifest["mode"] != "supervisor":
        return out
    if by is not None:
        raise Fs9Error(errno.EPERM, f"agent {by} may not start the supervisor {name}: "
                                    "supervision trees are the operator's")
    if depth >= supervisor.MAX_DEPTH:
        raise Fs9Error(errno.EINVAL, f"supervisor {name}: supervisors nested deeper than "
                                     f"{supervisor.MAX_DEPTH} (a definition that contains itself?)")
    for child in supervisor.children(manifest["children"]):
        if child.name in kernel.agents:
            raise Fs9Error(errno.EEXIST, f"supervisor {name}: its child {child.name!r} "
                                         "exists already")
        sub = plan(kernel, child.name, f"def={child.definition}", depth=depth + 1)
        out += [(sub[0][0], sub[0][1], sub[0][2], name)] + sub[1:]
    names = [n for n, *_ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise Fs9Error(errno.EEXIST, f"supervisor {name}: the name {twice[0]!r} is used twice "
                                     "in its tree")
    owns = [(n, claim) for n, m, *_ in out for claim in views.parse(n, m).owns]
    for i, (a, claim) in enumerate(owns):
        for b, other in owns[i + 1:]:
            if claim[:len(other)] == other or other[:len(claim)] == claim:
                raise Fs9Error(errno.EBUSY, f"{'/'.join(claim)} ({a}) overlaps "
                                            f"{'/'.join(other)} ({b}): a vault subtree has "
                                            "exactly one owner")
    return out


def children(kernel: "Kernel", agent: "Agent") -> list["Agent"]:
    """The agents a supervisor supervises, in start order (those killed are gone)."""
    if not agent.supervises:
        return []
    found = (kernel.agents.get(c.name) for c in supervisor.children(agent.manifest["children"]))
    return [a for a in found if a is not None and a.supervisor == agent.name]


def subtree(kernel: "Kernel", agent: "Agent") -> list["Agent"]:
    """agent and everything below it, parents first."""
    return [agent] + [a for c in children(kernel, agent) for a in subtree(kernel, c)]


def parent(kernel: "Kernel", agent: "Agent") -> "Agent | None":
    return kernel.agents.get(agent.supervisor) if agent.supervisor else None


def shutdown_s(kernel: "Kernel", agent: "Agent") -> float:
    """Seconds from SIGTERM to SIGKILL when agent's run is ended: its supervisor's
    `shutdown` for it, else the default."""
    sup = parent(kernel, agent)
    spec = sup and next((c for c in supervisor.children(sup.manifest["children"])
                         if c.name == agent.name), None)
    return spec.shutdown_s if spec else supervisor.SHUTDOWN_DEFAULT_S


# --- a daemon's run ended by itself ------------------------------------------------

def exited(kernel: "Kernel", agent: "Agent", status: int) -> None:
    """A daemon's run ended with `status` (not by a command): restart it, or not, as its
    restart type, its supervisor (or, with none, its own intensity) decides."""
    why = f"exited {status}"
    if not supervisor.should_restart(agent.manifest["restart"], status):
        kernel.record("agent_exit", agent=agent.name, exit=status)
        return
    sup = parent(kernel, agent)
    if sup is not None:
        if sup.runnable():
            died(kernel, sup, agent, why)
        else:  # its supervisor is stopped or failed: nobody restarts it
            kernel.record("agent_stop", agent=agent.name,
                          reason=f"{why}; its supervisor {sup.name} is {sup.state}")
        return
    if agent.window.add(trio.current_time()):
        kernel.record("agent_restart", agent=agent.name, exit=status,
                      policy=agent.manifest["restart"])
        return
    reason = (f"{why}; more than {agent.window.max_restarts} restarts within "
              f"{agent.window.within_s}s: supervisor gave up (escalated)")
    kernel.record("agent_failed", agent=agent.name, exit=status, reason=reason)
    escalate(kernel, agent, reason)


def died(kernel: "Kernel", sup: "Agent", child: "Agent", why: str) -> None:
    """Child of sup died (and its restart type says restart): apply sup's strategy, or
    give up past sup's intensity."""
    if not sup.window.add(trio.current_time()):
        give_up(kernel, sup, f"{child.name} {why}; more than {sup.window.max_restarts} "
                             f"restarts within {sup.window.within_s}s")
        return
    kids = children(kernel, sup)
    terminate, start = supervisor.plan(
        sup.manifest["strategy"], [(c.name, c.manifest["restart"]) for c in kids], child.name)
    kernel.log.append("supervisor_restart", agent=sup.name, child=child.name,
                      strategy=sup.manifest["strategy"], restarted=start,
                      terminated=[n for n in terminate if n not in start], reason=why)
    for name in terminate:
        if name not in start:  # a temporary sibling: ended, not started again
            stop_tree(kernel, kernel.agents[name],
                      f"terminated by {sup.name} ({sup.manifest['strategy']})")
    for name in start:
        restart_tree(kernel, kernel.agents[name])


def give_up(kernel: "Kernel", sup: "Agent", why: str) -> None:
    """sup's intensity is exceeded: its children stop, it fails, and its supervisor
    decides (or, with none, the kernel escalates to the operator)."""
    for child in reversed(children(kernel, sup)):
        stop_tree(kernel, child, f"its supervisor {sup.name} gave up")
    reason = f"{why}: supervisor gave up (escalated)"
    kernel.record("agent_failed", agent=sup.name, reason=reason)
    above = parent(kernel, sup)
    if above is not None and above.runnable():
        died(kernel, above, sup, f"gave up ({why})")
    else:
        escalate(kernel, sup, reason)


def escalate(kernel: "Kernel", agent: "Agent", reason: str) -> None:
    """The top of a tree gave up: an event, and a message in the operator's mail/."""
    kernel.log.append("escalated", agent=agent.name, reason=reason)
    body = (f"{agent.name} failed: {reason}\n\n"
            f"{render(kernel, [agent])}\n"
            f"echo start > agents/{agent.name}/ctl starts it (and its subtree) again.\n")
    kernel.bus.deliver(kernel.bus.compose(OPERATOR, agent.name, body.encode(),
                                          type="escalation", subject=f"{agent.name} failed"))


# --- acting on a subtree -----------------------------------------------------------

def stop_tree(kernel: "Kernel", agent: "Agent", reason: str) -> None:
    """Stop agent and, for a supervisor, its subtree (children last started, first)."""
    for child in reversed(children(kernel, agent)):
        stop_tree(kernel, child, reason)
    if not agent.stopped:
        kernel.record("agent_stop", agent=agent.name, reason=reason)
        agent._cancel_run("cancelled")


def start_tree(kernel: "Kernel", agent: "Agent") -> None:
    """Start agent (clearing a failure) and then its subtree, in start order."""
    kernel.record("agent_start", agent=agent.name)
    for child in children(kernel, agent):
        start_tree(kernel, child)


def restart_tree(kernel: "Kernel", agent: "Agent") -> None:
    """Restart agent: a supervisor starts afresh (a clean slate, its failure cleared)
    and restarts its children in order; a stopped or failed child starts again; a
    running one's run ends (its shutdown) and starts again."""
    if agent.stopped or agent.failed:
        kernel.record("agent_start", agent=agent.name)
    kernel.record("agent_restart", agent=agent.name)
    agent._cancel_run("requeue")
    for child in children(kernel, agent):
        restart_tree(kernel, child)


# --- what the files show -------------------------------------------------------------

def render(kernel: "Kernel", tops: "list[Agent] | None" = None) -> str:
    """The root `tree`: each tree from its top, a child indented under its supervisor:
    `NAME STATE restarts=N`, and for a supervisor `strategy=S intensity=N/Ts`."""
    if tops is None:
        tops = [a for _, a in sorted(kernel.agents.items()) if parent(kernel, a) is None]
    lines: list[str] = []

    def walk(agent: "Agent", depth: int) -> None:
        m = agent.manifest
        extra = f" strategy={m['strategy']} intensity={m['max_restarts']}/{m['within_s']}s" \
            if agent.supervises else ""
        lines.append(f"{'  ' * depth}{agent.name} {agent.state} restarts={agent.restarts}{extra}")
        for child in children(kernel, agent):
            walk(child, depth + 1)
    for top in tops:
        walk(top, 0)
    return "".join(line + "\n" for line in lines)


def supervisor_text(kernel: "Kernel", agent: "Agent", me: str | None) -> str:
    """agents/NAME/supervisor: its supervisor's name (empty: the kernel's own), as `me`
    may know of it."""
    sup = parent(kernel, agent)
    return f"{sup.name}\n" if sup and (me is None or kernel.knows(me, sup.name)) else ""


def children_text(kernel: "Kernel", agent: "Agent", me: str | None) -> str:
    """agents/NAME/children: the agents it supervises, one per line, in start order."""
    return "".join(f"{c.name}\n" for c in children(kernel, agent)
                   if me is None or kernel.knows(me, c.name))
