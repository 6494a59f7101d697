"""Open vault files: a real fd each, and what can still be done through it.

A VaultHandle holds the fd opened (beneath the vault root, vault.py) for one open(2):
reads and writes go to it at offsets in worker threads, fsync to it, and at the last
release a file changed through it is one `vault_changed` event. Once the file's name is
gone (unlinked, renamed over) while it is open, the kernel asks by inode: fstat,
ftruncate, fchmod, futimens then reach the file through that fd (OpenFile), never a name.
OSError becomes Fs9Error with the same errno, as pyfuse3's passthroughfs.py does.
"""
import errno
import os
import stat

import trio

from ..errors import Fs9Error
from .access import may_set_attributes
from .node import Attrs, Handle, Node

# The vault's disk keeps this much for the operator (and fs9's log, often on the same
# disk): an agent's write through fs9 that would leave less free is ENOSPC. A share of
# the disk, at most RESERVE_MAX (a small disk keeps a twentieth).
RESERVE_SHARE, RESERVE_MAX = 20, 1 << 30


def reserve_kept(fd: int, size: int) -> None:
    """ENOSPC if writing size more bytes at fd would leave its disk less free space
    than the operator's reserve (blocking: a worker thread's)."""
    fs = os.fstatvfs(fd)
    reserve = min(fs.f_blocks * fs.f_frsize // RESERVE_SHARE, RESERVE_MAX)
    if fs.f_bavail * fs.f_frsize - size < reserve:
        raise OSError(errno.ENOSPC, f"the vault's disk keeps its last {reserve >> 20} MiB "
                                    "for the operator")


def agents_write(fd: int, data: bytes, off: int) -> int:
    reserve_kept(fd, len(data))
    return os.pwrite(fd, data, off)


def disk(fn, *args):
    """Call a blocking disk function; OSError becomes Fs9Error with its errno."""
    try:
        return fn(*args)
    except OSError as e:
        raise Fs9Error(e.errno or errno.EIO, e.strerror or str(e))


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(disk, fn, *args)


def disk_attrs(mode: int, st: os.stat_result) -> Attrs:
    """A file's own attributes (mode: as a view shows it), our inode number."""
    return Attrs(mode, st.st_size, st.st_nlink, st.st_uid, st.st_gid, st.st_blksize,
                 st.st_blocks, st.st_rdev, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
                 # each name is an inode of ours: the kernel may not keep one name's
                 # attributes while the file changes through another
                 cacheable=st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode))


class VaultHandle(Handle):
    """An open vault file: a real fd; reads and writes at offsets, in threads."""
    direct_io = False  # reads at memory speed, readahead (close-to-open: ops.py)

    def __init__(self, fd: int, changes, agent: str | None, uid: int, writing: bool,
                 wrote: bool = False) -> None:
        super().__init__(pid=0)  # a file's reads never block: no reader to interrupt
        self.fd = fd
        self.changes = changes  # kernel.vault_changes: what fs9 changed, and for whom
        self.agent = agent  # whose view opened it (None: the operator)
        self.uid = uid  # who opened it: the actor of its changes
        self.writing = writing
        self.wrote = wrote  # changed through this open: a vault_changed event at release

    async def read(self, off: int, size: int) -> bytes:
        return await in_thread(os.pread, self.fd, size, off)

    async def write(self, off: int, data: bytes) -> int:
        self.wrote = True
        if self.agent is not None:
            return await in_thread(agents_write, self.fd, data, off)
        return await in_thread(os.pwrite, self.fd, data, off)

    async def fsync(self, datasync: bool) -> None:
        await in_thread(os.fdatasync if datasync else os.fsync, self.fd)

    def close(self, path: tuple[str, ...]) -> None:
        os.close(self.fd)
        if self.wrote:
            self.changes.report(path, "modified", self.uid)

    async def file(self) -> "OpenFile":
        return OpenFile(self, await in_thread(os.fstat, self.fd))


class OpenFile(Node):
    """A vault file reached through an open handle (its name may be gone). The gate
    admitted the opener at open; what it may change is what it opened it for."""

    def __init__(self, handle: VaultHandle, st: os.stat_result) -> None:
        self.opened = handle
        self.st = st
        self.mode = st.st_mode

    def attrs(self) -> Attrs:
        return disk_attrs(self.mode, self.st)

    async def setattr(self, attr, fields, ctx) -> "OpenFile":
        """ftruncate, fchmod, fchown, futimens through the fd."""
        h = self.opened
        if h.agent and not h.writing:
            raise Fs9Error(errno.EACCES, "an agent changes a file it opened to write")
        seen_as = ("agents", h.agent, "view") if h.agent else ()
        may_set_attributes(seen_as, self, attr, fields, ctx)
        await in_thread(set_attributes, ByFd(h.fd), attr, fields)
        return OpenFile(h, await in_thread(os.fstat, h.fd))


def set_attributes(target, attr, fields) -> None:
    """setattr: size, mode, owner, times (passthroughfs.py's order), on target, a file
    pinned beneath the root (kernel/vault/beneath.py's Pinned) or by its open fd (ByFd).
    Blocks."""
    if fields.update_size:
        target.truncate(attr.st_size)
    if fields.update_mode:
        target.chmod(stat.S_IMODE(attr.st_mode))
    if fields.update_uid or fields.update_gid:
        target.chown(attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
    if fields.update_atime or fields.update_mtime:
        target.utimens(attr.st_atime_ns if fields.update_atime else None,
                       attr.st_mtime_ns if fields.update_mtime else None)


class ByFd:
    """An open vault file by its fd (its name may be gone)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def chmod(self, mode: int) -> None:
        os.chmod(self.fd, mode)

    def chown(self, uid: int, gid: int) -> None:
        os.chown(self.fd, uid, gid)

    def utimens(self, atime_ns, mtime_ns) -> None:
        st = os.fstat(self.fd)
        os.utime(self.fd, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                              st.st_mtime_ns if mtime_ns is None else mtime_ns))
