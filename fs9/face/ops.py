"""pyfuse3.Operations for fs9: each handler resolves the node, asks the gate, calls the
node's operation (kinds.py), returns.

No handler asks what kind of file it holds: ctl, status, stream, dir and the vault answer
the same protocol (Node, Handle), and a kind that lacks an operation refuses it by
Node's defaults (Node.can: before the gate, as the kernel answers for a file system
without it). Here: inode bookkeeping (inodes.py), per-open handles and listings, pyfuse3's
types. Who may do what is access.py; every handler goes through `boundary`
(boundary.py): one exception escaping a pyfuse3 handler ends the whole mount.
"""
import errno
import logging
import os
import time

import pyfuse3
import trio

from ..errors import Fs9Error
from ..kernel.kernel import REFUSALS_PER_S
from ..kernel.names import shown_path, split_view
from ..kernel.rate import Burst
from .access import Gate
from .boundary import boundary, file_name
from .changes import Changes
from .desktop import is_desktop_program
from .fdflags import FdFlags
from .held import ENTRY_BYTES, Held
from .inodes import Inodes
from .node import Handle, Node
from .reads import Reads
from .walk import Tree
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel.kernel import Kernel

log = logging.getLogger("fs9.face")
CACHE_S = 1.0


class Operations(Changes, Reads, pyfuse3.Operations):
    """The handlers; those that make, move and remove names and change attributes are
    changes.py's (Changes), reads and polls reads.py's (Reads)."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, kernel: "Kernel", nursery: trio.Nursery,
                 share_vault: bool = False) -> None:
        super().__init__()
        self.kernel = kernel
        self.tree = Tree(kernel)
        self.uid, self.gid = os.getuid(), os.getgid()
        self.gate = Gate(kernel, self.tree, self.uid, share_vault)
        self.inodes = Inodes()
        self.fdflags = FdFlags(kernel.mount_path)  # readers' O_NONBLOCK now (fdflags.py)
        self.held = Held(kernel)  # what each agent holds open (held.py)
        self.nursery = nursery  # for poll notifiers
        self.handles: dict[int, Handle] = {}
        self.reading: set[trio.CancelScope] = set()  # blocked reads, ended at unmount
        self.blocked: dict[str, int] = {}  # agent -> its reads waiting now (see read)
        self.blocked_total = 0  # their sum (kept, not summed at each read)
        self.closing = False
        # listings by fh: (the directory's node, its (name, node, path) entries)
        self.dirs: dict[int, tuple[Node, list[tuple[str, Node, tuple[str, ...]]]]] = {}
        self.transient: dict[tuple[str, ...], Node] = {}  # created files, while open
        self.transient_fh: dict[int, tuple[str, ...]] = {}
        self.cache_keys: dict[int, tuple[int, int]] = {}  # inode -> Handle.cache_key at open
        self._next_fh = 1
        self.mtime_ns = time.time_ns()
        self._hidden_lookups = Burst(REFUSALS_PER_S)  # unveil_denied events, per agent

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
        s = node.attrs()
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode, a.st_nlink, a.st_size = s.mode, s.nlink, s.size
        a.st_uid = self.uid if s.uid is None else s.uid
        a.st_gid = self.gid if s.gid is None else s.gid
        a.st_blksize, a.st_blocks, a.st_rdev = s.blksize, s.blocks, s.rdev
        born = self.mtime_ns if node.changed_ns is None else node.changed_ns
        a.st_atime_ns = born if s.atime_ns is None else s.atime_ns
        a.st_mtime_ns = born if s.mtime_ns is None else s.mtime_ns
        a.st_ctime_ns = born if s.ctime_ns is None else s.ctime_ns
        # The kernel may cache names and attributes for a second (a write would
        # otherwise cost a getattr each); status text changes size, so it is not
        # cached, and a killed agent's names are invalidated (see write).
        a.entry_timeout = CACHE_S
        a.attr_timeout = CACHE_S if s.cacheable else 0
        if self.gate.share_vault:
            # users share the kernel's caches: a name or attributes cached for one would
            # reach another with no request, so none of its checks (search permission)
            a.entry_timeout = a.attr_timeout = 0
        return a

    def _entry(self, path: tuple[str, ...], node: Node) -> pyfuse3.EntryAttributes:
        """A name the kernel now knows: one lookup counted."""
        return self._attrs(self.inodes.lookup(path, self._file(path, node)), node)

    def _fh(self) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    async def _node_or_file(self, ino: int, fh=None) -> tuple[tuple[str, ...] | None, Node]:
        """(path, node) of inode ino; once its name is gone (unlinked, renamed over) while
        the file is open (fh, else any handle of it): (None, the file reached through its
        handle's fd: fstat(2), ftruncate(2) and friends). The gate admitted its opener
        at open."""
        try:
            return self._node(ino)
        except Fs9Error as e:
            if fh is not None:
                handles = [self._handle(fh)]
            else:
                handles = list(self.handles.values()) if e.errno == errno.ENOENT else []
            for handle in handles:
                if handle.ino == ino and (node := await handle.file()) is not None:
                    return None, node
            raise

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
            path = self._named(ppath, name)
        self.gate.admit(path, ctx)
        self.gate.check_walk(path)
        try:
            node = self._resolve(path)
        except Fs9Error:
            if self.tree.hidden(path):  # an agent reaching for what its view hides
                viewer, inner = split_view(path)
                # a lookup in a loop must not write a row each (ENOENT is not cached):
                # past the refusals' rate they are counted, the next row says how many
                extra = self._hidden_lookups.admit(viewer, int(trio.current_time()))
                if extra is not None:
                    self.kernel.log.append("unveil_denied", agent=viewer,
                                           path=shown_path(inner),
                                           reason="hidden by the agent's view: ENOENT",
                                           **extra)
            raise
        return self._entry(path, node)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            try:
                self.inodes.forget(ino, n)
                if self.inodes.path(ino) is None:  # gone from the kernel, its pages too:
                    self.cache_keys.pop(ino, None)  # (else one entry a file, for ever)
            except Exception:  # forget must never raise
                log.exception("forget")

    @boundary
    async def getattr(self, ino, ctx=None):
        path, node = await self._node_or_file(ino)
        if path is not None and ctx is not None:
            self.gate.admit(path, ctx)
        return self._attrs(ino, node)

    @boundary
    async def setattr(self, ino, attr, fields, fh, ctx):
        path, node = await self._node_or_file(ino, fh)
        if path is not None:
            self.gate.admit(path, ctx)
            self.gate.check(path, writing=True)  # in a view: EACCES where it may not write
            self.gate.may_set(node, attr, fields, fh, ctx)
        return self._attrs(ino, await node.setattr(attr, fields, ctx))

    @boundary
    async def access(self, ino, mode, ctx):
        path, node = self._node(ino)
        self.gate.admit(path, ctx)
        return node.access(mode, ctx)

    @boundary
    async def statfs(self, ctx):
        """The vault's backing file system (without a vault, the state directory's): what
        `df` and a file manager's free-space check before a copy see. The vault through
        its directory fd (nothing an agent can change is followed); in a worker, as a
        network file system may be slow to answer."""
        root = self.kernel.vault_root
        try:
            if root is not None:
                v = await trio.to_thread.run_sync(os.fstatvfs, root.fd)
            else:
                v = await trio.to_thread.run_sync(os.statvfs, self.kernel.state_dir)
        except OSError as e:  # (the vault closed: unmounting)
            raise Fs9Error(e.errno or errno.EIO, f"statfs: {e.strerror}")
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize, s.f_namemax = v.f_bsize, v.f_frsize, 255
        s.f_blocks, s.f_bfree, s.f_bavail = v.f_blocks, v.f_bfree, v.f_bavail
        s.f_files, s.f_ffree, s.f_favail = v.f_files, v.f_ffree, v.f_favail
        return s

    # --- directories -----------------------------------------------------------

    @boundary
    async def opendir(self, ino, ctx):
        path, node = self._node(ino)
        self.gate.admit(path, ctx, listing=True)
        self.gate.check_listing(path)
        self.gate.may(node, os.R_OK, ctx, "list a directory")
        self.held.check(split_view(path)[0], path)
        fh = self._fh()
        self.held.add(fh, split_view(path)[0])
        try:
            self.held.room(fh, 0, lambda: path)
            # a snapshot at open, so paging is consistent
            entries = await node.listing(lambda name: self._resolve(path + (name,)))
        except BaseException:
            self.held.drop(fh)
            raise
        self.held.keep(fh, len(entries) * ENTRY_BYTES)
        self.dirs[fh] = node, [(name, child, path + (name,)) for name, child in entries]
        return fh

    @boundary
    async def readdir(self, fh, start_id, token):
        for i, (name, node, path) in enumerate(self.dirs[fh][1][start_id:], start_id):
            # Attributes as of now, not of opendir: the kernel takes these over what it
            # knows unless a change came after this READDIR was sent (a size from the
            # snapshot would undo a write made in between)
            try:
                node.refresh()
            except Fs9Error:
                continue  # gone meanwhile
            attrs = self._attrs(self.inodes.number(path, self._file(path, node)), node)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, i + 1):
                break

    @boundary
    async def releasedir(self, fh):
        listed = self.dirs.pop(fh, None)
        self.held.drop(fh)
        if listed is not None:
            listed[0].closedir()

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
        self.gate.may_open(node, flags, ctx)
        self.held.check(split_view(path)[0], path)
        handle = await node.open(flags, ctx)
        handle.opener = split_view(path)[0]  # whose blocked reads it counts (None: operator)
        handle.nonblocking = bool(flags & os.O_NONBLOCK)
        if node.stream and handle.opener is None and is_desktop_program(ctx.pid):
            handle.snapshot()  # it never traps an app (desktop.py)
        return pyfuse3.FileInfo(fh=self._opened(ino, handle), direct_io=handle.direct_io,
                                keep_cache=self._unchanged(ino, handle), nonseekable=node.stream)

    def _opened(self, ino: int, handle: Handle) -> int:
        fh = self._fh()
        handle.ino = ino
        self.handles[fh] = handle
        self.held.add(fh, handle.opener)
        return fh

    def _unchanged(self, ino: int, handle: Handle) -> bool:
        """Files in the page cache (the vault's, Handle.direct_io False) are close to
        open consistent, as NFS: what the kernel cached is kept at open only if the
        file's mtime and size are those it had at its previous open; otherwise (an
        editor changed it behind our back) the cache is dropped."""
        if handle.cache_key is None:
            return False
        same = self.cache_keys.get(ino) == handle.cache_key
        self.cache_keys[ino] = handle.cache_key
        return same

    @boundary
    async def write(self, fh, off, buf):
        n = await self._handle(fh).write(off, bytes(buf))
        if self.kernel.killed:
            await self._invalidate_killed()
        return n

    async def _invalidate_killed(self) -> None:
        """Drop the kernel's cached names of agents killed since we last looked.

        Done before the killing write returns, so `echo 'kill x' > ctl; ls agents/x`
        fails at once. Synchronous invalidation must not run on the trio thread
        (the kernel may wait on a request we serve), hence the worker thread."""
        kills = self.kernel.killed
        while kills:
            name = kills.popleft()
            parent = self.inodes.known(("agents",))
            if parent is not None and self.inodes.known(("agents", name)) is not None:
                try:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent,
                                                  os.fsencode(name))
                except OSError:
                    pass  # the kernel had already dropped it

    @boundary
    async def flush(self, fh):
        done = self._handle(fh).flush()
        if done is not None:  # (kinds.CtlHandle.flush)
            await done

    @boundary
    async def release(self, fh):
        path = self.transient_fh.pop(fh, None)
        if path is not None and path not in self.transient_fh.values():
            self.transient.pop(path, None)
        handle = self.handles.pop(fh, None)
        self.held.drop(fh)
        if handle is not None:
            if handle.poll_scope is not None:
                handle.poll_scope.cancel()
            # where the file is now: a vault file changed through this open is one
            # vault_changed event there, naming its actor (VaultHandle.close)
            handle.close(self.inodes.path(handle.ino) or ())

    @boundary
    async def fsync(self, fh, datasync):
        await self._handle(fh).fsync(bool(datasync))

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise Fs9Error(errno.EBADF, "bad file handle")
