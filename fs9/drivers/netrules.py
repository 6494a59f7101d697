"""Landlock's network rules and scopes (ABI 4 and 6), which the `landlock` package does
not cover (it handles filesystem rules only): a small ctypes layer, stacked on the
filesystem ruleset by the sandbox before it execs an agent's program.

  - network (ABI >= 4): TCP connect and bind are refused (EACCES, and a Landlock
    audit record) except to the ports allowed;
  - scopes (ABI >= 6): abstract unix sockets and signals reach only processes of the
    same Landlock domain (the agent's own programs);
  - and, so that this layer takes nothing of the filesystem layer's: moving or linking
    a file to another folder (LANDLOCK_ACCESS_FS_REFER, ABI >= 2) is allowed everywhere.
    Landlock denies that one right in every layer that does not grant it, even a layer
    that handles no filesystem access: without this rule, `mv a/f b/` in the agent's
    own subtree is EXDEV.

Everything here is plain data in, a ruleset fd out; callers restrict themselves with
landlock_restrict_self (zygote.py), after no_new_privs.
"""
import ctypes
import errno
import os
import struct

SYS_CREATE_RULESET, SYS_ADD_RULE = 444, 445
CREATE_RULESET_VERSION = 1
ACCESS_FS_REFER = 1 << 13
ACCESS_NET_BIND_TCP, ACCESS_NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def abi() -> int:
    """The running kernel's Landlock ABI version (0: none)."""
    version = _libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(0, version)


def ruleset(connect: list[int] | None, bind: list[int] | None) -> int | None:
    """A ruleset fd restricting TCP (connect/bind to the listed ports only; None: that
    access unrestricted) and scoping abstract sockets and signals; None if this kernel
    has neither network rules nor scopes. OSError(EOPNOTSUPP) if ports are to be
    restricted and the kernel cannot (the caller refuses to run wider)."""
    version = abi()
    net = (ACCESS_NET_CONNECT_TCP if connect is not None else 0) | \
        (ACCESS_NET_BIND_TCP if bind is not None else 0)
    if net and version < 4:
        raise OSError(errno.EOPNOTSUPP, f"Landlock ABI {version} has no network rules "
                                        "(Linux 6.7 and later have them)")
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if version >= 6 else 0
    if not net and not scoped:
        return None
    refer = ACCESS_FS_REFER if version >= 2 else 0
    attr = ctypes.create_string_buffer(struct.pack("QQQ", refer, net, scoped))
    size = 24 if version >= 6 else 16
    fd = _libc.syscall(SYS_CREATE_RULESET, attr, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"landlock_create_ruleset (network): {os.strerror(e)}")
    try:
        if refer:
            _allow_refer_everywhere(fd)
        for access, ports in ((ACCESS_NET_CONNECT_TCP, connect), (ACCESS_NET_BIND_TCP, bind)):
            for port in ports or ():
                rule = ctypes.create_string_buffer(struct.pack("QQ", access, port))
                if _libc.syscall(SYS_ADD_RULE, fd, RULE_NET_PORT, rule, ctypes.c_uint32(0)) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"landlock_add_rule (port {port}): {os.strerror(e)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _allow_refer_everywhere(fd: int) -> None:
    root = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:  # struct landlock_path_beneath_attr: u64 allowed_access, s32 parent_fd (packed)
        rule = ctypes.create_string_buffer(struct.pack("=Qi", ACCESS_FS_REFER, root))
        if _libc.syscall(SYS_ADD_RULE, fd, RULE_PATH_BENEATH, rule, ctypes.c_uint32(0)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"landlock_add_rule (refer): {os.strerror(e)}")
    finally:
        os.close(root)
