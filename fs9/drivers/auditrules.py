"""fs9's kernel audit rules: installed so the kernel reports confined agents' refused
syscalls (drivers/audit.py reads the reports), removed when fs9 stops.

Plain functions over a uid range: each returns what it did or raises OSError (no
root, no audit in this kernel); the caller says so in its log.

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
"""
from typing import NamedTuple

from . import audit, uidslots

# Every uid an agent of any fs9 instance can have (uidslots.uid_base): the auids audited.
AGENT_UIDS = (uidslots.UID_BASE, uidslots.UID_BASE + uidslots.SLOTS * uidslots.SLOT_SIZE - 1)


class Installed(NamedTuple):
    """What `install` found: audit was on already; it has users other than fs9s."""
    was_on: bool
    foreign: bool


def uid_range(slot: int) -> tuple[int, int]:
    """The uids the agents' programs of the fs9 owning uid slot may run as."""
    lo = uidslots.uid_base(slot)
    return lo, lo + uidslots.SLOT_SIZE - 1


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


def _foreign() -> bool:
    """Whether kernel audit has users other than fs9s (auditd, someone's rules)."""
    return bool(audit.status()["pid"]) or not all(_fs9s(r) for r in audit.rules())


def exempt_others() -> bool:
    """Install the exemption alone (for `fs9 mount`, before it forks the server), if
    kernel audit has no other users. Whether it is in place."""
    try:
        if _foreign():
            return False
        audit.exempt_all_but(*AGENT_UIDS)
        return True
    except OSError:
        return False


def install(lo: int, hi: int) -> Installed:
    """Turn on kernel audit and install the rules reporting refused syscalls of uids
    lo..hi, before any agent program is forked (a process forked while audit was off
    is never audited), and, first, the exemption of every task forked from now on but
    agents' programs (see the module doc). OSError: refusals cannot be witnessed.
    Idempotent; undo: remove."""
    foreign = _foreign()
    if not foreign:
        audit.exempt_all_but(*AGENT_UIDS)
    was_on = audit.enable()
    audit.add_rules(lo, hi)
    return Installed(was_on, foreign)


def remove(lo: int, hi: int) -> None:
    """Remove the rules of uids lo..hi (they outlive fs9 otherwise), and the exemption
    unless another fs9's rules remain; audit itself stays on. Idempotent; OSError."""
    audit.del_rules(lo, hi)
    if not any(_fs9s(r) and r[0] == audit.AUDIT_FILTER_EXIT for r in audit.rules()):
        audit.unexempt(*AGENT_UIDS)
