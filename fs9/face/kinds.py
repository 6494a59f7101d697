"""The few kinds of file the namespace is made of (acme's small set of file kinds).

Dir      a directory whose names come from the tree table
Ctl      write: commands, applied per write (or, `whole`, the bytes of one open
         applied at close: `agents/NAME/in`); read: a state line
Status   text rendered at open: a consistent snapshot per open
Stream   reads block until data or EOF, like a pipe; per-open cursor (cursors.py)
Vault    a file, directory or symlink of the vault on disk (vault.py, vaultfile.py)

Every kind answers the same protocol (Node, Handle below), so a handler in ops.py never
asks what kind it holds: it resolves the node, asks the gate, calls the node. Node's
defaults refuse as a file system without that operation does; a kind overrides what it
does. Nodes are made fresh by the tree for each request; a Handle is the per-open state
(cursor, snapshot, written bytes, the caller's pid captured at open, an fd).
No pyfuse3 here: errors are Fs9Error, the ops layer translates.
"""
import errno
import os
import stat
from dataclasses import dataclass

import trio

from ..errors import Fs9Error
from ..kernel.kernel import MAX_INPUT

SLICE_S = 0.2  # a blocked reader checks for a pending signal this often
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

    def size(self) -> int:
        return 0  # streams: unknown; text files render to tell

    def attrs(self) -> Attrs:
        return Attrs(self.mode, self.size())

    def refresh(self) -> None:
        """A listing's entry is about to be sent: its attributes as of now."""

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
        writing = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
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
        if self.mode & 0o222 and not (fields.update_mode or fields.update_uid
                                      or fields.update_gid):
            return self
        raise Fs9Error(errno.EPERM, READONLY_NS)

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
        self.remove()

    async def readlink(self) -> bytes:
        raise Fs9Error(errno.EINVAL, "not a symbolic link")

    # extended attributes: the namespace has none, and says so at once
    async def getxattr(self, name: str) -> bytes:
        raise Fs9Error(*REFUSALS["getxattr"])

    async def listxattr(self) -> list[str]:
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

    async def wait_readable(self) -> None:
        pass


# --- Dir -------------------------------------------------------------------------

class Dir(Node):
    mode = stat.S_IFDIR | 0o555

    def __init__(self, names=None, create=None) -> None:
        self.names = names  # () -> list of child names (the tree fills it in)
        self.new_file = create  # (name) -> Node: what a new name here opens as
        if create is not None:
            self.mode = stat.S_IFDIR | 0o755
            self.does = frozenset({"create"})

    def attrs(self) -> Attrs:
        return Attrs(self.mode, self.size(), nlink=2)

    async def open(self, flags: int, ctx) -> Handle:
        raise Fs9Error(errno.EISDIR, "is a directory")

    async def listing(self, child) -> list[tuple[str, Node]]:
        entries = []
        for name in self.names():
            try:
                entries.append((name, child(name)))
            except Fs9Error:
                pass  # went away while listing
        return entries

    async def setattr(self, attr, fields, ctx) -> Node:
        raise Fs9Error(errno.EPERM, READONLY_NS)

    async def create(self, name: str, mode: int, flags: int, ctx) -> tuple[Handle, Node]:
        """mail/ (one message, sent at close), outbox/, memory/ (written whole: the new
        name exists while open), topics/ (a new topic; each write publishes)."""
        node = self.new_file(name)
        node.transient = not node.stream
        return await node.open(os.O_WRONLY, ctx), node


# --- Status ----------------------------------------------------------------------

class Status(Node):
    def __init__(self, render, remove=None, opened=None, prepare=None) -> None:
        self.render = render  # () -> str | bytes
        self.remove = remove  # () -> None: what `rm` means here (None: refused)
        self.opened = opened  # () -> None: called at each open (a delivery, for mail)
        # async () -> None: slow work (a request to a model) done in a worker before
        # render; such a file reports size 0, so a stat never waits for it
        self.prepare = prepare

    def size(self) -> int:
        return 0 if self.prepare is not None else len(_encode(self.render()))

    def attrs(self) -> Attrs:
        return Attrs(self.mode, self.size(), cacheable=False)  # its text changes size

    def handle(self, pid: int) -> Handle:
        if self.opened is not None:
            self.opened()
        return SnapshotHandle(pid, self.render, self.prepare)


class SnapshotHandle(Handle):
    """Renders once at the first read from offset 0, then serves slices."""

    def __init__(self, pid: int, render, prepare=None) -> None:
        super().__init__(pid)
        self.render = render
        self.prepare = prepare
        self.text: bytes | None = None

    async def read(self, off: int, size: int) -> bytes:
        if self.text is None or off == 0:
            if self.prepare is not None:
                await self.prepare()
            self.text = _encode(self.render())
        return self.text[off:off + size]


class Clone(Node):
    """Plan 9's clone file: each open makes a new object (a conversation) and reads
    its name. A stat makes nothing (size 0)."""

    def __init__(self, make) -> None:
        self.make = make  # () -> str: make one, return its name

    def size(self) -> int:
        return 0

    def handle(self, pid: int) -> Handle:
        name = self.make() + "\n"
        return SnapshotHandle(pid, lambda: name)


# --- Ctl -------------------------------------------------------------------------

class Ctl(Node):
    def __init__(self, apply, render=None, whole: bool = False, refused=None,
                 early=None, remove=None) -> None:
        self.apply = apply  # (bytes) -> None; raises Fs9Error when refused
        self.remove = remove  # () -> None: what `rm` means here (None: refused)
        self.render = render  # () -> str, the state line; None: write-only
        self.whole = whole
        self.refused = refused  # (Fs9Error) -> None: reports a refusal made here
        # `whole`: (bytes of the first write) -> None, raising Fs9Error to refuse the
        # input at write(2) already: shells ignore what close(2) says, so what can be
        # known early (a budget exceeded, fs9 halted) is said where `echo` reports it.
        # Only the first write: a check may cost more than appending a chunk.
        self.early = early
        self.mode = stat.S_IFREG | (0o644 if render else 0o200)

    def size(self) -> int:
        return len(_encode(self.render())) if self.render else 0

    def handle(self, pid: int) -> Handle:
        return CtlHandle(pid, self)


class CtlHandle(SnapshotHandle):
    def __init__(self, pid: int, node: Ctl) -> None:
        super().__init__(pid, node.render)
        self.node = node
        self.pending: bytearray | None = None  # `whole`: bytes written since open
        self.refused: Fs9Error | None = None  # `whole`: this open's input was refused

    async def read(self, off: int, size: int) -> bytes:
        if self.node.render is None:
            return await Handle.read(self, off, size)
        return await super().read(off, size)

    async def write(self, off: int, data: bytes) -> int:
        if not self.node.whole:
            self.node.apply(data)
            return len(data)
        if self.refused is not None:
            raise self.refused
        self.pending = self.pending if self.pending is not None else bytearray()
        if len(self.pending) + len(data) > MAX_INPUT:
            # the whole input is refused: close(2) fails too and nothing is queued
            self.pending = None
            self.refused = Fs9Error(errno.EFBIG, f"task input over {MAX_INPUT} bytes")
            self.node.refused(self.refused)
            raise self.refused
        first = not self.pending
        self.pending += data
        if first and self.node.early is not None:
            try:
                self.node.early(len(self.pending))
            except Fs9Error as e:
                self.pending, self.refused = None, e
                raise
        return len(data)

    def flush(self) -> None:
        """close(2): a `whole` file applies what this open wrote (once per write burst)."""
        if self.refused is not None:
            raise self.refused
        if self.pending is not None:
            data, self.pending = bytes(self.pending), None
            self.node.apply(data)


# --- Stream ----------------------------------------------------------------------

class StreamNode(Node):
    stream = True

    def __init__(self, cursor, publish=None) -> None:
        self.cursor = cursor  # () -> a new cursor positioned where a new reader starts
        self.publish = publish  # (bytes) -> None: one write, one event (topics)
        if publish is not None:
            self.mode = stat.S_IFREG | 0o644

    def handle(self, pid: int) -> Handle:
        return StreamHandle(pid, self.cursor(), self.publish)


class StreamHandle(Handle):
    def __init__(self, pid: int, cursor, publish=None) -> None:
        super().__init__(pid)
        self.cursor = cursor
        self.publish = publish

    async def write(self, off: int, data: bytes) -> int:
        if self.publish is None:
            return await super().write(off, data)
        self.publish(data)
        return len(data)

    def readable(self) -> bool:
        return self.cursor.readable()

    async def wait_readable(self) -> None:
        await self.cursor.wait_readable()

    async def read(self, off: int, size: int) -> bytes:
        """Block until data or EOF; EINTR once the reader has a signal pending.

        pyfuse3 ignores FUSE interrupts, so the wait is sliced and each slice
        checks the caller, else Ctrl-C and even SIGKILL would wait for data."""
        while not self.cursor.readable():
            with trio.move_on_after(SLICE_S):
                await self.cursor.wait_readable()
            if not self.cursor.readable() and signal_pending(self.pid):
                raise Fs9Error(errno.EINTR, "interrupted")
        return self.cursor.take(size)


def _encode(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


def signal_pending(pid: int) -> bool:
    """True if thread `pid` has an unblocked signal pending (or is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
    except OSError:
        return True
    pending = int(fields[b"SigPnd"], 16) | int(fields[b"ShdPnd"], 16)
    return bool(pending & ~int(fields[b"SigBlk"], 16)) or bool(pending & (1 << 8))  # SIGKILL
