"""Refused syscalls of confined agents through kernel audit: the netlink requests and
rules here, the live reader of the reports in drivers/refusals.py.

A root daemon reads audit records by joining the NETLINK_AUDIT multicast group
AUDIT_NLGRP_READLOG (CAP_AUDIT_READ), not registering as the audit daemon: an
auditd that falls behind makes audited syscalls block; a multicast reader never.

Audit must be on (`enable()`) before the audited task is forked. Two sources:
Landlock (ABI >= 7) logs its denials (LANDLOCK_ACCESS) when the task asked for
it (LANDLOCK_RESTRICT_SELF_LOG_NEW_EXEC_ON); `add_rules(lo, hi)` makes the kernel
log every syscall of uids lo..hi failing with EACCES or EPERM, which catches the
plain permission and capability checks Landlock never sees (kill(1), a 0700 dir).

Cost, and `exempt_all_but(lo, hi)`: the kernel gives a task an audit context at
fork (audit_alloc), once audit has ever been enabled, unless a task-list rule
says "never" for it; a task with a context pays on every syscall (entry and exit
hooks, and, once any rule exists, the names and inodes of every path it looks
up), whether or not a rule ever matches it: with two exit rules, stat() through
fs9 cost every process on the machine ~50% more. `exempt_all_but(lo, hi)` adds
`never,task -F auid<lo` and `never,task -F auid>hi`: a task forked afterwards
gets no context unless its login uid (auid, inherited across fork, exec and
setuid; unset is 4294967295; root with CAP_AUDIT_CONTROL sets it by writing
/proc/self/loginuid, and its children forked after that inherit it) lies in
lo..hi: only those are audited (and pay). The rules are checked at fork only: a
task forked before them keeps what it had (a shell started earlier keeps its
context and keeps paying), and one forked after them keeps no context for life,
even if it sets its own loginuid later (only its later children get one).

One event is the records sharing `audit(time:serial)`, ended by AUDIT_EOE:
SYSCALL (who, what), CWD and PATH (the names looked up), LANDLOCK_ACCESS (merged
in), and LANDLOCK_DOMAIN status=allocated, with a domain's first denial, naming
the task that created the domain. With no auditd registered the kernel also
printk()s each record into dmesg, rate limited by kernel.printk_ratelimit*.
"""

import errno
import platform
import socket
import struct


NETLINK_AUDIT = 9
AUDIT_NLGRP_READLOG = 1
AUDIT_GET, AUDIT_SET, AUDIT_ADD_RULE, AUDIT_DEL_RULE, AUDIT_LIST_RULES = 1000, 1001, 1011, 1012, 1013
AUDIT_SYSCALL, AUDIT_PATH, AUDIT_CWD, AUDIT_EOE = 1300, 1302, 1307, 1320
AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN = 1423, 1424
# struct audit_rule_data, from linux/audit.h
AUDIT_FILTER_TASK, AUDIT_FILTER_EXIT, AUDIT_FILTER_FS, AUDIT_NEVER, AUDIT_ALWAYS = 0x01, 0x04, 0x06, 0, 2
AUDIT_UID, AUDIT_LOGINUID, AUDIT_ARCH, AUDIT_FSTYPE, AUDIT_EXIT = 1, 9, 11, 26, 103
FUSE_SUPER_MAGIC = 0x65735546
# Filesystems whose inodes an audit record need not describe (see _task_rules): FUSE,
# and the local disk filesystems a vault lives on (ext2/3/4, xfs, btrfs, tmpfs,
# overlayfs, f2fs, zfs), where agents' vault subtrees are bound.
UNRECORDED_FS = (FUSE_SUPER_MAGIC, 0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0x794C7630,
                 0xF2F52010, 0x2FC12FC1)
AUDIT_LESS_THAN, AUDIT_GREATER_THAN, AUDIT_EQUAL = 0x10000000, 0x20000000, 0x40000000
AUDIT_LESS_THAN_OR_EQUAL, AUDIT_GREATER_THAN_OR_EQUAL = 0x50000000, 0x60000000
AUDIT_ARCHES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # EM_* | 64BIT | LE
NLMSG_ERROR, NLMSG_DONE = 2, 3
SO_RCVBUFFORCE = 33  # not exported by the socket module
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, portid
_STATUS = struct.Struct("=11I")  # struct audit_status (mask, enabled, ...)
_RULE = struct.Struct("=3I64I64I64I64II")  # flags action count mask fields values fieldflags buflen

def _request(kind: int, payload: bytes = b"") -> bytes:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT) as s:
        s.send(_NLMSG.pack(_NLMSG.size + len(payload), kind, 1 | 4, 1, 0) + payload)
        while True:  # NLM_F_ACK: an NLMSG_ERROR(0) ack, plus the reply to a GET
            data = s.recv(8192)
            _, typ, _, _, _ = _NLMSG.unpack_from(data)
            if typ == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", data, _NLMSG.size)
                if err:
                    raise OSError(-err, f"audit netlink request {kind}: {errno.errorcode.get(-err)}")
                if kind != AUDIT_GET:
                    return b""
            elif typ == kind:
                return data[_NLMSG.size:]


def status() -> dict:
    names = "mask enabled failure pid rate_limit backlog_limit lost backlog".split()
    return dict(zip(names, _STATUS.unpack_from(_request(AUDIT_GET).ljust(44, b"\0"))))


def enable() -> bool:
    """Turn kernel audit on (enabled=1) if it is off. Returns whether it was on."""
    if status()["enabled"]:  # 2 means locked on: also fine for us
        return True
    _request(AUDIT_SET, _STATUS.pack(1, 1, *[0] * 9))  # mask=AUDIT_STATUS_ENABLED
    return False


def _rule(listnr: int, action: int, fields: list) -> bytes:
    """struct audit_rule_data of (field, op, value) triples, which the kernel ANDs."""
    pad = [0] * (64 - len(fields))
    return _RULE.pack(listnr, action, len(fields), *[0xFFFFFFFF] * 64,
                      *[f for f, _, _ in fields], *pad, *[v for _, _, v in fields], *pad,
                      *[op for _, op, _ in fields], *pad, 0)


def _rules(lo: int, hi: int):
    """One exit rule per errno: uid in lo..hi and exit == -errno. ENETUNREACH: what a
    sandbox without the inet pledge answers a datagram sent anywhere (its network
    namespace has no interface up)."""
    arch = AUDIT_ARCHES.get(platform.machine())
    for err in (errno.EACCES, errno.EPERM, errno.ENETUNREACH):
        fields = [(AUDIT_ARCH, AUDIT_EQUAL, arch)] if arch else []
        fields += [(AUDIT_UID, AUDIT_GREATER_THAN_OR_EQUAL, lo),
                   (AUDIT_UID, AUDIT_LESS_THAN_OR_EQUAL, hi),
                   (AUDIT_EXIT, AUDIT_EQUAL, -err & 0xFFFFFFFF)]  # compared as u32
        yield _rule(AUDIT_FILTER_EXIT, AUDIT_ALWAYS, fields)


def _task_rules(lo: int, hi: int):
    """Two task rules: no audit context for a task forked with its auid outside lo..hi.
    And filesystem rules: audit records name the paths an audited agent looked up but
    do not describe their inodes. Describing one costs reading its security.capability
    attribute on every path syscall of an agent: for a FUSE file a round trip to its
    server (+20 us a stat), for a file on disk ~10% of a stat."""
    yield _rule(AUDIT_FILTER_TASK, AUDIT_NEVER, [(AUDIT_LOGINUID, AUDIT_LESS_THAN, lo)])
    yield _rule(AUDIT_FILTER_TASK, AUDIT_NEVER, [(AUDIT_LOGINUID, AUDIT_GREATER_THAN, hi)])
    for magic in UNRECORDED_FS:
        yield _rule(AUDIT_FILTER_FS, AUDIT_NEVER, [(AUDIT_FSTYPE, AUDIT_EQUAL, magic)])


def add_rules(lo: int, hi: int) -> None:
    """Log every syscall of uids lo..hi failing with EACCES or EPERM. Idempotent
    (a duplicate rule is EEXIST). Rules outlive us: remove them with del_rules."""
    _send_rules(AUDIT_ADD_RULE, _rules(lo, hi), FileExistsError)


def del_rules(lo: int, hi: int) -> None:
    _send_rules(AUDIT_DEL_RULE, _rules(lo, hi), FileNotFoundError)  # ENOENT: not (any more)


def exempt_all_but(lo: int, hi: int) -> None:
    """From now on, fork every task without an audit context (it pays nothing per
    syscall, and is never audited) unless its login uid is in lo..hi; see the
    module doc. Install it before `enable()` where audit is off, so no task forked
    in between gets a context. Idempotent; outlives us: remove with unexempt."""
    _send_rules(AUDIT_ADD_RULE, _task_rules(lo, hi), FileExistsError)


def unexempt(lo: int, hi: int) -> None:
    """Remove exempt_all_but(lo, hi)'s rules: tasks forked afterwards get contexts again."""
    _send_rules(AUDIT_DEL_RULE, _task_rules(lo, hi), FileNotFoundError)


def _send_rules(kind: int, rules, fine: type) -> None:
    for rule in rules:
        try:
            _request(kind, rule)
        except fine:
            pass


def rules() -> list[tuple[int, int, list]]:
    """Every audit rule in the kernel, anyone's: (list, action, [(field, op, value)])."""
    rules = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT) as s:
        s.send(_NLMSG.pack(_NLMSG.size, AUDIT_LIST_RULES, 1 | 4, 1, 0))
        while True:  # an ack (NLMSG_ERROR 0), one message per rule, NLMSG_DONE, any order
            data = s.recv(65536)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, typ, _, _, _ = _NLMSG.unpack_from(data, offset)
                body = offset + _NLMSG.size
                if typ == NLMSG_DONE:
                    return rules
                if typ == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, body)
                    if err:
                        raise OSError(-err, f"audit list rules: {errno.errorcode.get(-err)}")
                elif typ == AUDIT_LIST_RULES and length - _NLMSG.size >= _RULE.size:
                    raw = _RULE.unpack_from(data, body)
                    count = raw[2]
                    fields, values, ops = raw[67:67 + count], raw[131:131 + count], raw[195:195 + count]
                    rules.append((raw[0], raw[1], list(zip(fields, ops, values))))
                offset += (max(length, _NLMSG.size) + 3) & ~3
