"""A minimal pyfuse3 server: the baseline that bench/foundation.py compares fs9 with.

    python bench/bare_pyfuse3.py MOUNTPOINT

Serves three files: `sink`, which accepts writes and discards them (opened
direct_io, like fs9's files); `logged`, whose every write is one row INSERTed and
committed into a SQLite log (WAL, synchronous=NORMAL, as fs9's event log) before it is
answered: the floor of a server that logs each command before it answers; and `pipe`,
whose reads block until the next write to `sink` (for a bare FUSE wake-up baseline).
Prints "ready" on stdout once mounted; serves until SIGTERM/SIGINT, then unmounts (the
log is a temporary file, removed).
"""
import errno
import os
import signal
import sqlite3
import stat
import sys
import tempfile
import time

import pyfuse3
import trio

SINK_INO = pyfuse3.ROOT_INODE + 1
PIPE_INO = pyfuse3.ROOT_INODE + 2
LOGGED_INO = pyfuse3.ROOT_INODE + 3
NAMES = {b"sink": SINK_INO, b"pipe": PIPE_INO, b"logged": LOGGED_INO}


class Sink(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.now = time.time_ns()
        self.written = 0
        self.wake = trio.Event()
        self.dir = tempfile.mkdtemp(prefix="bare-log-")
        self.db = sqlite3.connect(os.path.join(self.dir, "log.sqlite"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, ts REAL, data BLOB)")
        self.seq = 0

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            a.st_mode, a.st_nlink = stat.S_IFREG | 0o666, 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = 0
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.now
        a.attr_timeout = a.entry_timeout = 0  # as fs9 does
        return a

    async def lookup(self, parent_ino, name, ctx=None):
        if parent_ino != pyfuse3.ROOT_INODE or name not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(NAMES[name])

    async def getattr(self, ino, ctx=None):
        return self._attrs(ino)

    async def setattr(self, ino, attr, fields, fh, ctx):
        return self._attrs(ino)  # O_TRUNC: nothing to truncate

    async def opendir(self, ino, ctx):
        return ino

    async def readdir(self, fh, start_id, token):
        for i, (name, ino) in enumerate(list(NAMES.items())[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino), i + 1):
                break

    async def open(self, ino, flags, ctx):
        if ino not in (SINK_INO, PIPE_INO, LOGGED_INO):
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=ino, direct_io=True, keep_cache=False,
                                nonseekable=ino == PIPE_INO)

    async def read(self, fh, off, size):
        if fh != PIPE_INO:
            return b""
        if self.wake.is_set():
            self.wake = trio.Event()  # wait for a write after this read began
        await self.wake.wait()
        return b"x\n"

    async def write(self, fh, off, buf):
        self.written += len(buf)
        if fh == LOGGED_INO:
            self.seq += 1
            self.db.execute("INSERT INTO events VALUES (?,?,?)", (self.seq, time.time(), buf))
        self.wake.set()
        return len(buf)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass


async def main(mountpoint: str) -> None:
    ops = Sink()
    options = set(pyfuse3.default_options) | {"fsname=bare_pyfuse3"}
    pyfuse3.init(ops, mountpoint, options)
    try:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal():
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        ops.wake.set()  # let a blocked reader finish
                        pyfuse3.terminate()
                        return
            nursery.start_soon(stop_on_signal)
            print("ready", flush=True)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        ops.db.close()
        for name in os.listdir(ops.dir):
            os.remove(os.path.join(ops.dir, name))
        os.rmdir(ops.dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} MOUNTPOINT")
    trio.run(main, sys.argv[1])
