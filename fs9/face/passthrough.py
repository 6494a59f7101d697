"""Passthrough: the file kind of `vault/`, a real directory on disk.

A PassNode is a path under the vault's backing directory, looked up afresh per
request (like the synthetic nodes: the disk is the truth, also when an editor
changes it behind our back). Blocking disk I/O runs in worker threads; OSError
becomes Fs9Error with the same errno, as pyfuse3's passthroughfs.py does.
"""
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
    create = None  # ops.py creates files here itself (it needs the flags and the caller)

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

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    def size(self) -> int:
        return self.st.st_size

    def names(self) -> list[str]:
        if not self.is_dir:
            raise Fs9Error(errno.ENOTDIR, "not a directory")
        return sorted(disk(os.listdir, self.real))

    def open(self, writing: bool, pid: int):
        raise Fs9Error(errno.EIO, "vault files open through ops.open")  # never called


class PassHandle(Handle):
    """An open vault file: a real fd; reads and writes at offsets, in threads."""

    def __init__(self, fd: int) -> None:
        super().__init__(pid=0)  # a file's reads never block: no reader to interrupt
        self.fd = fd

    async def read(self, off: int, size: int) -> bytes:
        return await in_thread(os.pread, self.fd, size, off)

    async def pwrite(self, off: int, data: bytes) -> int:
        return await in_thread(os.pwrite, self.fd, data, off)

    def close(self) -> None:
        os.close(self.fd)


async def open_file(real: str, flags: int, mode: int = 0o644) -> PassHandle:
    # O_NOFOLLOW: the kernel resolved symlinks for the caller already; one here is a race
    return PassHandle(await in_thread(os.open, real, flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode))
