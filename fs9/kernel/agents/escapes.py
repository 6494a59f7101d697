"""What confined agents tried and were refused, as audit events.

Two witnesses: the agent's sandbox reports each forbidden syscall it refused
(`escape_attempt`: mount, unshare, ptrace, open_by_handle_at, ...; the seccomp
filter refuses those before the kernel audits them, so they come once), and the
kernel's audit log reports every other syscall of an agent's uid that failed
with EACCES or EPERM (`escape_denied`): a Landlock denial (a file outside the
view) or a plain permission or capability check (a root-owned 0700 directory,
/proc/1/cwd, kill(1)). The second needs kernel audit switched on and fs9's audit
rules installed (drivers/auditrules.py, which also keeps tasks other than the
agents' programs from paying for them): fs9 does both at start when it can
(root), says so in the log, and removes its rules at stop; where it cannot, the
refusals still happen, they are just not witnessed, and the log says that too.

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

from ...drivers import auditrules, refusals
from ..rate import Burst
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel import Kernel

log = logging.getLogger("fs9.escapes")
BURST = 50  # denial events per agent per second; beyond, they are counted, not logged
QUERIES = {"access", "faccessat", "faccessat2"}
_PROC_PID = re.compile(r"^/proc/\d+/")


_attempts = Burst(BURST)


def attempt(kernel: "Kernel", agent, report: dict) -> None:
    """A program in agent's sandbox made a syscall the sandbox refuses (a flood of them
    is counted, not logged one by one: Burst)."""
    extra = _attempts.admit(agent.name, int(trio.current_time()))
    if extra is None:
        return
    kernel.log.append("escape_attempt", agent=agent.name, pid=report["pid"], **extra,
                      syscall=report["syscall"], comm=report["comm"],
                      reason=f"{report['syscall']}() refused (EPERM) by the sandbox")


def start_audit(kernel: "Kernel") -> bool:
    """Install fs9's audit rules for this kernel's agents (drivers/auditrules.py),
    before any agent program is forked, and log how it went. Whether refusals can be
    witnessed; watch_denials removes the rules when it ends."""
    try:
        installed = auditrules.install(*auditrules.uid_range(kernel.uid_slot))
    except OSError as e:
        kernel.log.append("audit_unavailable", reason=f"kernel audit: {e}; refused syscalls "
                                                      "of confined agents are not logged")
        return False
    if installed.foreign:
        log.warning("kernel audit has other users (auditd, rules not fs9's): every "
                    "process keeps its audit context and pays for fs9's audit rules")
    if not installed.was_on:
        kernel.log.append("audit_enabled", reason="kernel audit switched on to witness "
                                                  "refused syscalls of confined agents")
    return True


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


async def watch_denials(kernel: "Kernel") -> None:
    """Log each refused syscall of one of our agents' programs (by uid); until
    cancelled, then remove our audit rules."""
    window = collections.Counter()  # (agent, second, shape) -> /proc scans seen
    denials = Burst(BURST)
    try:
        async with refusals.Refusals() as reports:
            async for d in reports:
                if d.get("syscall") in QUERIES:
                    continue
                agent = kernel.uids.get(d.get("uid"))
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
                extra = denials.admit(agent.name, second)
                if extra is None:
                    continue
                kernel.log.append("escape_denied", agent=agent.name, pid=d.get("pid"), **extra,
                                  comm=d.get("comm"), syscall=d.get("syscall"),
                                  errno=d.get("errno"), path=path,
                                  blockers=d.get("blockers"), reason=_reason(d))
    except OSError as e:
        kernel.log.append("audit_unavailable", reason=f"reading kernel audit: {e}")
    finally:
        try:  # synchronous: runs even when cancelled
            auditrules.remove(*auditrules.uid_range(kernel.uid_slot))
        except OSError as e:
            log.warning("removing audit rules: %s", e)
