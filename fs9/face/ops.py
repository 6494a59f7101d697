"""pyfuse3.Operations for fs9: each handler resolves the node, calls its kind, returns.

The synthetic kinds (ctl, stream, status, dir) are served here. The vault's own
handlers are in vaultops.py (VaultOps, a mixin: mkdir, rename, xattrs, ..., and the
vault side of getattr, setattr, opendir, open, create and unlink); who may do what
is access.py. Every handler goes through `boundary` (boundary.py): one exception
escaping a pyfuse3 handler ends the whole mount.
"""
import errno
import logging
import os
import select
import stat
import time

import pyfuse3
import trio

from ..errors import Fs9Error
from .access import READONLY_NS, Gate, may_access
from .boundary import boundary, file_name
from .inodes import Inodes
from .kinds import Dir, Handle, Node, Status
from .passthrough import PassHandle, PassNode, in_thread
from ..kernel.names import split_view
from .tree import Tree
from .vaultops import VaultOps

log = logging.getLogger("fs9.face")
CACHE_S = 1.0


class Operations(VaultOps, pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, kernel, nursery: trio.Nursery) -> None:
        super().__init__()
        self.kernel = kernel
        self.tree = Tree(kernel)
        self.uid, self.gid = os.getuid(), os.getgid()
        self.gate = Gate(kernel, self.tree, self.uid)
        self.inodes = Inodes()
        self.nursery = nursery  # for poll notifiers
        self.handles: dict[int, Handle] = {}
        self._seen_kills = len(kernel.killed)
        self.reading: set[trio.CancelScope] = set()  # blocked reads, ended at unmount
        self.closing = False
        self.dirs: dict[int, list[tuple[str, Node, tuple[str, ...]]]] = {}  # listings by fh
        self.transient: dict[tuple[str, ...], Node] = {}  # created files, while open
        self.transient_fh: dict[int, tuple[str, ...]] = {}
        self.cache_keys: dict[int, tuple[int, int]] = {}  # vault inode -> (mtime, size) at open
        self._next_fh = 1
        self._graves = 0  # removed vault names (see _gone)
        self.mtime_ns = time.time_ns()

    # --- helpers ---------------------------------------------------------------

    def _node(self, ino: int) -> tuple[tuple[str, ...], Node]:
        path = self.inodes.path(ino)
        if path is None:
            raise Fs9Error(errno.ENOENT, "stale inode")
        return path, self._resolve(path)

    def _resolve(self, path: tuple[str, ...]) -> Node:
        node = self.transient.get(path)
        return node if node is not None else self.tree.resolve(path)

    def _attrs(self, ino: int, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if isinstance(node, PassNode):  # the file's own attributes, our inode number
            st = node.st  # (node.mode: a view shows what it may not change read-only)
            a.st_mode, a.st_nlink, a.st_uid, a.st_gid = node.mode, st.st_nlink, st.st_uid, st.st_gid
            a.st_size, a.st_blksize, a.st_blocks, a.st_rdev = (
                st.st_size, st.st_blksize, st.st_blocks, st.st_rdev)
            a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
            a.entry_timeout = a.attr_timeout = CACHE_S
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                # each name is an inode of ours: the kernel may not keep one name's
                # attributes while the file changes through another
                a.attr_timeout = 0
            return a
        a.st_mode = node.mode
        a.st_nlink = 2 if isinstance(node, Dir) else 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = node.size()
        a.st_blksize = 4096
        a.st_blocks = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        # The kernel may cache names and attributes for a second (a write would
        # otherwise cost a getattr each); status text changes size, so it is not
        # cached, and a killed agent's names are invalidated (see write).
        a.entry_timeout = CACHE_S
        a.attr_timeout = 0 if isinstance(node, Status) else CACHE_S
        return a

    def _fh(self) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    # --- names -----------------------------------------------------------------

    @boundary
    async def lookup(self, parent_ino, name, ctx=None):
        ppath = self.inodes.path(parent_ino)
        if ppath is None:
            raise Fs9Error(errno.ENOENT, "stale inode")
        name = file_name(name)
        if name in (".", ".."):
            path = ppath if name == "." else ppath[:-1]
        else:
            path = ppath + (name,)
        self.gate.admit(path, ctx)
        try:
            node = self._resolve(path)
        except Fs9Error:
            if self.tree.hidden(path):  # an agent reaching for what its view hides
                viewer, inner = split_view(path)
                self.kernel.log.append("unveil_denied", agent=viewer, path="/".join(inner),
                                       reason="hidden by the agent's view: ENOENT")
            raise
        return self._attrs(self.inodes.lookup(path), node)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            try:
                self.inodes.forget(ino, n)
            except Exception:  # forget must never raise
                log.exception("forget")

    @boundary
    async def getattr(self, ino, ctx=None):
        try:
            path, node = self._node(ino)
        except Fs9Error as e:
            handle = self._open_vault_file(ino, e)  # unlinked or replaced, still open
            return self._attrs(ino, PassNode("", await in_thread(os.fstat, handle.fd)))
        if ctx is not None:
            self.gate.admit(path, ctx)
        return self._attrs(ino, node)

    @boundary
    async def setattr(self, ino, attr, fields, fh, ctx):
        try:
            path, node = self._node(ino)
        except Fs9Error as e:  # a vault file whose name is gone: ftruncate, fchmod, ...
            return await self._set_open_file_attributes(ino, attr, fields, fh, ctx, e)
        self.gate.admit(path, ctx)
        self.gate.check(path, writing=True)  # in a view: EACCES where it may not write
        if isinstance(node, PassNode):
            return await self._set_vault_attributes(ino, path, node, attr, fields, ctx)
        # `echo x > ctl` truncates first and `touch topics/x` sets times: accept (and
        # ignore) exactly those on writable files; modes and owners are the kernel's.
        if node.mode & 0o222 and not isinstance(node, Dir) and not (
                fields.update_mode or fields.update_uid or fields.update_gid):
            return self._attrs(ino, node)
        raise Fs9Error(errno.EPERM, READONLY_NS)

    @boundary
    async def access(self, ino, mode, ctx):
        _, node = self._node(ino)
        if isinstance(node, PassNode):
            return may_access(node, mode, ctx)
        # the namespace's own files: what their mode shows (nothing is executable)
        return not any(mode & want and not node.mode & bits for want, bits in
                       ((os.R_OK, 0o444), (os.W_OK, 0o222), (os.X_OK, 0o111)))

    @boundary
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # --- directories -----------------------------------------------------------

    @boundary
    async def opendir(self, ino, ctx):
        path, node = self._node(ino)
        self.gate.admit(path, ctx)
        if not isinstance(node, Dir) and not (isinstance(node, PassNode) and node.is_dir):
            raise Fs9Error(errno.ENOTDIR, "not a directory")
        # a snapshot at open, so paging is consistent
        if isinstance(node, PassNode):
            entries = await self._vault_listing(path, node)
        else:
            entries = []
            for name in node.names():
                try:
                    entries.append((name, self._resolve(path + (name,))))
                except Fs9Error:
                    pass  # went away while listing
        fh = self._fh()
        self.dirs[fh] = [(name, child, path + (name,)) for name, child in entries]
        return fh

    @boundary
    async def readdir(self, fh, start_id, token):
        for i, (name, node, path) in enumerate(self.dirs[fh][start_id:], start_id):
            if isinstance(node, PassNode):
                # Attributes as of now, not of opendir: the kernel takes these over what
                # it knows unless a change came after this READDIR was sent (a size from
                # the snapshot would undo a write made in between)
                try:
                    node.refresh()
                except Fs9Error:
                    continue  # gone meanwhile
            attrs = self._attrs(self.inodes.number(path), node)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, i + 1):
                break

    @boundary
    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    # --- files -----------------------------------------------------------------

    @boundary
    async def open(self, ino, flags, ctx):
        path, node = self._node(ino)
        self.gate.admit(path, ctx)
        writing = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        if flags & os.O_ACCMODE != os.O_WRONLY:
            self.gate.check(path, writing=False)
        if writing or flags & os.O_TRUNC:
            self.gate.check(path, writing=True)
        if isinstance(node, PassNode):
            return await self._open_vault(ino, path, node, flags, writing, ctx)
        handle = node.open(writing, ctx.pid)
        fh = self._fh()
        self.handles[fh] = handle
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False,
                                nonseekable=node.stream)

    @boundary
    async def read(self, fh, off, size):
        handle = self._handle(fh)
        if self.closing:
            return b""
        with trio.CancelScope() as scope:
            self.reading.add(scope)
            try:
                return await handle.read(off, size)
            finally:
                self.reading.discard(scope)
        return b""  # cancelled by end_reads: the reader sees EOF

    def end_reads(self) -> None:
        """Unmounting: every blocked reader gets EOF, so pyfuse3's workers can finish."""
        self.closing = True
        for scope in list(self.reading):
            scope.cancel()

    @boundary
    async def write(self, fh, off, buf):
        handle = self._handle(fh)
        if isinstance(handle, PassHandle):
            return await handle.pwrite(off, bytes(buf))  # a vault_changed event at release
        n = handle.write(bytes(buf))
        await self._invalidate_killed()
        return n

    async def _invalidate_killed(self) -> None:
        """Drop the kernel's cached names of agents killed since we last looked.

        Done before the killing write returns, so `echo 'kill x' > ctl; ls agents/x`
        fails at once. Synchronous invalidation must not run on the trio thread
        (the kernel may wait on a request we serve), hence the worker thread."""
        kills = self.kernel.killed
        while self._seen_kills < len(kills):
            name = kills[self._seen_kills]
            self._seen_kills += 1
            parent = self.inodes.known(("agents",))
            if parent is not None and self.inodes.known(("agents", name)) is not None:
                try:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent,
                                                  os.fsencode(name))
                except OSError:
                    pass  # the kernel had already dropped it

    @boundary
    async def flush(self, fh):
        self._handle(fh).flush()

    @boundary
    async def release(self, fh):
        path = self.transient_fh.pop(fh, None)
        if path is not None and path not in self.transient_fh.values():
            self.transient.pop(path, None)
        handle = self.handles.pop(fh, None)
        if isinstance(handle, PassHandle):
            handle.close()
            if handle.wrote:
                self.kernel.vault_changes.report(self.inodes.path(handle.ino) or (), "modified",
                                          handle.uid)
        elif handle is not None and handle.poll_scope is not None:
            handle.poll_scope.cancel()

    @boundary
    async def fsync(self, fh, datasync):
        handle = self._handle(fh)
        if isinstance(handle, PassHandle):
            await in_thread(os.fdatasync if datasync else os.fsync, handle.fd)
        # synthetic files: every accepted write is already committed to the log

    @boundary
    async def poll(self, ino, fh, poll_handle, ctx):
        handle = self._handle(fh)
        if handle.readable():
            return select.POLLIN | select.POLLRDNORM | select.POLLOUT | select.POLLWRNORM
        if poll_handle is not None:
            handle.poll_handle = poll_handle  # a fresh handle replaces the old one
            if handle.poll_scope is None:
                self.nursery.start_soon(self._notify_when_readable, handle)
        return select.POLLOUT | select.POLLWRNORM

    async def _notify_when_readable(self, handle: Handle) -> None:
        with trio.CancelScope() as handle.poll_scope:
            try:
                await handle.wait_readable()
                handle.poll_handle.notify()
            except Exception:
                log.exception("poll notify")
        handle.poll_scope = None

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise Fs9Error(errno.EBADF, "bad file handle")

    # --- names made and removed (the vault's: vaultops.py) ---------------------

    @boundary
    async def create(self, parent_ino, name, mode, flags, ctx):
        """A new name in a directory that takes files: mail/ (one message, sent at
        close), topics/ (a new topic; each write publishes), or the vault."""
        ppath, parent = self._node(parent_ino)
        self.gate.admit(ppath, ctx)
        if isinstance(parent, PassNode):
            return await self._create_vault(parent_ino, name, mode, flags, ctx)
        if not isinstance(parent, Dir) or parent.create is None:
            raise Fs9Error(errno.EACCES, READONLY_NS)
        path = ppath + (file_name(name),)
        self.gate.check(path, writing=True)
        node = parent.create(path[-1])
        fh = self._fh()
        self.handles[fh] = node.open(True, ctx.pid)
        attrs = self._attrs(self.inodes.lookup(path), node)
        if not node.stream:
            # A message file exists only while it is open (it is sent at close): serve
            # its name from `transient` until then, and let the kernel cache nothing.
            self.transient[path] = node
            self.transient_fh[fh] = path
            attrs.entry_timeout = attrs.attr_timeout = 0
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False), attrs

    @boundary
    async def unlink(self, parent_ino, name, ctx):
        path = (self.inodes.path(parent_ino) or ()) + (file_name(name),)
        self.gate.admit(path, ctx)
        node = self.tree.resolve(path)  # ENOENT if absent
        self.gate.check(path, writing=True, removing=True)
        if isinstance(node, PassNode):
            return await self._unlink_vault(path, node, ctx)
        if getattr(node, "remove", None) is None:
            raise Fs9Error(errno.EACCES, READONLY_NS)
        node.remove()
