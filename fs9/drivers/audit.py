"""Landlock denials, read live from the kernel audit log.

Landlock (ABI >= 7) reports denials through audit. A root daemon reads them by
joining the NETLINK_AUDIT multicast group AUDIT_NLGRP_READLOG (CAP_AUDIT_READ)
without registering as the audit daemon: a registered auditd that falls behind
makes audited syscalls block (backlog_wait_time); a multicast reader never does.

Nothing is logged unless audit is enabled (`enable()`) and the sandboxed task
called landlock_restrict_self() with LANDLOCK_RESTRICT_SELF_LOG_NEW_EXEC_ON
(by default denials are only logged until the next execve).

One denial is one audit event: records sharing `audit(time:serial)`, ended by
AUDIT_EOE. LANDLOCK_ACCESS says what was denied, SYSCALL says who (pid, uid,
comm), and LANDLOCK_DOMAIN status=allocated (with a domain's first denial)
names the task that created the domain. With no auditd registered the kernel
also printk()s each record into dmesg, rate limited by kernel.printk_ratelimit*.
"""

import errno
import re
import socket
import struct

import trio

NETLINK_AUDIT = 9
AUDIT_NLGRP_READLOG = 1
AUDIT_GET, AUDIT_SET = 1000, 1001
AUDIT_SYSCALL, AUDIT_EOE = 1300, 1320
AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN = 1423, 1424
NLMSG_ERROR = 2
SO_RCVBUFFORCE = 33  # not exported by the socket module
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, portid
_STATUS = struct.Struct("=11I")  # struct audit_status (mask, enabled, ...)

_HEADER = re.compile(r"audit\((\d+\.\d+):(\d+)\):\s*")
_FIELD = re.compile(r'([\w-]+)=("[^"]*"|\S+)')
# Fields the kernel logs with audit_log_untrustedstring(): quoted when plain,
# bare hex when they contain spaces, quotes or control characters.
_UNTRUSTED = {"path", "comm", "exe", "name", "ocomm", "proctitle"}


def _fields(text: str) -> dict:
    out = {}
    for key, value in _FIELD.findall(text):
        if value.startswith('"'):
            value = value[1:-1]
        elif key in _UNTRUSTED and re.fullmatch(r"(?:[0-9A-F]{2})+", value):
            value = bytes.fromhex(value).decode(errors="replace")
        out[key] = value
    return out


def _pick(fields: dict, keys: str) -> dict:
    return {k: int(fields[k]) if k in ("pid", "ppid", "uid") else fields[k]
            for k in keys.split() if k in fields}


def _request(kind: int, payload: bytes = b"") -> bytes:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT) as s:
        s.send(_NLMSG.pack(_NLMSG.size + len(payload), kind, 1 | 4, 1, 0) + payload)
        while True:  # NLM_F_ACK: an NLMSG_ERROR(0) ack, plus the reply to a GET
            data = s.recv(8192)
            _, typ, _, _, _ = _NLMSG.unpack_from(data)
            if typ == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", data, _NLMSG.size)
                if err:
                    raise OSError(-err, f"audit netlink request {kind}")
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


class LandlockDenials:
    """Async iterator of denials as dicts: the LANDLOCK_ACCESS fields (domain,
    blockers e.g. "fs.read_file" or "fs.write_file,fs.truncate", path, dev,
    ino; net/scope denials have daddr, dport, opid...) plus time, serial, the
    denied task's pid, ppid, uid, comm, exe, syscall, and domain_pid,
    domain_uid, domain_exe: the task that called landlock_restrict_self()."""

    def __init__(self, rcvbuf: int = 4 << 20):
        self.sock = trio.socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT)
        # Records are only multicast, never queued for us: a big buffer rides
        # out bursts; overflow shows up as ENOBUFS and is counted in `lost`.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        self.lost = 0
        self._pending = {}  # serial -> denial being assembled until AUDIT_EOE
        self._domains = {}  # domain id -> fields of its status=allocated record

    async def __aenter__(self):
        await self.sock.bind((0, 1 << (AUDIT_NLGRP_READLOG - 1)))
        return self

    async def __aexit__(self, *exc):
        self.sock.close()

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        while True:
            try:
                data = await self.sock.recv(65536)
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.lost += 1
                continue
            # kauditd multicasts every record as its own datagram.
            _, typ, _, _, _ = _NLMSG.unpack_from(data)
            denial = self._feed(typ, data[_NLMSG.size:].decode(errors="replace"))
            if denial:
                return denial

    def _feed(self, typ: int, text: str):
        head = _HEADER.match(text)
        if not head:
            return None
        serial, fields = int(head[2]), _fields(text[head.end():])
        if typ == AUDIT_LANDLOCK_DOMAIN:
            if fields.get("status") == "deallocated":  # logged alone, no EOE
                self._domains.pop(fields.get("domain"), None)
            else:  # status=allocated: rides along with the domain's first denial
                self._domains[fields.get("domain")] = fields
        elif typ == AUDIT_LANDLOCK_ACCESS:
            if len(self._pending) >= 1024:  # an EOE never came: drop the oldest
                self._pending.pop(next(iter(self._pending)))
            self._pending[serial] = {"time": float(head[1]), "serial": serial, **fields}
        elif typ == AUDIT_SYSCALL and serial in self._pending:
            self._pending[serial].update(_pick(fields, "pid ppid uid comm exe syscall"))
        elif typ == AUDIT_EOE and serial in self._pending:
            denial = self._pending.pop(serial)
            domain = _pick(self._domains.get(denial.get("domain"), {}), "pid uid exe")
            denial.update({"domain_" + key: value for key, value in domain.items()})
            return denial
        return None
