"""The vault's POSIX handlers: `vault/` served as the directory on disk it is.

`VaultOps` is a mixin of Operations (ops.py). pyfuse3 calls its vault-only handlers
directly (mkdir, mknod, symlink, link, readlink, rmdir, rename, the xattrs); the
handlers every kind has (getattr, setattr, opendir, open, create, unlink) resolve
the node in ops.py and call the `_..._vault...` methods here when it is a PassNode.
It uses the state and helpers of Operations: kernel, tree, gate, inodes, handles,
cache_keys, _node, _resolve, _attrs, _fh, _handle.
"""
import errno
import os
import stat

import pyfuse3
import trio

from ..errors import Fs9Error
from ..kernel.agents import manifest as manifests
from . import passthrough
from .access import READONLY_NS, may_set_attributes, new_mode
from .boundary import boundary, file_name
from .passthrough import (RENAME_EXCHANGE, PassHandle, PassNode, create_file, in_thread,
                          open_file, scan, set_attributes, settle)
from ..kernel.names import split_view

NO_XATTRS = "only vault files have extended attributes"
OWNER_XATTR, CLASS_XATTR = "user.fs9.owner", "user.fs9.classification"


class VaultOps:
    # --- files, listings and attributes (dispatched to from ops.py) --------------

    async def _open_vault(self, ino, path, node: PassNode, flags: int, writing: bool,
                          ctx) -> pyfuse3.FileInfo:
        fh = self._fh()
        handle = self.handles[fh] = await open_file(node.real, flags)
        handle.ino, handle.agent, handle.writing = ino, split_view(path)[0], writing
        handle.uid, handle.wrote = ctx.uid, bool(flags & os.O_TRUNC)
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=self._unchanged(ino, node))

    def _unchanged(self, ino: int, node: PassNode) -> bool:
        """Vault files use the page cache (reads at memory speed, readahead). Close to
        open consistency, as NFS: what the kernel cached is kept at open only if the
        file's mtime and size are those it had at its previous open; otherwise (an
        editor changed it behind our back) the cache is dropped."""
        seen = (node.st.st_mtime_ns, node.st.st_size)
        same = self.cache_keys.get(ino) == seen
        self.cache_keys[ino] = seen
        return same

    async def _create_vault(self, parent_ino, name, mode, flags, ctx):
        path, real = await self._vault_target(parent_ino, name, ctx)
        fd, created = await in_thread(create_file, real, flags, new_mode(path, mode, ctx))
        self.kernel.vault_changes.report(path, "created" if created else "modified", ctx.uid)
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

    def _open_vault_file(self, ino, e: Fs9Error) -> PassHandle:
        """A vault file's inode whose name is gone (unlinked, renamed over) but which is
        still open: its handle (the kernel then asks by inode, fstat(2) and friends).
        None open: re-raise e."""
        if e.errno == errno.ENOENT:
            for handle in self.handles.values():
                if isinstance(handle, PassHandle) and handle.ino == ino:
                    return handle
        raise e

    async def _vault_listing(self, path, node: PassNode) -> list:
        """(name, node) of what a vault directory shows: one scandir, not a lookup per
        name."""
        entries = []
        for name, st in await in_thread(scan, node.real):
            child = self.tree.adopt(path + (name,), PassNode(os.path.join(node.real, name), st))
            if child is not None:
                entries.append((name, child))
        return entries

    async def _set_vault_attributes(self, ino, path, node: PassNode, attr, fields, ctx):
        with self.gate.refusals_logged(path):
            may_set_attributes(path, node, attr, fields, ctx)
        await in_thread(set_attributes, node.real, attr, fields)
        self.kernel.vault_changes.report(path, "modified", ctx.uid)
        return self._attrs(ino, PassNode.at(node.real))

    async def _set_open_file_attributes(self, ino, attr, fields, fh, ctx, e: Fs9Error):
        """setattr of a vault file whose name is gone, through its open handle (ftruncate,
        fchmod, ...); e: why its inode did not resolve, re-raised if it is not one."""
        handle = self._handle(fh) if fh is not None else self._open_vault_file(ino, e)
        if not isinstance(handle, PassHandle) or handle.ino != ino:
            raise e
        if handle.agent and not handle.writing:
            raise Fs9Error(errno.EACCES, "an agent changes a file it opened to write")
        st = await in_thread(os.fstat, handle.fd)
        seen_as = ("agents", handle.agent, "view") if handle.agent else ()
        may_set_attributes(seen_as, PassNode("", st), attr, fields, ctx)
        await in_thread(set_attributes, handle.fd, attr, fields)
        return self._attrs(ino, PassNode("", await in_thread(os.fstat, handle.fd)))

    # --- names that change: the vault's (the rest of the namespace is not a disk) ----

    async def _vault_target(self, parent_ino, name, ctx) -> tuple[tuple[str, ...], str]:
        """A new name in a vault directory that this caller may change: (path, real)."""
        ppath, parent = self._node(parent_ino)
        self.gate.admit(ppath, ctx)
        if not isinstance(parent, PassNode):
            raise Fs9Error(errno.EACCES, READONLY_NS)
        path = ppath + (file_name(name),)
        self.gate.check(path, writing=True)
        return path, os.path.join(parent.real, path[-1])

    def _existing_vault_name(self, parent_ino, name, ctx) -> tuple[tuple[str, ...], PassNode]:
        """A vault name that this caller may change: (path, node); ENOENT if absent (or
        hidden)."""
        path = (self.inodes.path(parent_ino) or ()) + (file_name(name),)
        self.gate.admit(path, ctx)
        node = self.tree.resolve(path)
        if not isinstance(node, PassNode):
            raise Fs9Error(errno.EACCES, READONLY_NS)
        self.gate.check(path, writing=True)
        return path, node

    async def _made(self, path, real, ctx, mode: int | None = None) -> pyfuse3.EntryAttributes:
        """What a person makes through the mount is theirs (fs9 made it as root)."""
        await in_thread(settle, real, mode, ctx.uid, ctx.gid)
        return self._entry(path, real)

    def _entry(self, path, real) -> pyfuse3.EntryAttributes:
        return self._attrs(self.inodes.lookup(path), PassNode.at(real))

    @boundary
    async def mkdir(self, parent_ino, name, mode, ctx):
        path, real = await self._vault_target(parent_ino, name, ctx)
        mode = new_mode(path, mode, ctx) & 0o1777  # as mkdir(2): no setuid/setgid
        await in_thread(os.mkdir, real, mode)
        self.kernel.vault_changes.report(path, "created", ctx.uid)
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
        perm = new_mode(path, mode, ctx)
        await in_thread(os.mknod, real, (kind or stat.S_IFREG) | perm, rdev)
        self.kernel.vault_changes.report(path, "created", ctx.uid)
        return await self._made(path, real, ctx, perm)

    @boundary
    async def symlink(self, parent_ino, name, target, ctx):
        path, real = await self._vault_target(parent_ino, name, ctx)
        await in_thread(os.symlink, os.fsdecode(target), real)
        self.kernel.vault_changes.report(path, "created", ctx.uid)
        return await self._made(path, real, ctx)

    @boundary
    async def link(self, ino, new_parent_ino, new_name, ctx):
        src_path, src = self._node(ino)
        self.gate.admit(src_path, ctx)
        if not isinstance(src, PassNode):
            raise Fs9Error(errno.EACCES, READONLY_NS)
        self.gate.check(src_path, writing=False)
        path, real = await self._vault_target(new_parent_ino, new_name, ctx)
        if split_view(src_path)[0] != split_view(path)[0]:
            raise Fs9Error(errno.EXDEV, "link across views")
        await in_thread(os.link, src.real, real)
        self.kernel.vault_changes.report(path, "created", ctx.uid)
        # the other name is another inode of ours: the kernel must forget its link count
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, True)
        return self._entry(path, real)

    @boundary
    async def readlink(self, ino, ctx):
        _, node = self._node(ino)
        if not isinstance(node, PassNode):
            raise Fs9Error(errno.EINVAL, "not a symbolic link")
        return os.fsencode(await in_thread(os.readlink, node.real))

    async def _unlink_vault(self, path, node: PassNode, ctx) -> None:
        await in_thread(os.unlink, node.real)
        self.kernel.vault_changes.report(path, "deleted", ctx.uid)
        self._gone(path)

    @boundary
    async def rmdir(self, parent_ino, name, ctx):
        path, node = self._existing_vault_name(parent_ino, name, ctx)
        await in_thread(os.rmdir, node.real)
        self.kernel.vault_changes.report(path, "deleted", ctx.uid)
        self._gone(path)

    def _gone(self, path) -> None:
        """A vault name was removed: its inode (which the kernel may still hold, an open
        file) moves aside, so a new file of that name gets an inode of its own."""
        self._graves += 1
        grave = ("\0gone", str(self._graves))
        self.inodes.move(lambda p: grave + p[len(path):] if p[:len(path)] == path else None)

    @boundary
    async def rename(self, p_old, name_old, p_new, name_new, flags, ctx):
        old_path, node = self._existing_vault_name(p_old, name_old, ctx)
        new_path, real = await self._vault_target(p_new, name_new, ctx)
        if split_view(old_path)[0] != split_view(new_path)[0]:
            raise Fs9Error(errno.EXDEV, "rename across views")
        # flags: RENAME_NOREPLACE, RENAME_EXCHANGE (renameat2 answers what it lacks)
        await in_thread(passthrough.rename, node.real, real, flags)
        self.kernel.vault_changes.report(old_path, "moved", ctx.uid, dest=new_path)
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
    # round trip each, so that answer must cost nothing (see _vault_xattrs).

    def _vault_xattrs(self, ino) -> tuple[tuple[str, ...], PassNode] | None:
        """(path, node) of a vault inode; None: a namespace file (no attributes)."""
        path = self.inodes.path(ino)
        if path is None:
            raise Fs9Error(errno.ENOENT, "stale inode")
        if split_view(path)[1][:1] != ("vault",):
            return None
        return path, self._resolve(path)

    def _virtual(self, path) -> dict[str, bytes]:
        """user.fs9.owner (the owning agent, empty: the operator's) and
        user.fs9.classification (the owner's clearance), computed, read-only."""
        inner = split_view(path)[1]
        owner = self.kernel.owner_of(inner)
        agent = self.kernel.agents.get(owner) if owner else None
        clearance = (agent.manifest if agent else manifests.DEFAULTS)["clearance"]
        return {OWNER_XATTR: (owner or "").encode(), CLASS_XATTR: clearance.encode()}

    def _xattr_to_change(self, ino, raw_name: bytes, ctx, missing: int):
        """(the real file, the name) of an extended attribute this caller may set or
        remove; Fs9Error(missing) outside the vault."""
        found = self._vault_xattrs(ino)
        if found is None:
            raise Fs9Error(missing, NO_XATTRS)
        path, node = found
        self.gate.admit(path, ctx)
        name = os.fsdecode(raw_name)
        self.gate.check(path, writing=True)
        with self.gate.refusals_logged(path):
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
        self.gate.admit(path, ctx)
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
        self.gate.admit(path, ctx)
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
