"""The protocol every file kind answers (kinds.py, vault.py): Node, Handle, Attrs.

A handler in ops.py never asks what kind of file it holds: it resolves the node, asks
the gate, calls the node (acme's fsysopen, which never asks either). Node's defaults
refuse as a file system without that operation does (REFUSALS); a kind overrides what it
does. Nodes are made fresh by the tree for each request; a Handle is the per-open state
(a cursor, a snapshot, written bytes, the caller's pid captured at open, an fd).
No pyfuse3 here: errors are Fs9Error, the ops layer translates.
"""
import errno
import inspect
import os
import stat
from dataclasses import dataclass

import trio

from ..errors import Fs9Error

READONLY_NS = "the namespace is made by the kernel: files come and go through ctl"
NO_XATTRS = "only vault files have extended attributes"
# What a kind that does not do an operation answers: as the kernel answers for a file
# system without it. Node.can raises these before the gate is asked (a refusal of the
# kind is no refusal of the agent: nothing is logged), the defaults below after.
REFUSALS = {
    **{op: (errno.EACCES, READONLY_NS)
       for op in ("create", "mkdir", "mknod", "symlink", "link", "rename", "rmdir")},
    "getxattr": (errno.ENODATA, NO_XATTRS),
    "setxattr": (errno.ENOTSUP, NO_XATTRS),
    "removexattr": (errno.ENODATA, NO_XATTRS),
}


@dataclass(slots=True)
class Attrs:
    """What stat(2) shows of a node; None: the mount's own (the server's uid and gid,
    the time it mounted). cacheable: the kernel may keep these for a while (ops.CACHE_S)."""
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int | None = None
    gid: int | None = None
    blksize: int = 4096
    blocks: int = 0
    rdev: int = 0
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    cacheable: bool = True


class Node:
    mode = stat.S_IFREG | 0o444
    stream = False  # opened nonseekable, reads may block
    does: frozenset[str] = frozenset()  # the operations of REFUSALS this kind does
    # A file of its own (the vault's): when its name goes, our inode goes with the file,
    # and a new file of that name gets a new one. The others are their path (inodes.py).
    own_inode = False
    transient = False  # a created name the tree does not serve: it exists while open
    remove = None  # () -> None: what `rm` means here (None: refused)
    changed_ns: int | None = None  # its mtime (times.py; None: the mount's)

    def size(self) -> int:
        return 0  # streams: unknown; text files render to tell

    def attrs(self) -> Attrs:
        return Attrs(self.mode, self.size())

    def refresh(self) -> None:
        """A listing's entry is about to be sent: its attributes as of now."""

    def file_key(self) -> tuple | None:
        """Which file on disk this name holds, if that file has other names (hard
        links), which are then one inode of ours (inodes.py); None: it has one."""
        return None

    def can(self, op: str) -> None:
        """Refuse op (a key of REFUSALS) at once unless this kind does it at all."""
        if op not in self.does:
            raise Fs9Error(*REFUSALS[op])

    def access(self, mode: int, ctx) -> bool:
        """access(2): the namespace's own files, what their mode shows (nothing is
        executable)."""
        return not any(mode & want and not self.mode & bits for want, bits in
                       ((os.R_OK, 0o444), (os.W_OK, 0o222), (os.X_OK, 0o111)))

    async def open(self, flags: int, ctx) -> "Handle":
        # O_TRUNC writes, even with O_RDONLY (Linux asks for write permission too)
        writing = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR) or flags & os.O_TRUNC
        if writing and not self.mode & 0o222:
            raise Fs9Error(errno.EACCES, "file is read-only")
        return self.handle(ctx.pid)

    def handle(self, pid: int) -> "Handle":
        raise NotImplementedError

    async def listing(self, child) -> list[tuple[str, "Node"]]:
        """A directory's (name, node) pairs, a snapshot; child(name): that name's node
        as the face serves it (raises Fs9Error if gone)."""
        raise Fs9Error(errno.ENOTDIR, "not a directory")

    def closedir(self) -> None:
        """The listing is released (what listing() holds open may close)."""

    async def setattr(self, attr, fields, ctx) -> "Node":
        """Change what pyfuse3's fields say; the node as it is now. `echo x > ctl`
        truncates first and `touch topics/x` sets times: accepted (and ignored) exactly
        those on writable files; modes and owners are the kernel's."""
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise Fs9Error(errno.EPERM, READONLY_NS)
        if not self.mode & 0o222:
            if fields.update_size:  # truncate(2) writes: refused as open(O_WRONLY) is
                raise Fs9Error(errno.EACCES, "file is read-only")
            raise Fs9Error(errno.EPERM, READONLY_NS)
        return self

    # names made, linked, moved and removed: only kinds that `does` them get here
    async def create(self, name: str, mode: int, flags: int, ctx) -> tuple["Handle", "Node"]:
        raise Fs9Error(*REFUSALS["create"])

    async def mkdir(self, name: str, mode: int, ctx) -> "Node":
        raise Fs9Error(*REFUSALS["mkdir"])

    async def mknod(self, name: str, mode: int, rdev: int, ctx) -> "Node":
        raise Fs9Error(*REFUSALS["mknod"])

    async def symlink(self, name: str, target: bytes, ctx) -> "Node":
        raise Fs9Error(*REFUSALS["symlink"])

    async def link(self, src: "Node", name: str, ctx) -> "Node":
        """A new name here for src (a node of the same kind)."""
        raise Fs9Error(*REFUSALS["link"])

    async def rename(self, parent: "Node", name: str, flags: int, ctx) -> None:
        """Move this node to parent/name (renameat2's flags)."""
        raise Fs9Error(*REFUSALS["rename"])

    async def rmdir(self, ctx) -> None:
        raise Fs9Error(*REFUSALS["rmdir"])

    async def unlink(self, ctx) -> None:
        if self.remove is None:
            raise Fs9Error(errno.EACCES, READONLY_NS)
        done = self.remove()
        if inspect.isawaitable(done):  # (a request to another node: face/remote.py)
            await done

    async def readlink(self) -> bytes:
        raise Fs9Error(errno.EINVAL, "not a symbolic link")

    # extended attributes: the namespace has none, and says so at once
    async def getxattr(self, name: str, ctx) -> bytes:
        raise Fs9Error(*REFUSALS["getxattr"])

    async def listxattr(self, ctx) -> list[str]:
        return []

    async def setxattr(self, name: str, value: bytes, ctx) -> None:
        raise Fs9Error(*REFUSALS["setxattr"])

    async def removexattr(self, name: str, ctx) -> None:
        raise Fs9Error(*REFUSALS["removexattr"])


def shown(node: Node, mode: str | None) -> Node | None:
    """node as a view shows it, mode being the view's access there: None if hidden,
    else read-only where it may not change it (write-only where it may not read it)."""
    if mode is None:
        return None
    if "w" not in mode:
        node.mode &= ~0o222
    if "r" not in mode:
        node.mode &= ~0o444
    return node


class Handle:
    poll_handle = None  # the kernel's latest poll(2) wake-up handle
    poll_scope: trio.CancelScope | None = None  # its notifier, while one waits
    ino = 0  # our inode of the opened file (set by ops.py): fstat(2) asks by inode
    opener: str | None = None  # the agent whose view opened it (None: the operator)
    # opened O_NONBLOCK: a read that would wait is EAGAIN. As at open only: the kernel
    # sends a later fcntl(F_SETFL) with each read, but pyfuse3's read() does not pass it on
    nonblocking = False
    fds: tuple[str, ...] = ()  # the opener's descriptors of it found last (fdflags.py)
    direct_io = True  # False: the kernel's page cache holds the file's data (the vault's)
    # (mtime, size) at open of a file the page cache may keep across opens (ops.py)
    cache_key: tuple[int, int] | None = None

    def __init__(self, pid: int) -> None:
        self.pid = pid  # the opener's thread id: whose signals interrupt a read

    async def read(self, off: int, size: int) -> bytes:
        raise Fs9Error(errno.EACCES, "file is write-only")

    async def write(self, off: int, data: bytes) -> int:
        raise Fs9Error(errno.EACCES, "file is read-only")

    def flush(self) -> None:
        pass

    async def fsync(self, datasync: bool) -> None:
        pass  # synthetic files: every accepted write is already committed to the log

    def close(self, path: tuple[str, ...]) -> None:
        """The last release; path: where the opened file is now (() if gone)."""

    async def file(self) -> Node | None:
        """The opened file itself, reached through this handle (fstat, ftruncate, fchmod
        once its name is gone); None: it is only its name."""
        return None

    def readable(self) -> bool:
        return True

    def kept(self) -> int:
        """Bytes this open holds for its reads alone (held.py counts them)."""
        return 0

    def ready(self) -> bool:
        """A read now returns without waiting for anything (nothing need cancel it)."""
        return False

    def held(self) -> bool:
        """Data has come that a read gets within a moment (a topic's events held for a
        batch, kernel/bus/topic.py): the read waits for it, O_NONBLOCK or not."""
        return False

    async def wait_readable(self) -> None:
        pass
