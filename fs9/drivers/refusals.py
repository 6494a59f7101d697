"""The reader of refused syscalls (drivers/audit.py says how the kernel reports them):
an async iterator over the NETLINK_AUDIT multicast group, one dict an event. Apart from
the netlink rules, which `fs9 mount`'s parent sets before any event loop is loaded.
"""
import errno
import re
import socket

import trio

try:
    import pyseccomp
except ImportError:
    pyseccomp = None

from .audit import (AUDIT_CWD, AUDIT_EOE, AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN,
                    AUDIT_NLGRP_READLOG, AUDIT_PATH, AUDIT_SYSCALL, NETLINK_AUDIT,
                    SO_RCVBUFFORCE, _NLMSG)

_HEADER = re.compile(r"audit\((\d+\.\d+):(\d+)\):\s*")
_FIELD = re.compile(r'([\w-]+)=("[^"]*"|\S+)')
# Fields the kernel logs with audit_log_untrustedstring(): quoted when plain,
# bare hex when they contain spaces, quotes or control characters.
_UNTRUSTED = {"path", "comm", "exe", "name", "cwd", "ocomm", "proctitle"}


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


def _syscall_name(arch: str, number: str) -> str:
    try:  # libseccomp knows every architecture's numbers; its arch tokens are AUDIT_ARCH_*
        return pyseccomp.resolve_syscall(int(arch, 16), int(number)).decode()
    except Exception:  # pyseccomp missing, unknown number
        return number


class Refusals:
    """Async iterator of failed syscalls and Landlock denials, as dicts: time,
    serial, pid, ppid, uid, comm, exe, syscall (name), errno ("EACCES"), args
    (a0..a3), cwd, names (PATH names as given), path (Landlock's, else the first
    name made absolute); for Landlock also blockers ("fs.read_file"), domain,
    dev, ino (net: daddr, dport...) and domain_pid, domain_uid, domain_exe: the
    task that called landlock_restrict_self(). Callers filter by uid."""

    def __init__(self, rcvbuf: int = 4 << 20):
        self.sock = trio.socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT)
        # Records are only multicast, never queued for us: a big buffer rides
        # out bursts; overflow shows up as ENOBUFS and is counted in `lost`.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        self.lost = 0
        self._pending = {}  # serial -> event being assembled until AUDIT_EOE
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
            event = self._feed(typ, data[_NLMSG.size:].decode(errors="replace"))
            if event:
                return event

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
            return None
        if typ == AUDIT_EOE:
            return self._finish(self._pending.pop(serial, None))
        if typ not in (AUDIT_SYSCALL, AUDIT_PATH, AUDIT_CWD, AUDIT_LANDLOCK_ACCESS):
            return None  # PROCTITLE, CONFIG_CHANGE, other daemons' records...
        if serial not in self._pending and len(self._pending) >= 1024:
            self._pending.pop(next(iter(self._pending)))  # an EOE never came
        event = self._pending.setdefault(serial, {"time": float(head[1]), "serial": serial,
                                                  "names": []})
        if typ == AUDIT_SYSCALL:
            event.update(_pick(fields, "pid ppid uid comm exe success"))
            event["syscall"] = _syscall_name(fields.get("arch", "0"), fields.get("syscall", "-1"))
            code = -int(fields.get("exit", "0"))
            event["errno"] = errno.errorcode.get(code, str(code)) if code > 0 else None
            event["args"] = [int(fields.get(f"a{i}", "0"), 16) for i in range(4)]
        elif typ == AUDIT_CWD:
            event["cwd"] = fields.get("cwd")
        elif typ == AUDIT_PATH:
            if fields.get("name") not in (None, "(null)"):
                event["names"].append(fields["name"])
        else:  # LANDLOCK_ACCESS: several (one per domain layer) merge
            event.update({k: v for k, v in fields.items() if k not in event or k == "path"})
        return None

    def _finish(self, event):
        if not event or (event.get("success") != "no" and "blockers" not in event):
            return None
        event.pop("success", None)
        if "path" not in event and event["names"]:
            name = event["names"][0]
            cwd = event.get("cwd") or ""
            event["path"] = name if name.startswith("/") or not cwd else f"{cwd.rstrip('/')}/{name}"
        domain = _pick(self._domains.get(event.get("domain"), {}), "pid uid exe")
        event.update({"domain_" + key: value for key, value in domain.items()})
        return event
