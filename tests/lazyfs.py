"""A file system that loses what was not fsynced: the tests' power cut (after LazyFS).

    python tests/lazyfs.py BACKING MOUNTPOINT CONTROL_SOCKET

serves the directory BACKING at MOUNTPOINT. Directory operations pass straight
through; file data written is kept in this process's memory (the "page cache") and
reaches BACKING only when the file is fsynced. So killing this process is a power
cut: every write not yet fsynced is gone, and mounting BACKING again (plainly, or
through a new lazyfs) shows what a disk would hold after it. (Names made or removed
are not held back: only data, as in LazyFS's default.)

Faults, by a line to CONTROL_SOCKET (a Unix stream socket; the reply is "ok"):
    fail-writes    every write(2) fails with EIO (nothing kept)
    fail-fsyncs    every fsync fails with EIO and drops the unsynced data, as Linux
                   may drop the pages of a failed writeback
    heal           no more faults
    unsynced       the reply is the number of bytes held unsynced

It runs as its own process: pyfuse3 serves one mount per process.
"""
import errno
import os
import stat
import sys

import pyfuse3
import trio

PAGE = 4096


class Dirty:
    """One file's unsynced state: pages written since its last fsync, its size, and the
    smallest size it had since (backing bytes past that are gone, even if it grew)."""

    def __init__(self, size: int) -> None:
        self.pages: dict[int, bytearray] = {}
        self.size = self.floor = size


class LazyFS(pyfuse3.Operations):
    def __init__(self, backing: str) -> None:
        super().__init__()
        self.paths = {pyfuse3.ROOT_INODE: backing}  # inode -> a path of it in BACKING
        self.backing_ino = {os.lstat(backing).st_ino: pyfuse3.ROOT_INODE}
        self.dirty: dict[int, Dirty] = {}  # inode -> unsynced data
        self.fds: dict[int, int] = {}  # fh -> fd on the backing file
        self.fh_ino: dict[int, int] = {}
        self.fail_writes = self.fail_fsyncs = False

    # --- names ------------------------------------------------------------------------
    def _path(self, ino: int, name: bytes | None = None) -> str:
        try:
            base = self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return base if name is None else os.path.join(base, os.fsdecode(name))

    def _ino(self, path: str, st: os.stat_result) -> int:
        ino = self.backing_ino.setdefault(st.st_ino, st.st_ino + 1)
        self.paths[ino] = path
        return ino

    def _attr(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.st_mode, a.st_nlink = ino, st.st_mode, st.st_nlink
        a.st_uid, a.st_gid, a.st_rdev = st.st_uid, st.st_gid, st.st_rdev
        a.st_size = self.dirty[ino].size if ino in self.dirty else st.st_size
        a.st_blksize, a.st_blocks = PAGE, (a.st_size + 511) // 512
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.attr_timeout = a.entry_timeout = 0  # sizes change here, not on BACKING
        return a

    def _stat(self, path: str) -> os.stat_result:
        try:
            return os.lstat(path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno)

    async def lookup(self, parent, name, ctx=None):
        path = self._path(parent, name)
        st = self._stat(path)
        return self._attr(self._ino(path, st), st)

    async def getattr(self, ino, ctx=None):
        return self._attr(ino, self._stat(self._path(ino)))

    async def setattr(self, ino, attr, fields, fh, ctx):
        path = self._path(ino)
        try:
            if fields.update_size:
                self._resize(ino, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno)
        return await self.getattr(ino)

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        entries = sorted(os.listdir(path))
        for i, name in enumerate(entries[start_id:], start_id):
            full = os.path.join(path, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                         self._attr(self._ino(full, st), st), i + 1):
                break

    async def opendir(self, ino, ctx):
        self._path(ino)
        return ino

    async def releasedir(self, fh):
        pass

    async def fsyncdir(self, fh, datasync):
        fd = os.open(self._path(fh), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def mkdir(self, parent, name, mode, ctx):
        path = self._path(parent, name)
        try:
            os.mkdir(path, mode)
            os.chown(path, ctx.uid, ctx.gid)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno)
        return await self.lookup(parent, name)

    async def rmdir(self, parent, name, ctx):
        try:
            os.rmdir(self._path(parent, name))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno)

    async def unlink(self, parent, name, ctx):
        path = self._path(parent, name)
        try:
            st = os.lstat(path)
            os.unlink(path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno)
        ino = self.backing_ino.get(st.st_ino)
        if ino is not None and st.st_nlink == 1 and ino not in self.fh_ino.values():
            self._forget_file(ino, st.st_ino)

    def _forget_file(self, ino: int, backing: int) -> None:
        self.dirty.pop(ino, None)
        self.paths.pop(ino, None)
        self.backing_ino.pop(backing, None)

    async def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        old, new = self._path(parent_old, name_old), self._path(parent_new, name_new)
        try:
            replaced = os.lstat(new)
        except OSError:
            replaced = None
        try:
            os.rename(old, new)
            st = os.lstat(new)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno)
        self.paths[self._ino(new, st)] = new
        gone = replaced and replaced.st_nlink == 1 and self.backing_ino.get(replaced.st_ino)
        if gone and gone not in self.fh_ino.values():
            self._forget_file(gone, replaced.st_ino)

    async def statfs(self, ctx):
        s, out = os.statvfs(self.paths[pyfuse3.ROOT_INODE]), pyfuse3.StatvfsData()
        for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                    "f_ffree", "f_favail", "f_namemax"):
            setattr(out, key, getattr(s, key))
        return out

    async def access(self, ino, mode, ctx):
        return True

    # --- file data: held until fsync ----------------------------------------------------
    async def open(self, ino, flags, ctx):
        try:
            # read-write whatever the open asked: an fsync through a read-only open
            # still writes this file's held pages
            fd = os.open(self._path(ino), os.O_RDWR)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno)
        self.fds[fd], self.fh_ino[fd] = fd, ino
        if flags & os.O_TRUNC:
            self._resize(ino, 0)
        # keep_cache: every change to these files passes through this mount's page cache
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def create(self, parent, name, mode, flags, ctx):
        path = self._path(parent, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, stat.S_IMODE(mode))
            os.fchown(fd, ctx.uid, ctx.gid)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno)
        st = os.fstat(fd)
        ino = self._ino(path, st)
        self.fds[fd], self.fh_ino[fd] = fd, ino
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._attr(ino, st)

    def _dirty(self, ino: int) -> Dirty:
        if ino not in self.dirty:
            self.dirty[ino] = Dirty(os.lstat(self._path(ino)).st_size)
        return self.dirty[ino]

    def _page(self, ino: int, fd: int, index: int) -> bytes:
        """Page index of the file as a reader sees it: PAGE bytes, zeros past the end."""
        d = self.dirty.get(ino)
        if d is not None and index in d.pages:
            return bytes(d.pages[index])
        data = os.pread(fd, PAGE, index * PAGE)
        if d is not None:  # past a shrink not yet synced, the backing bytes are gone
            data = data[:max(0, d.floor - index * PAGE)]
        return data.ljust(PAGE, b"\0")

    def _resize(self, ino: int, size: int) -> None:
        d = self._dirty(ino)
        for index in [i for i in d.pages if i * PAGE >= size]:
            del d.pages[index]
        if size % PAGE and size // PAGE in d.pages:
            d.pages[size // PAGE][size % PAGE:] = bytes(PAGE - size % PAGE)
        d.size, d.floor = size, min(d.floor, size)

    def _size(self, ino: int, fd: int) -> int:
        d = self.dirty.get(ino)
        return d.size if d is not None else os.fstat(fd).st_size

    async def read(self, fh, off, size):
        ino, fd = self.fh_ino[fh], self.fds[fh]
        end = min(off + size, self._size(ino, fd))
        if end <= off:
            return b""
        first = off // PAGE
        out = b"".join(self._page(ino, fd, i) for i in range(first, (end - 1) // PAGE + 1))
        return out[off - first * PAGE:end - first * PAGE]

    async def write(self, fh, off, buf):
        if self.fail_writes:
            raise pyfuse3.FUSEError(errno.EIO)
        ino, fd = self.fh_ino[fh], self.fds[fh]
        d = self._dirty(ino)
        pos, view = off, memoryview(buf)
        while view:
            index, at = pos // PAGE, pos % PAGE
            if index not in d.pages:
                d.pages[index] = bytearray(self._page(ino, fd, index))
            n = min(PAGE - at, len(view))
            d.pages[index][at:at + n] = view[:n]
            pos, view = pos + n, view[n:]
        d.size = max(d.size, off + len(buf))
        return len(buf)

    async def fsync(self, fh, datasync):
        ino, fd = self.fh_ino[fh], self.fds[fh]
        if self.fail_fsyncs:
            self.dirty.pop(ino, None)  # the pages of a failed writeback are gone
            raise pyfuse3.FUSEError(errno.EIO)
        d = self.dirty.pop(ino, None)
        if d is not None:
            os.ftruncate(fd, d.floor)
            for index, page in sorted(d.pages.items()):
                os.pwrite(fd, bytes(page[:max(0, d.size - index * PAGE)]), index * PAGE)
            os.ftruncate(fd, d.size)
        os.fsync(fd)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        fd, ino = self.fds.pop(fh), self.fh_ino.pop(fh)
        st = os.fstat(fd)
        if st.st_nlink == 0 and ino not in self.fh_ino.values():
            self._forget_file(ino, st.st_ino)  # unlinked while open: gone with its last close
        os.close(fd)

    def unsynced(self) -> int:
        return sum(len(d.pages) * PAGE for d in self.dirty.values())


async def control(fs: LazyFS, path: str) -> None:
    listener = trio.SocketListener(await _bind(path))
    async def serve(stream):
        async with stream:
            line = (await stream.receive_some(256)).decode().strip()
            reply = "ok"
            if line == "fail-writes":
                fs.fail_writes = True
            elif line == "fail-fsyncs":
                fs.fail_fsyncs = True
            elif line == "heal":
                fs.fail_writes = fs.fail_fsyncs = False
            elif line == "unsynced":
                reply = str(fs.unsynced())
            else:
                reply = f"unknown command {line!r}"
            await stream.send_all(reply.encode() + b"\n")
    await trio.serve_listeners(serve, [listener])


async def _bind(path: str):
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(8)
    return sock


async def main(backing: str, mountpoint: str, control_path: str) -> None:
    fs = LazyFS(os.path.abspath(backing))
    options = set(pyfuse3.default_options) - {"default_permissions"}
    pyfuse3.init(fs, mountpoint, options | {"fsname=lazyfs", "allow_other"})
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(control, fs, control_path)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    trio.run(main, *sys.argv[1:4])
