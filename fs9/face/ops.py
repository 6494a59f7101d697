"""pyfuse3.Operations for fs9: each handler resolves the node, calls its kind, returns.

Every handler goes through `boundary`: Fs9Error becomes its errno, anything
else becomes EIO plus a logged traceback, because one exception escaping a
pyfuse3 handler ends the whole mount.
"""
import contextlib
import errno
import functools
import logging
import os
import select
import stat
import time
import traceback

import pyfuse3
import trio

from ..errors import Fs9Error
from .inodes import Inodes
from .kinds import Dir, Handle, Node, Status
from . import passthrough
from .passthrough import (RENAME_EXCHANGE, PassHandle, PassNode, create_file, in_thread,
                          open_file, settle)
from .tree import Tree, split_view

log = logging.getLogger("fs9.face")
CACHE_S = 1.0
READONLY_NS = "the namespace is made by the kernel: files come and go through ctl"
NO_XATTRS = "only vault files have extended attributes"
OWNER_XATTR, CLASS_XATTR = "user.fs9.owner", "user.fs9.classification"


def boundary(fn):
    @functools.wraps(fn)
    async def handler(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Fs9Error as e:
            log.debug("%s%r: %s", fn.__name__, args[:2], e)
            raise pyfuse3.FUSEError(e.errno)
        except Exception:
            text = traceback.format_exc()
            log.error("bug in %s: %s", fn.__name__, text)
            try:
                self.kernel.log.append("bug", handler=fn.__name__, traceback=text)
            except Exception:
                pass
            raise pyfuse3.FUSEError(errno.EIO)
    return handler


def _name(raw: bytes) -> str:
    """A name from the kernel; every name in the namespace is UTF-8 of at most 255 bytes."""
    if len(raw) > 255:
        raise Fs9Error(errno.ENAMETOOLONG, "file name too long")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise Fs9Error(errno.ENOENT, "no such file (names here are UTF-8)")


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, kernel, nursery: trio.Nursery) -> None:
        super().__init__()
        self.kernel = kernel
        self.tree = Tree(kernel)
        self.inodes = Inodes()
        self.nursery = nursery  # for poll notifiers
        self.handles: dict[int, Handle] = {}
        self._seen_kills = len(kernel.killed)
        self.reading: set[trio.CancelScope] = set()  # blocked reads, ended at unmount
        self.closing = False
        self.dirs: dict[int, list[tuple[str, Node]]] = {}
        self.transient: dict[tuple[str, ...], Node] = {}  # created files, while open
        self.transient_fh: dict[int, tuple[str, ...]] = {}
        self.cache_keys: dict[int, tuple[int, int]] = {}  # vault inode -> (mtime, size) at open
        self._next_fh = 1
        self._graves = 0  # removed vault names (see _gone)
        self.uid, self.gid = os.getuid(), os.getgid()
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

    def _admit(self, path: tuple[str, ...], ctx) -> None:
        """Only the operator (the mounting user, or root) uses the whole tree; an agent's
        uid only its own view. Defence in depth: a confined agent's mount namespace
        shows it nothing else anyway."""
        if ctx.uid in (0, self.uid):
            return
        viewer, _ = split_view(path)
        agent = self.kernel.agents.get(viewer) if viewer else None
        if agent is None or agent.uid != ctx.uid:
            raise Fs9Error(errno.EACCES, "not yours")

    @contextlib.contextmanager
    def _refusals_logged(self, path: tuple[str, ...]):
        """A refusal (Fs9Error) made in the block is an event and a line in the err of
        the agent whose view path is in, then goes on to the caller."""
        try:
            yield
        except Fs9Error as e:
            viewer, inner = split_view(path)
            self.kernel.refused(e, agent=viewer, file="/".join(inner))
            raise

    def _check(self, path: tuple[str, ...], writing: bool, removing: bool = False) -> None:
        """A view's refusal of a write (unveil mode, pledge, ownership) or read: logged."""
        viewer, inner = split_view(path)
        if viewer is None:
            return
        with self._refusals_logged(path):
            view = self.tree.view(viewer)
            if removing:
                view.check_remove(inner)
            else:
                view.check_write(inner) if writing else view.check_read(inner)
            if writing and inner[:1] == ("vault",) and len(inner) > 1:
                owner = self.kernel.owner_of(inner)
                if owner != viewer:
                    raise Fs9Error(errno.EACCES, f"{'/'.join(inner)} is owned by "
                                   + (f"agent {owner}: ask it by mail" if owner else
                                      "no agent: only the operator changes it"))

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

    def _unchanged(self, ino: int, node: PassNode) -> bool:
        """Vault files use the page cache (reads at memory speed, readahead). Close to
        open consistency, as NFS: what the kernel cached is kept at open only if the
        file's mtime and size are those it had at its previous open; otherwise (an
        editor changed it behind our back) the cache is dropped."""
        seen = (node.st.st_mtime_ns, node.st.st_size)
        same = self.cache_keys.get(ino) == seen
        self.cache_keys[ino] = seen
        return same

    # --- names -----------------------------------------------------------------

    @boundary
    async def lookup(self, parent_ino, name, ctx=None):
        ppath = self.inodes.path(parent_ino)
        if ppath is None:
            raise Fs9Error(errno.ENOENT, "stale inode")
        name = _name(name)
        if name in (".", ".."):
            path = ppath if name == "." else ppath[:-1]
        else:
            path = ppath + (name,)
        self._admit(path, ctx)
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
            self._admit(path, ctx)
        return self._attrs(ino, node)

    def _open_vault_file(self, ino, e: Fs9Error) -> PassHandle:
        """A vault file's inode whose name is gone (unlinked, renamed over) but which is
        still open: its handle (the kernel then asks by inode, fstat(2) and friends).
        None: re-raise e."""
        if e.errno == errno.ENOENT:
            for handle in self.handles.values():
                if isinstance(handle, PassHandle) and handle.ino == ino:
                    return handle
        raise e

    @boundary
    async def setattr(self, ino, attr, fields, fh, ctx):
        try:
            path, node = self._node(ino)
        except Fs9Error as e:  # a file whose name is gone: ftruncate, fchmod, ...
            handle = self._handle(fh) if fh is not None else self._open_vault_file(ino, e)
            if not isinstance(handle, PassHandle) or handle.ino != ino:
                raise
            if handle.agent and not handle.writing:
                raise Fs9Error(errno.EACCES, "an agent changes a file it opened to write")
            st = await in_thread(os.fstat, handle.fd)
            seen_as = ("agents", handle.agent, "view") if handle.agent else ()
            _may_set_attributes(seen_as, PassNode("", st), attr, fields, ctx)
            await in_thread(_set_attributes, handle.fd, attr, fields)
            return self._attrs(ino, PassNode("", await in_thread(os.fstat, handle.fd)))
        self._admit(path, ctx)
        if isinstance(node, PassNode):
            self._check(path, writing=True)
            with self._refusals_logged(path):
                _may_set_attributes(path, node, attr, fields, ctx)
            await in_thread(_set_attributes, node.real, attr, fields)
            self.kernel.vault_changed(path, "modified", ctx.uid)
            return self._attrs(ino, PassNode.at(node.real))
        self._check(path, writing=True)  # in a view: EACCES where it may not write
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
            return _may_access(node, mode, ctx)
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
        self._admit(path, ctx)
        if not isinstance(node, Dir) and not (isinstance(node, PassNode) and node.is_dir):
            raise Fs9Error(errno.ENOTDIR, "not a directory")
        entries = []  # snapshot at open, so paging is consistent
        if isinstance(node, PassNode):  # one scandir, not a lookup per name
            for name, st in await in_thread(_scan, node.real):
                child = self.tree.adopt(path + (name,), PassNode(os.path.join(node.real, name), st))
                if child is not None:
                    entries.append((name, child))
            names = ()
        else:
            names = node.names()
        for name in names:
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
        self._admit(path, ctx)
        writing = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        if flags & os.O_ACCMODE != os.O_WRONLY:
            self._check(path, writing=False)
        if writing or flags & os.O_TRUNC:
            self._check(path, writing=True)
        if isinstance(node, PassNode):
            fh = self._fh()
            handle = self.handles[fh] = await open_file(node.real, flags)
            handle.ino, handle.agent, handle.writing = ino, split_view(path)[0], writing
            handle.uid, handle.wrote = ctx.uid, bool(flags & os.O_TRUNC)
            return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=self._unchanged(ino, node))
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
            handle.wrote = True  # a vault_changed event at release
            return await handle.pwrite(off, bytes(buf))
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
                self.kernel.vault_changed(self.inodes.path(handle.ino) or (), "modified",
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

    # --- names that change: the vault's (the rest of the namespace is not a disk) ----

    async def _vault_target(self, parent_ino, name, ctx) -> tuple[tuple[str, ...], str]:
        """A new name in a vault directory that this caller may change: (path, real)."""
        ppath, parent = self._node(parent_ino)
        self._admit(ppath, ctx)
        if not isinstance(parent, PassNode):
            raise Fs9Error(errno.EACCES, READONLY_NS)
        path = ppath + (_name(name),)
        self._check(path, writing=True)
        return path, os.path.join(parent.real, path[-1])

    async def _made(self, path, real, ctx, mode: int | None = None) -> pyfuse3.EntryAttributes:
        """What a person makes through the mount is theirs (fs9 made it as root)."""
        await in_thread(settle, real, mode, ctx.uid, ctx.gid)
        return self._entry(path, real)

    def _entry(self, path, real) -> pyfuse3.EntryAttributes:
        return self._attrs(self.inodes.lookup(path), PassNode.at(real))

    @staticmethod
    def _new_mode(path, mode: int, ctx) -> int:
        """The permission bits of a new file: the caller's umask applied (fs9's own must
        not be); no agent makes a setuid or setgid file."""
        mode &= 0o7777 & ~ctx.umask
        if split_view(path)[0] is not None:
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        return mode

    @boundary
    async def mkdir(self, parent_ino, name, mode, ctx):
        path, real = await self._vault_target(parent_ino, name, ctx)
        mode = self._new_mode(path, mode, ctx) & 0o1777  # as mkdir(2): no setuid/setgid
        await in_thread(os.mkdir, real, mode)
        self.kernel.vault_changed(path, "created", ctx.uid)
        return await self._made(path, real, ctx, mode)

    @boundary
    async def mknod(self, parent_ino, name, mode, rdev, ctx):
        """Regular files, fifos and sockets; device nodes only for the root operator
        (the backing directory is a real one, where a device node works)."""
        path, real = await self._vault_target(parent_ino, name, ctx)
        kind = stat.S_IFMT(mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            if ctx.uid != 0 or split_view(path)[0] is not None:
                raise Fs9Error(errno.EPERM, "only the root operator makes device nodes")
        elif kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, 0):
            raise Fs9Error(errno.EINVAL, "no such file type")
        perm = self._new_mode(path, mode, ctx)
        await in_thread(os.mknod, real, (kind or stat.S_IFREG) | perm, rdev)
        self.kernel.vault_changed(path, "created", ctx.uid)
        return await self._made(path, real, ctx, perm)

    @boundary
    async def symlink(self, parent_ino, name, target, ctx):
        path, real = await self._vault_target(parent_ino, name, ctx)
        await in_thread(os.symlink, os.fsdecode(target), real)
        self.kernel.vault_changed(path, "created", ctx.uid)
        return await self._made(path, real, ctx)

    @boundary
    async def link(self, ino, new_parent_ino, new_name, ctx):
        src_path, src = self._node(ino)
        self._admit(src_path, ctx)
        if not isinstance(src, PassNode):
            raise Fs9Error(errno.EACCES, READONLY_NS)
        self._check(src_path, writing=False)
        path, real = await self._vault_target(new_parent_ino, new_name, ctx)
        if split_view(src_path)[0] != split_view(path)[0]:
            raise Fs9Error(errno.EXDEV, "link across views")
        await in_thread(os.link, src.real, real)
        self.kernel.vault_changed(path, "created", ctx.uid)
        # the other name is another inode of ours: the kernel must forget its link count
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, True)
        return self._entry(path, real)

    @boundary
    async def readlink(self, ino, ctx):
        _, node = self._node(ino)
        if not isinstance(node, PassNode):
            raise Fs9Error(errno.EINVAL, "not a symbolic link")
        return os.fsencode(await in_thread(os.readlink, node.real))

    @boundary
    async def create(self, parent_ino, name, mode, flags, ctx):
        """A new name in a directory that takes files: mail/ (one message, sent at
        close), topics/ (a new topic; each write publishes)."""
        ppath, parent = self._node(parent_ino)
        self._admit(ppath, ctx)
        if isinstance(parent, PassNode):
            path, real = await self._vault_target(parent_ino, name, ctx)
            fd, created = await in_thread(create_file, real, flags,
                                          self._new_mode(path, mode, ctx))
            self.kernel.vault_changed(path, "created" if created else "modified", ctx.uid)
            try:
                entry = await self._made(path, real, ctx) if created else self._entry(path, real)
            except BaseException:
                os.close(fd)
                raise
            fh = self._fh()
            handle = self.handles[fh] = PassHandle(fd, entry.st_ino)
            handle.agent, handle.writing = split_view(path)[0], True
            handle.uid, handle.wrote = ctx.uid, False
            return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=False), entry
        if not isinstance(parent, Dir) or parent.create is None:
            raise Fs9Error(errno.EACCES, READONLY_NS)
        path = ppath + (_name(name),)
        self._check(path, writing=True)
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
        path = (self.inodes.path(parent_ino) or ()) + (_name(name),)
        self._admit(path, ctx)
        node = self.tree.resolve(path)  # ENOENT if absent
        self._check(path, writing=True, removing=True)
        if isinstance(node, PassNode):
            await in_thread(os.unlink, node.real)
            self.kernel.vault_changed(path, "deleted", ctx.uid)
            return self._gone(path)
        if getattr(node, "remove", None) is None:
            raise Fs9Error(errno.EACCES, READONLY_NS)
        node.remove()

    @boundary
    async def rmdir(self, parent_ino, name, ctx):
        path = (self.inodes.path(parent_ino) or ()) + (_name(name),)
        self._admit(path, ctx)
        node = self.tree.resolve(path)
        if not isinstance(node, PassNode):
            raise Fs9Error(errno.EACCES, READONLY_NS)
        self._check(path, writing=True)
        await in_thread(os.rmdir, node.real)
        self.kernel.vault_changed(path, "deleted", ctx.uid)
        self._gone(path)

    def _gone(self, path) -> None:
        """A vault name was removed: its inode (which the kernel may still hold, an open
        file) moves aside, so a new file of that name gets an inode of its own."""
        self._graves += 1
        grave = ("\0gone", str(self._graves))
        self.inodes.move(lambda p: grave + p[len(path):] if p[:len(path)] == path else None)

    @boundary
    async def rename(self, p_old, name_old, p_new, name_new, flags, ctx):
        old_path = (self.inodes.path(p_old) or ()) + (_name(name_old),)
        self._admit(old_path, ctx)
        node = self.tree.resolve(old_path)  # ENOENT if absent (or hidden)
        if not isinstance(node, PassNode):
            raise Fs9Error(errno.EACCES, READONLY_NS)
        self._check(old_path, writing=True)
        new_path, real = await self._vault_target(p_new, name_new, ctx)
        if split_view(old_path)[0] != split_view(new_path)[0]:
            raise Fs9Error(errno.EXDEV, "rename across views")
        # flags: RENAME_NOREPLACE, RENAME_EXCHANGE (renameat2 answers what it lacks)
        await in_thread(passthrough.rename, node.real, real, flags)
        self.kernel.vault_changed(old_path, "moved", ctx.uid, dest=new_path)
        self._renamed(split_view(old_path)[1], split_view(new_path)[1],
                      exchange=bool(flags & RENAME_EXCHANGE))

    def _renamed(self, old: tuple[str, ...], new: tuple[str, ...], exchange=False) -> None:
        """Keep every inode naming the moved file (in the operator's tree and in every
        view) on its new path, so a held inode never resolves to what replaced it.
        exchange: the two swapped places (RENAME_EXCHANGE)."""
        swaps = [(old, new), (new, old)] if exchange else [(old, new)]

        def rename(path):
            viewer, inner = split_view(path)
            prefix = path[:len(path) - len(inner)]
            for src, dst in swaps:
                if inner[:len(src)] == src:
                    return prefix + dst + inner[len(src):]
            return None
        self.inodes.move(rename)

    # --- extended attributes: the vault's own, plus fs9's virtual ones ----------------
    #
    # The rest of the namespace has none, and says so at once: the kernel's audit asks
    # for security.capability of every file an audited (agent) process touches, a
    # round trip each, so that answer must cost nothing (see _no_xattr).

    def _vault_xattrs(self, ino) -> tuple[tuple[str, ...], PassNode] | None:
        """(path, node) of a vault inode; None: a namespace file (no attributes)."""
        path = self.inodes.path(ino)
        if path is None:
            raise Fs9Error(errno.ENOENT, "stale inode")
        if split_view(path)[1][:1] != ("vault",):
            return None
        node = self._resolve(path)
        return path, node

    def _virtual(self, path) -> dict[str, bytes]:
        """user.fs9.owner (the owning agent, empty: the operator's) and
        user.fs9.classification (the owner's clearance), computed, read-only."""
        inner = split_view(path)[1]
        owner = self.kernel.owner_of(inner)
        agent = self.kernel.agents.get(owner) if owner else None
        clearance = agent.manifest.get("clearance", "internal") if agent else "internal"
        return {OWNER_XATTR: (owner or "").encode(), CLASS_XATTR: clearance.encode()}

    def _xattr_to_change(self, ino, raw_name: bytes, ctx, missing: int):
        """(the real file, the name) of an extended attribute this caller may set or
        remove; Fs9Error(missing) outside the vault."""
        found = self._vault_xattrs(ino)
        if found is None:
            raise Fs9Error(missing, NO_XATTRS)
        path, node = found
        self._admit(path, ctx)
        name = os.fsdecode(raw_name)
        self._check(path, writing=True)
        with self._refusals_logged(path):
            if name in (OWNER_XATTR, CLASS_XATTR):
                raise Fs9Error(errno.EPERM, f"{name} is computed by fs9 (the owner's manifest)")
            if not name.startswith("user.") and (ctx.uid != 0 or split_view(path)[0]):
                # trusted.*, security.* (file capabilities), system.* (ACLs): root's
                raise Fs9Error(errno.EPERM, "only root sets attributes outside user.*")
        return node.real, name

    @boundary
    async def getxattr(self, ino, name, ctx):
        found = self._vault_xattrs(ino)
        if found is None:
            raise Fs9Error(errno.ENODATA, NO_XATTRS)
        path, node = found
        self._admit(path, ctx)
        name = os.fsdecode(name)
        virtual = self._virtual(path)
        if name in virtual:
            return virtual[name]
        return await in_thread(passthrough.getxattr, node.real, name)

    @boundary
    async def listxattr(self, ino, ctx):
        found = self._vault_xattrs(ino)
        if found is None:
            return []
        path, node = found
        self._admit(path, ctx)
        names = await in_thread(passthrough.listxattr, node.real)
        return [os.fsencode(n) for n in names] + [os.fsencode(n) for n in self._virtual(path)]

    @boundary
    async def setxattr(self, ino, name, value, ctx):
        real, name = self._xattr_to_change(ino, name, ctx, errno.ENOTSUP)
        await in_thread(passthrough.setxattr, real, name, bytes(value))

    @boundary
    async def removexattr(self, ino, name, ctx):
        real, name = self._xattr_to_change(ino, name, ctx, errno.ENODATA)
        await in_thread(passthrough.removexattr, real, name)


def _may_set_attributes(path, node: PassNode, attr, fields, ctx) -> None:
    """What the kernel's own rules would allow (fs9 acts as root for everyone): only
    root gives files away; only the owner (or root) changes modes; and no agent
    makes a setuid or setgid file, nor gives a file away at all."""
    agent = split_view(path)[0]
    if fields.update_uid or fields.update_gid:
        if agent is not None or ctx.uid != 0:
            raise Fs9Error(errno.EPERM, "only root changes a file's owner")
    if fields.update_mode:
        if ctx.uid not in (0, node.st.st_uid):
            raise Fs9Error(errno.EPERM, "only the owner changes a file's mode")
        if agent is not None and attr.st_mode & (stat.S_ISUID | stat.S_ISGID):
            raise Fs9Error(errno.EPERM, "agents make no setuid or setgid files")
        if stat.S_ISLNK(node.st.st_mode):
            raise Fs9Error(errno.EOPNOTSUPP, "a symbolic link has no mode of its own")


def _may_access(node: PassNode, mode: int, ctx) -> bool:
    """access(2) on a vault file: its mode bits (as a view shows them) for the caller's
    uid and primary gid; root passes all but X_OK on a file nobody may execute."""
    bits = node.mode
    if ctx.uid == 0:
        return not mode & os.X_OK or stat.S_ISDIR(bits) or bool(bits & 0o111)
    if ctx.uid == node.st.st_uid:
        have = bits >> 6
    elif ctx.gid == node.st.st_gid:
        have = bits >> 3
    else:
        have = bits
    return mode & 7 & ~have == 0


def _set_attributes(file: str | int, attr, fields) -> None:
    """setattr on a vault file, by path or open fd: size, mode, owner, times
    (passthroughfs.py's order); never through a symlink (see PassNode.at)."""
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


def _scan(real: str) -> list[tuple[str, os.stat_result]]:
    """A vault directory's entries with their lstat, sorted by name."""
    with os.scandir(real) as it:
        return sorted((e.name, e.stat(follow_symlinks=False)) for e in it)
