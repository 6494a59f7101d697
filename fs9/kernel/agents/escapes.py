"""What confined agents tried and were refused, as audit events.

Two witnesses: the agent's sandbox reports each forbidden syscall it refused
(`escape_attempt`: mount, unshare, ptrace, open_by_handle_at, ...; the seccomp
filter refuses those before the kernel audits them, so they come once), and the
kernel's audit log reports every other syscall of an agent's uid that failed
with EACCES or EPERM (`escape_denied`): a Landlock denial (a file outside the
view) or a plain permission or capability check (a root-owned 0700 directory,
/proc/1/cwd, kill(1)). The second needs kernel audit switched on and fs9's audit
rules installed: fs9 does both at start when it can (root), says so in the log,
and removes its rules at stop; where it cannot, the refusals still happen, they
are just not witnessed, and the log says that too.

Cost: a task with an audit context pays on every syscall as long as any audit
rule exists, so fs9 also installs task rules giving no context to any task forked
from then on whose login uid (auid) is not an agent uid (AGENT_UIDS, shared by
every fs9 on the machine, so that several compose): only the agents' programs,
whose zygote sets the auid to the agent's uid before forking them, are audited
and pay. The rules act at fork only: a task forked before them (fs9 itself,
unless another fs9's rules were in place when it started; a shell started
earlier) keeps its context and pays as before; every task forked afterwards (a
new shell, fs9's new threads, the zygotes) pays nothing. The exemption would
also blind other users of kernel audit (auditd): it is skipped when there are
any. It is shared: the last fs9 to stop removes it (if one stops while another
starts, it may go early: tasks then get contexts again, nothing is missed).

Noise: access()/faccessat() failures are dropped (they only ask whether something
is allowed; whatever the program then tries is audited itself), and a scan of
/proc/<pid>/... (`ps`, `top` read every process's environ) is logged once per
second and syscall, not once per process. Refusals by fs9's own file system
(a path under the mount, e.g. writing a read-only file of the view) are left to
fs9, which logs them itself (`refused`); Landlock denials are always logged.
"""
import collections
import errno
import logging
import os
import re

import trio

from ...drivers import audit, confine

log = logging.getLogger("fs9.escapes")
BURST = 50  # denial events per agent per second; beyond, they are counted, not logged
QUERIES = {"access", "faccessat", "faccessat2"}
_PROC_PID = re.compile(r"^/proc/\d+/")


def attempt(kernel, agent, report: dict) -> None:
    """A program in agent's sandbox made a syscall the sandbox refuses."""
    kernel.log.append("escape_attempt", agent=agent.name, pid=report["pid"],
                      syscall=report["syscall"], comm=report["comm"],
                      reason=f"{report['syscall']}() refused (EPERM) by the sandbox")


# Every uid confine.uid_of can give, whatever the state directory: the auids audited.
AGENT_UIDS = (confine.UID_BASE, confine.UID_BASE + 10_000 * 10_000 - 1)


def uid_range(kernel) -> tuple[int, int]:
    """The uids this fs9's agents' programs may run as."""
    lo = confine.uid_of(kernel.state_dir, 0)
    return lo, lo + 9_999


def _fs9s(rule) -> bool:
    """Whether an audit rule is one an fs9 installs (its exit rules, the exemption)."""
    listnr, action, fields = rule
    if listnr == audit.AUDIT_FILTER_FS:
        return len(fields) == 1 and fields[0][:2] == (audit.AUDIT_FSTYPE, audit.AUDIT_EQUAL) \
            and fields[0][2] in audit.UNRECORDED_FS
    if listnr == audit.AUDIT_FILTER_TASK:
        return action == audit.AUDIT_NEVER and fields in (
            [(audit.AUDIT_LOGINUID, audit.AUDIT_LESS_THAN, AGENT_UIDS[0])],
            [(audit.AUDIT_LOGINUID, audit.AUDIT_GREATER_THAN, AGENT_UIDS[1])])
    uids = [v for f, _, v in fields if f == audit.AUDIT_UID]
    return listnr == audit.AUDIT_FILTER_EXIT and len(uids) == 2 and \
        all(AGENT_UIDS[0] <= uid <= AGENT_UIDS[1] for uid in uids)


def exempt_others() -> bool:
    """Install the exemption alone (for `fs9 mount`, before it forks the server), if
    kernel audit has no other users. Whether it is in place."""
    try:
        if audit.status()["pid"] or not all(_fs9s(r) for r in audit.rules()):
            return False
        audit.exempt_all_but(*AGENT_UIDS)
        return True
    except OSError:
        return False


def start_audit(kernel) -> bool:
    """Turn on kernel audit and install the rules reporting our agents' refused
    syscalls, before any agent program is forked (a process forked while audit
    was off is never audited), and, first, the exemption of every task forked
    from now on but agents' programs (see the module doc). Whether refusals can
    be witnessed. Idempotent; undo: stop_audit."""
    try:
        foreign = audit.status()["pid"] or not all(_fs9s(r) for r in audit.rules())
        if not foreign:
            audit.exempt_all_but(*AGENT_UIDS)
        was_on = audit.enable()
        audit.add_rules(*uid_range(kernel))
    except OSError as e:
        kernel.log.append("audit_unavailable", reason=f"kernel audit: {e}; refused syscalls "
                                                      "of confined agents are not logged")
        return False
    if foreign:
        log.warning("kernel audit has other users (auditd, rules not fs9's): every "
                    "process keeps its audit context and pays for fs9's audit rules")
    if not was_on:
        kernel.log.append("audit_enabled", reason="kernel audit switched on to witness "
                                                  "refused syscalls of confined agents")
    return True


def stop_audit(kernel) -> None:
    """Remove our audit rules (they outlive fs9 otherwise), and the exemption unless
    another fs9's rules remain; audit itself stays on. Idempotent."""
    try:
        audit.del_rules(*uid_range(kernel))
        if not any(_fs9s(r) and r[0] == audit.AUDIT_FILTER_EXIT for r in audit.rules()):
            audit.unexempt(*AGENT_UIDS)
    except OSError as e:
        log.warning("removing audit rules: %s", e)


def _reason(d: dict) -> str:
    if d.get("blockers"):
        return f"{d['blockers']} of {d.get('path')} outside the view denied by Landlock"
    code = getattr(errno, d.get("errno") or "", 0)
    why = f"({d.get('errno')}: {os.strerror(code).lower()})" if code else "(failed)"
    call = d.get("syscall")
    # registers as logged: an int argument (a pid) is its low 32 bits, signed
    args = [(a & 0xFFFFFFFF) - ((a & 0x80000000) << 1) for a in d.get("args") or [0, 0]]
    if d.get("path"):
        return f"{call}({d['path']}) refused {why}"
    if call in ("kill", "tkill"):
        return f"{call}(pid {args[0]}, signal {args[1]}) refused {why}"
    if call == "tgkill":
        return f"tgkill(pid {args[0]}, tid {args[1]}) refused {why}"
    if call == "ptrace":
        return f"ptrace(request {args[0]}, pid {args[1]}) refused {why}"
    return f"{call}() refused {why}"


async def watch_denials(kernel) -> None:
    """Log each refused syscall of one of our agents' programs (by uid); until
    cancelled, then remove our audit rules."""
    window = collections.Counter()  # (agent, second) -> events seen; (agent, second, shape) too
    try:
        async with audit.Refusals() as refusals:
            async for d in refusals:
                if d.get("syscall") in QUERIES:
                    continue
                agent = next((a for a in kernel.agents.values() if a.uid == d.get("uid")), None)
                if agent is None:
                    continue  # not ours (another fs9, another sandbox, a stopped agent)
                path = d.get("path")  # under the mount: fs9's own refusal (also logged as
                # `refused`), or the kernel's past a symlink leading out: keep both
                second = int(trio.current_time())
                if len(window) > 4096:
                    window.clear()
                if path and _PROC_PID.match(path):
                    shape = (agent.name, second, d.get("syscall"), _PROC_PID.sub("/proc/*/", path))
                    window[shape] += 1
                    if window[shape] > 1:
                        continue
                window[agent.name, second] += 1
                if window[agent.name, second] > BURST:
                    continue
                kernel.log.append("escape_denied", agent=agent.name, pid=d.get("pid"),
                                  comm=d.get("comm"), syscall=d.get("syscall"),
                                  errno=d.get("errno"), path=path,
                                  blockers=d.get("blockers"), reason=_reason(d))
    except OSError as e:
        kernel.log.append("audit_unavailable", reason=f"reading kernel audit: {e}")
    finally:
        stop_audit(kernel)  # synchronous: runs even when cancelled
