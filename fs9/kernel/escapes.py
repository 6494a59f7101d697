"""What confined agents tried and were refused, as audit events.

Two witnesses: the agent's sandbox reports each forbidden syscall it refused
(`escape_attempt`: mount, unshare, ptrace, open_by_handle_at, ...), and the
kernel's audit log reports each Landlock denial (`escape_denied`: a file outside
the view). The second needs kernel audit switched on: fs9 turns it on at start
when it can (root), and says so in the log; where it cannot, the denials still
happen, they are just not witnessed, and the log says that too.
"""
import collections
import logging

import trio

from ..drivers import audit

log = logging.getLogger("fs9.escapes")
BURST = 50  # denial events per agent per second; beyond, they are counted, not logged


def attempt(kernel, agent, report: dict) -> None:
    """A program in agent's sandbox made a syscall the sandbox refuses."""
    kernel.log.append("escape_attempt", agent=agent.name, pid=report["pid"],
                      syscall=report["syscall"], comm=report["comm"],
                      reason=f"{report['syscall']}() refused (EPERM) by the sandbox")


def start_audit(kernel) -> bool:
    """Turn on kernel audit, before any agent program is forked (a process forked
    earlier is never audited). Whether denials can be witnessed."""
    try:
        was_on = audit.enable()
    except OSError as e:
        kernel.log.append("audit_unavailable", reason=f"kernel audit: {e}; Landlock denials "
                                                      "are enforced but not logged")
        return False
    if not was_on:
        kernel.log.append("audit_enabled", reason="kernel audit switched on to witness "
                                                  "Landlock denials of confined agents")
    return True


async def watch_denials(kernel) -> None:
    """Log each Landlock denial of one of our agents' programs (by uid); until cancelled."""
    window = collections.Counter()  # (agent, second) -> denials seen
    try:
        async with audit.LandlockDenials() as denials:
            async for d in denials:
                agent = next((a for a in kernel.agents.values() if a.uid == d.get("uid")), None)
                if agent is None:
                    continue  # not ours (another fs9, another sandbox)
                key = (agent.name, int(trio.current_time()))
                window[key] += 1
                if len(window) > 1024:
                    window.clear()
                if window[key] > BURST:
                    continue
                kernel.log.append("escape_denied", agent=agent.name, pid=d.get("pid"),
                                  comm=d.get("comm"), path=d.get("path"),
                                  blockers=d.get("blockers"),
                                  reason=f"{d.get('blockers')} of {d.get('path')} "
                                         "outside the view denied by Landlock")
    except OSError as e:
        kernel.log.append("audit_unavailable", reason=f"reading kernel audit: {e}")
