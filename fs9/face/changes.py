"""The pyfuse3 handlers that make, move and remove names and change extended
attributes: a part of Operations (ops.py), whose helpers they use (_node, _entry, the
gate, the inodes); and the names they (and lookup) resolve: _named, _child, _new_name,
and the file a hard link names (_file). Each resolves, asks the gate, calls the node's
operation, as every handler does.
"""
import errno
import os
import re

import pyfuse3
import trio

from ..errors import Fs9Error
from ..kernel.names import split_view
from ..kernel.vault.beneath import RENAME_EXCHANGE
from .boundary import boundary, file_name
from .node import Node

# A file manager's trash for a vault file (the freedesktop trash spec, as GIO does it)
# is at the top of the file's mount, fs9's root: .Trash/UID (a sticky .Trash made by
# the operator) or .Trash-UID. There these names are the vault's own, so a file is
# moved to the trash by a rename within the vault (see _named).
TRASH = re.compile(r"\.Trash(-[0-9]+)?")


class Changes:
    """Operations' handlers of names made and removed, and of extended attributes."""

    @staticmethod
    def _file(path: tuple[str, ...], node: Node) -> tuple | None:
        """The file a hard link names, in the view it is seen through (a view's
        inode is its own: its rules are asked of its path)."""
        key = node.file_key()
        return None if key is None else (split_view(path)[0], *key)

    @staticmethod
    def _named(ppath: tuple[str, ...], name: str) -> tuple[str, ...]:
        """The path of name in directory ppath: at the root, a trash directory's name
        (TRASH) is the vault's."""
        if not ppath and TRASH.fullmatch(name):
            return ("vault", name)
        return ppath + (name,)

    def _child(self, parent_ino, name, ctx) -> tuple[tuple[str, ...], Node]:
        """An existing name in a directory, admitted: (path, node); ENOENT if absent
        (or hidden)."""
        path = self._named(self.inodes.path(parent_ino) or (), file_name(name))
        self.gate.admit(path, ctx)
        return path, self.tree.resolve(path)

    def _new_name(self, parent_ino, name, ctx, op: str) -> tuple[tuple[str, ...], Node]:
        """A name to make (or replace) by op in a directory this caller may change:
        (its path, the directory's node)."""
        ppath, parent = self._node(parent_ino)
        path = self._named(ppath, file_name(name))
        if path[:-1] != ppath:
            ppath, parent = path[:-1], self._resolve(path[:-1])
        self.gate.admit(ppath, ctx)
        parent.can(op)
        self.gate.admit(path, ctx)
        self.gate.check(path, writing=True)
        self.gate.may_make_in(parent, ctx)
        return path, parent

    @boundary
    async def create(self, parent_ino, name, mode, flags, ctx):
        """A new name in a directory that takes files: mail/ (one message, sent at
        close), topics/ (a new topic; each write publishes), or the vault."""
        path, parent = self._new_name(parent_ino, name, ctx, "create")
        self.held.check(split_view(path)[0], path)
        handle, node = await parent.create(path[-1], mode, flags, ctx)
        handle.opener = split_view(path)[0]
        handle.nonblocking = bool(flags & os.O_NONBLOCK)
        ino = self.inodes.lookup(path)
        fh = self._opened(ino, handle)
        attrs = self._attrs(ino, node)
        if node.transient:
            # A message file exists only while it is open (it is sent at close): serve
            # its name from `transient` until then, and let the kernel cache nothing.
            self.transient[path] = node
            self.transient_fh[fh] = path
            attrs.entry_timeout = attrs.attr_timeout = 0
        return pyfuse3.FileInfo(fh=fh, direct_io=handle.direct_io, keep_cache=False), attrs

    @boundary
    async def mkdir(self, parent_ino, name, mode, ctx):
        path, parent = self._new_name(parent_ino, name, ctx, "mkdir")
        return self._entry(path, await parent.mkdir(path[-1], mode, ctx))

    @boundary
    async def mknod(self, parent_ino, name, mode, rdev, ctx):
        path, parent = self._new_name(parent_ino, name, ctx, "mknod")
        return self._entry(path, await parent.mknod(path[-1], mode, rdev, ctx))

    @boundary
    async def symlink(self, parent_ino, name, target, ctx):
        path, parent = self._new_name(parent_ino, name, ctx, "symlink")
        return self._entry(path, await parent.symlink(path[-1], target, ctx))

    @boundary
    async def link(self, ino, new_parent_ino, new_name, ctx):
        src_path, src = self._node(ino)
        self.gate.admit(src_path, ctx)
        src.can("link")
        self.gate.check(src_path, writing=False)
        self.gate.may_link(src, ctx)
        path, parent = self._new_name(new_parent_ino, new_name, ctx, "link")
        if split_view(src_path)[0] != split_view(path)[0]:
            raise Fs9Error(errno.EXDEV, "link across views")
        self.gate.check_link(src_path, path)  # a second name grants nothing new
        node = await parent.link(src, path[-1], ctx)
        self.inodes.number(src_path, self._file(src_path, node))  # one inode, both names
        # the kernel must forget its link count
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, True)
        return self._entry(path, node)

    @boundary
    async def readlink(self, ino, ctx):
        _, node = self._node(ino)
        return await node.readlink()

    @boundary
    async def unlink(self, parent_ino, name, ctx):
        path, node = self._child(parent_ino, name, ctx)  # ENOENT if absent
        self.gate.check(path, writing=True, removing=True)
        self._may_remove(parent_ino, node, ctx)
        await node.unlink(ctx)
        if node.own_inode:
            self.inodes.gone(path)

    @boundary
    async def rmdir(self, parent_ino, name, ctx):
        path, node = self._child(parent_ino, name, ctx)
        node.can("rmdir")
        self.gate.check(path, writing=True)
        self._may_remove(parent_ino, node, ctx)
        await node.rmdir(ctx)
        self.inodes.gone(path)

    @boundary
    async def rename(self, p_old, name_old, p_new, name_new, flags, ctx):
        old_path, node = self._child(p_old, name_old, ctx)
        node.can("rename")
        self.gate.check(old_path, writing=True)
        new_path, parent = self._new_name(p_new, name_new, ctx, "rename")
        if split_view(old_path)[0] != split_view(new_path)[0]:
            raise Fs9Error(errno.EXDEV, "rename across views")
        if self.gate.shared(ctx):
            try:
                replaced = self.tree.resolve(new_path)
            except Fs9Error:
                replaced = None
            self.gate.may_rename(self._node(p_old)[1], node, parent, replaced, ctx)
        await node.rename(parent, new_path[-1], flags, ctx)
        self.inodes.renamed(split_view(old_path)[1], split_view(new_path)[1],
                            exchange=bool(flags & RENAME_EXCHANGE))

    def _may_remove(self, parent_ino, node: Node, ctx) -> None:
        if self.gate.shared(ctx):
            self.gate.may_remove(self._node(parent_ino)[1], node, ctx)

    # --- extended attributes -----------------------------------------------------------
    #
    # Only vault files have them (an open file whose name is gone has none either). The
    # rest of the namespace says so at once (Node.can, before the gate): the kernel's
    # audit asks for security.capability of every file an audited (agent) process
    # touches, a round trip each, so that answer must cost little.

    @boundary
    async def getxattr(self, ino, name, ctx):
        path, node = await self._node_or_file(ino)
        node.can("getxattr")
        self.gate.admit(path, ctx)
        if name.startswith(b"user."):
            self.gate.may(node, os.R_OK, ctx, "read an extended attribute")
        return await node.getxattr(os.fsdecode(name), ctx)

    @boundary
    async def listxattr(self, ino, ctx):
        path, node = await self._node_or_file(ino)
        if path is not None:
            self.gate.admit(path, ctx)
        return [os.fsencode(n) for n in await node.listxattr(ctx)]

    @boundary
    async def setxattr(self, ino, name, value, ctx):
        node = await self._xattr_to_change(ino, ctx, "setxattr")
        await node.setxattr(os.fsdecode(name), bytes(value), ctx)

    @boundary
    async def removexattr(self, ino, name, ctx):
        node = await self._xattr_to_change(ino, ctx, "removexattr")
        await node.removexattr(os.fsdecode(name), ctx)

    async def _xattr_to_change(self, ino, ctx, op: str) -> Node:
        path, node = await self._node_or_file(ino)
        node.can(op)
        self.gate.admit(path, ctx)
        self.gate.check(path, writing=True)
        self.gate.may(node, os.W_OK, ctx, "change an extended attribute")
        return node
