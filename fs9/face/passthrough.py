"""Passthrough: the file kind of `vault/`, a real directory on disk.

A PassNode is a path under the vault's backing directory, looked up afresh per
request (like the synthetic nodes: the disk is the truth, also when an editor
changes it behind our back). Blocking disk I/O runs in worker threads; OSError
becomes Fs9Error with the same errno, as pyfuse3's passthroughfs.py does.
"""
import ctypes
import errno
import os
import stat

import trio

from ..errors import Fs9Error
from .kinds import Handle


def disk(fn, *args):
    """Call an os function; OSError becomes Fs9Error with its errno."""
    try:
        return fn(*args)
    except OSError as e:
        raise Fs9Error(e.errno or errno.EIO, e.strerror or str(e))


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(disk, fn, *args)


class PassNode:
    """A file, directory or symlink of the vault (real: its path on disk)."""
    stream = False
    create = None  # vaultops.py creates files here itself (it needs the flags and the caller)

    def __init__(self, real: str, st: os.stat_result) -> None:
        self.real = real
        self.st = st
        self.mode = st.st_mode

    @classmethod
    def at(cls, real: str) -> "PassNode":
        """The file at real. fs9 runs as root and the kernel resolves symlinks for the
        caller, so fs9 itself never follows one: a directory on the way that became a
        symlink behind our back (rename a folder, put a link in its place) is refused."""
        parent = os.path.dirname(real)
        if os.path.realpath(parent) != parent:
            raise Fs9Error(errno.ENOENT, "the vault changed on disk under this name")
        return cls(real, disk(os.lstat, real))

    def refresh(self) -> None:
        """lstat again, keeping the bits a view took away from its mode."""
        taken = self.st.st_mode & ~self.mode
        self.st = disk(os.lstat, self.real)
        self.mode = self.st.st_mode & ~taken

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    def size(self) -> int:
        return self.st.st_size


class PassHandle(Handle):
    """An open vault file: a real fd; reads and writes at offsets, in threads."""

    def __init__(self, fd: int, ino: int = 0) -> None:
        super().__init__(pid=0)  # a file's reads never block: no reader to interrupt
        self.fd = fd
        self.ino = ino  # ours: fstat(2) on it asks by inode, also once the name is gone
        self.agent: str | None = None  # whose view opened it (None: the operator)
        self.writing = False
        self.uid: int | None = None  # who opened it: the actor of its changes
        self.wrote = False  # changed through this open: a vault_changed event at release

    async def read(self, off: int, size: int) -> bytes:
        return await in_thread(os.pread, self.fd, size, off)

    async def pwrite(self, off: int, data: bytes) -> int:
        self.wrote = True
        return await in_thread(os.pwrite, self.fd, data, off)

    def close(self) -> None:
        os.close(self.fd)


async def open_file(real: str, flags: int) -> PassHandle:
    """Open without a worker thread: like the lookup (lstat) that just found the file,
    open(2) costs the local disk metadata only, and a thread hop would double the cost
    of opening a small file. Reads and writes of data go to worker threads."""
    # O_NOFOLLOW: the kernel resolved symlinks for the caller already; one here is a race
    return PassHandle(disk(os.open, real, flags | os.O_CLOEXEC | os.O_NOFOLLOW))


def create_file(real: str, flags: int, mode: int) -> tuple[int, bool]:
    """Open real, creating it with exactly mode (not fs9's own umask): (fd, created).
    Blocks (run it in a thread)."""
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW | os.O_CREAT
    try:
        fd = os.open(real, flags | os.O_EXCL, mode)
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        return os.open(real, flags & ~os.O_CREAT), False  # made by another meanwhile
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return fd, True


def settle(real: str, mode: int | None, uid: int, gid: int) -> None:
    """A name fs9 (root) just made for a caller: give it to uid:gid, as the kernel would
    have (a setgid directory's group is inherited), with mode exactly (None: as made,
    a symlink or a file create_file already set). Blocks."""
    parent = os.lstat(os.path.dirname(real))
    if parent.st_mode & stat.S_ISGID:
        gid = parent.st_gid
    st = os.lstat(real)
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.lchown(real, uid, gid)  # (this clears setuid bits: put them back below)
        if mode is None and not stat.S_ISLNK(st.st_mode):
            mode = stat.S_IMODE(st.st_mode)
    if mode is not None:
        if stat.S_ISDIR(st.st_mode) and parent.st_mode & stat.S_ISGID:
            mode |= stat.S_ISGID  # inherited, as mkdir(2) does
        if stat.S_IMODE(os.lstat(real).st_mode) != mode:
            os.chmod(real, mode, follow_symlinks=False)


def scan(real: str) -> list[tuple[str, os.stat_result]]:
    """A vault directory's entries with their lstat, sorted by name. Blocks."""
    with os.scandir(real) as it:
        return sorted((e.name, e.stat(follow_symlinks=False)) for e in it)


def set_attributes(file: str | int, attr, fields) -> None:
    """setattr on a vault file, by path or open fd: size, mode, owner, times
    (passthroughfs.py's order); never through a symlink (see PassNode.at). Blocks."""
    by_fd = isinstance(file, int)
    if fields.update_size:
        fd = file if by_fd else os.open(file, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, attr.st_size)
        finally:
            if not by_fd:
                os.close(fd)
    if fields.update_mode:
        os.chmod(file, stat.S_IMODE(attr.st_mode))
    follow = {} if by_fd else {"follow_symlinks": False}
    if fields.update_uid or fields.update_gid:
        os.chown(file, attr.st_uid if fields.update_uid else -1,
                 attr.st_gid if fields.update_gid else -1, **follow)
    if fields.update_atime or fields.update_mtime:
        st = os.stat(file) if by_fd else os.lstat(file)
        atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
        mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
        os.utime(file, ns=(atime, mtime), **follow)


# --- rename(2) flags: renameat2 through libc -------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def rename(old: str, new: str, flags: int) -> None:
    """rename(2) with renameat2's flags (the kernel's own EINVAL for ones it lacks).
    Blocks."""
    if not flags:
        return os.rename(old, new)
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new),
                       ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# --- extended attributes ---------------------------------------------------------------

def getxattr(real: str, name: str) -> bytes:
    return os.getxattr(real, name, follow_symlinks=False)


def setxattr(real: str, name: str, value: bytes) -> None:
    os.setxattr(real, name, value, follow_symlinks=False)


def listxattr(real: str) -> list[str]:
    return os.listxattr(real, follow_symlinks=False)


def removexattr(real: str, name: str) -> None:
    os.removexattr(real, name, follow_symlinks=False)
