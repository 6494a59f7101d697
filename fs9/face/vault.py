"""The vault as a file kind: `vault/` served as the directory on disk it is.

A VaultNode is one name under the vault root, looked up afresh per request, like the
synthetic nodes (the disk is the truth, also when an editor changes it behind our back).
fs9 serves it as root to callers that may be hostile, so it never hands a path string
to a syscall: every operation goes through kernel.vault_root (kernel/vault/beneath.py),
which opens the parent beneath the vault's directory fd with no symlink followed on the
way (a directory swapped for a symlink, even mid-request: ELOOP) and acts on the last
name with an *at call that does not follow it either (a symlink there is the file
itself: lstat shows it, readlink reads it; the client's kernel resolves it). So the
parent is a directory fs9 holds open at the moment of the operation, never a name looked
up a moment before. Open files keep their fd (vaultfile.py).

Blocking disk work runs in worker threads, but for lstat and open: they cost the local
disk's metadata only, and a thread hop would double the cost of a stat or of opening a
small file. Who may do what is the gate's (access.py), asked by ops.py before any of
this; the kernel's own rules for modes, owners and new files are applied here, and, for
an agent, the rule for a file with several names (access.may_write_file), asked of the
file itself (an fd on it), not of its name.
"""
import errno
import os
import stat

from ..errors import Fs9Error
from ..kernel import labels
from ..kernel.names import split_view
from ..kernel.vault.pinned import CHANGED
from .access import groups_of, may_access, may_set_attributes, may_write_file, new_mode, refusals_logged
from .node import REFUSALS, Attrs, Node, shown
from .vaultfile import VaultHandle, disk, disk_attrs, in_thread, set_attributes
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel.kernel import Kernel

OWNER_XATTR, CLASS_XATTR = "user.fs9.owner", "user.fs9.classification"
TRUSTED = "trusted."  # attributes Linux shows only to CAP_SYS_ADMIN


class VaultNode(Node):
    """A file, directory or symlink of the vault: rel, its names under the vault root;
    path, the path it was asked as (in a view: agents/NAME/view/vault/...)."""
    does = frozenset(REFUSALS)  # names made, moved, linked, removed; extended attributes
    own_inode = True

    def __init__(self, kernel: "Kernel", path: tuple[str, ...], rel: tuple[str, ...], view,
                 st: os.stat_result, listed_in: "_Listed | None" = None) -> None:
        self.kernel = kernel
        self.root = kernel.vault_root
        self.path = path
        self.rel = rel
        self.view = view  # the asking agent's View, None: the operator
        self.st = st
        self.mode = st.st_mode  # (a view shows what it may not change read-only)
        self.listed_in = listed_in  # an entry of a listing: the directory it holds open
        self.listed: _Listed | None = None  # a directory being listed (listing, closedir)

    @classmethod
    def at(cls, kernel: "Kernel", path, rel, view) -> "VaultNode":
        return cls(kernel, path, rel, view, disk(kernel.vault_root.lstat, rel))

    def _child(self, name: str) -> "VaultNode":
        """name in this directory, as it is on disk now (not as a view shows it)."""
        return VaultNode.at(self.kernel, self.path + (name,), self.rel + (name,), self.view)

    def size(self) -> int:
        return self.st.st_size

    def attrs(self) -> Attrs:
        return disk_attrs(self.mode, self.st)

    def refresh(self) -> None:
        """lstat again, keeping the bits a view took away from its mode. An entry of a
        listing: fstatat in the directory the listing holds open (a name, no symlink
        followed), not a walk from the root per entry (a 1,000-entry listing)."""
        taken = self.st.st_mode & ~self.mode
        if self.listed_in is not None:
            self.st = disk(self.listed_in.lstat, self.rel[-1])
        else:
            self.st = disk(self.root.lstat, self.rel)
        self.mode = self.st.st_mode & ~taken

    def file_key(self) -> tuple | None:
        st = self.st
        return None if st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode) else (st.st_dev, st.st_ino)

    def access(self, mode: int, ctx) -> bool:
        return may_access(self.mode, self.st, mode, ctx, groups_of(ctx))

    def _report(self, path, op: str, ctx, dest=None) -> None:
        self.kernel.vault_changes.report(path, op, ctx.uid, dest=dest)

    def _guard(self, path=None):
        """The rule for a file with several names (may_write_file) for the agent whose
        view this is, as st -> None or Fs9Error; None: the operator's, who may all."""
        if self.view is None:
            return None
        agent = self.kernel.agents.get(self.view.agent)
        uid = agent.uid if agent is not None else -1
        return lambda st: may_write_file(path or self.path, st, uid)

    def _may_write(self, path, fd: int, st: os.stat_result, truncate: bool) -> None:
        """An agent's open to write of the file fd at path (its fstat st): the guard,
        logged if it refuses (fd closed), then the O_TRUNC held back until now."""
        try:
            with refusals_logged(self.kernel, path):
                self._guard(path)(st)
            if truncate:
                disk(os.ftruncate, fd, 0)
        except BaseException:
            os.close(fd)
            raise

    async def _change(self, change) -> None:
        """change(the file pinned: beneath.Pinned) in a worker thread, if the guard
        allows it on that very file (not on whatever its name held a moment ago)."""
        refusal = await in_thread(_changed, self.root, self.rel, self._guard(), change)
        if refusal is not None:
            with refusals_logged(self.kernel, self.path):
                raise refusal

    # --- files and listings ----------------------------------------------------------

    async def open(self, flags: int, ctx) -> VaultHandle:
        """The file itself (a symlink: ELOOP, the kernel resolved it for the caller). An
        agent opening to write: the guard, asked of the file opened (O_TRUNC after it)."""
        writing = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        guarded = self.view is not None and (writing or flags & os.O_TRUNC)
        fd, st = disk(_open, self.root, self.rel, flags & ~os.O_TRUNC if guarded else flags)
        if guarded:
            self._may_write(self.path, fd, st, bool(flags & os.O_TRUNC))
        handle = VaultHandle(fd, self.kernel.vault_changes,
                             split_view(self.path)[0], ctx.uid, writing,
                             wrote=bool(flags & os.O_TRUNC))
        handle.cache_key = (self.st.st_mtime_ns, self.st.st_size)
        return handle

    async def create(self, name: str, mode: int, flags: int, ctx) -> tuple[VaultHandle, Node]:
        """Open name here, creating it with the caller's mode (its umask applied) and
        owner; an existing file (made meanwhile) is opened unless O_EXCL (for an agent:
        as open, with the guard)."""
        path = self.path + (name,)
        guarded = self.view is not None
        fd, created, st = await in_thread(_create, self.root, self.rel + (name,),
                                          flags & ~os.O_TRUNC if guarded else flags,
                                          new_mode(path, mode, ctx, self.st), ctx.uid,
                                          ctx.gid)
        if guarded and not created:
            self._may_write(path, fd, st, bool(flags & os.O_TRUNC))
        self._report(path, "created" if created else "modified", ctx)
        node = self._made(name, st)
        return VaultHandle(fd, self.kernel.vault_changes, split_view(path)[0], ctx.uid,
                           writing=True), node

    async def listing(self, child) -> list[tuple[str, Node]]:
        """One scandir (each entry's lstat with it), not a lookup per name; what the
        asking view hides is left out. The directory stays open until closedir."""
        listed, found = await in_thread(_Listed.scan, self.root, self.rel)
        entries = []
        for name, st in found:
            node = VaultNode(self.kernel, self.path + (name,), self.rel + (name,),
                             self.view, st, listed)
            if self.view is None or shown(node, self.view.access(
                    split_view(node.path)[1])) is not None:
                entries.append((name, node))
        self.listed = listed
        return entries

    def closedir(self) -> None:
        if self.listed is not None:
            self.listed.close()

    async def setattr(self, attr, fields, ctx) -> "VaultNode":
        """Size, mode, owner, times (passthroughfs.py's order), as the kernel's rules
        allow the caller; the file as it is now (its own mode, not a view's)."""
        with refusals_logged(self.kernel, self.path):
            may_set_attributes(self.path, self, attr, fields, ctx)
        await self._change(lambda file: set_attributes(file, attr, fields))
        self._report(self.path, "modified", ctx)
        return VaultNode.at(self.kernel, self.path, self.rel, self.view)

    # --- names made, moved and removed -----------------------------------------------

    def _made(self, name: str, st: os.stat_result | OSError) -> "VaultNode":
        """The node of a name just made (_make), or the error settling it raised (the
        name was made all the same: a change reported before this raises; logged, as
        the name may have been swapped for something else meanwhile: beneath.settle)."""
        if isinstance(st, OSError):
            with refusals_logged(self.kernel, self.path + (name,)):
                raise Fs9Error(st.errno or errno.EIO, st.strerror or str(st))
        return VaultNode(self.kernel, self.path + (name,), self.rel + (name,), self.view, st)

    async def _make(self, name: str, make, kind: int, ctx,
                    mode: int | None = None) -> "VaultNode":
        """make(root, rel) a new name of kind here, given to the caller (one worker
        thread)."""
        st = await in_thread(_make, make, kind, self.root, self.rel + (name,), mode, ctx.uid,
                             ctx.gid)
        self._report(self.path + (name,), "created", ctx)
        return self._made(name, st)

    async def mkdir(self, name: str, mode: int, ctx) -> "VaultNode":
        mode = new_mode(self.path + (name,), mode, ctx) & 0o1777  # as mkdir(2): no setuid/gid
        return await self._make(name, lambda root, rel: root.mkdir(rel, mode), stat.S_IFDIR,
                                ctx, mode)

    async def mknod(self, name: str, mode: int, rdev: int, ctx) -> "VaultNode":
        """Regular files, fifos and sockets; device nodes only for the root operator
        (the backing directory is a real one, where a device node works)."""
        path = self.path + (name,)
        kind = stat.S_IFMT(mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            if ctx.uid != 0 or split_view(path)[0] is not None:
                raise Fs9Error(errno.EPERM, "only the root operator makes device nodes")
        elif kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, 0):
            raise Fs9Error(errno.EINVAL, "no such file type")
        perm = new_mode(path, mode, ctx, self.st)
        if kind in (stat.S_IFREG, 0):  # made and given away through one fd, as create
            fd, _, st = await in_thread(_create, self.root, self.rel + (name,),
                                        os.O_RDONLY | os.O_EXCL, perm, ctx.uid, ctx.gid)
            if not isinstance(st, OSError):
                os.close(fd)
            self._report(path, "created", ctx)
            return self._made(name, st)
        return await self._make(name, lambda root, rel: root.mknod(rel, kind | perm, rdev),
                                kind, ctx, perm)

    async def symlink(self, name: str, target: bytes, ctx) -> "VaultNode":
        return await self._make(name, lambda root, rel: root.symlink(os.fsdecode(target), rel),
                                stat.S_IFLNK, ctx)

    async def link(self, src: "VaultNode", name: str, ctx) -> "VaultNode":
        await in_thread(self.root.link, src.rel, self.rel + (name,))
        self._report(self.path + (name,), "created", ctx)
        return self._child(name)

    async def rename(self, parent: "VaultNode", name: str, flags: int, ctx) -> None:
        """flags: RENAME_NOREPLACE, RENAME_EXCHANGE (renameat2 answers what it lacks)."""
        await in_thread(self.root.rename, self.rel, parent.rel + (name,), flags)
        self._report(self.path, "moved", ctx, dest=parent.path + (name,))

    async def unlink(self, ctx) -> None:
        await in_thread(self.root.unlink, self.rel)
        self._report(self.path, "deleted", ctx)

    async def rmdir(self, ctx) -> None:
        await in_thread(self.root.rmdir, self.rel)
        self._report(self.path, "deleted", ctx)

    async def readlink(self) -> bytes:
        return os.fsencode(await in_thread(self.root.readlink, self.rel))

    # --- extended attributes: the file's own, plus fs9's virtual ones ------------------

    def _virtual(self) -> dict[str, bytes]:
        """user.fs9.owner (the owning agent, empty: the operator's) and
        user.fs9.classification (its label: the owner's clearance; empty where nobody
        owns it, the operator's, who decides who reads it: kernel/labels.py), computed,
        read-only. (A view reaches a path here only if it overlaps the owner's subtree,
        so the owner is one it knows of: Kernel.knows.)"""
        label = labels.label_of(self.kernel, split_view(self.path)[1])
        return {OWNER_XATTR: (label.agent if label else "").encode(),
                CLASS_XATTR: (label.level if label else "").encode()}

    def _root_asks(self, ctx) -> bool:
        """ctx is root itself, not through an agent's view: fs9 reads the file as root,
        so what Linux shows only to CAP_SYS_ADMIN (trusted.*) is shown only to root."""
        return ctx is not None and ctx.uid == 0 and split_view(self.path)[0] is None

    async def getxattr(self, name: str, ctx) -> bytes:
        virtual = self._virtual()
        if name in virtual:
            return virtual[name]
        if name.startswith(TRUSTED) and not self._root_asks(ctx):
            raise Fs9Error(errno.ENODATA, "trusted.* attributes are root's")  # (as Linux)
        return await in_thread(self.root.getxattr, self.rel, name)

    async def listxattr(self, ctx) -> list[str]:
        names = await in_thread(self.root.listxattr, self.rel)
        if not self._root_asks(ctx):
            names = [n for n in names if not n.startswith(TRUSTED)]
        return names + list(self._virtual())

    def _may_change_xattr(self, name: str, ctx) -> None:
        with refusals_logged(self.kernel, self.path):
            if name in (OWNER_XATTR, CLASS_XATTR):
                raise Fs9Error(errno.EPERM, f"{name} is computed by fs9 (the owner's manifest)")
            if not name.startswith("user.") and (ctx.uid != 0 or split_view(self.path)[0]):
                # trusted.*, security.* (file capabilities), system.* (ACLs): root's
                raise Fs9Error(errno.EPERM, "only root sets attributes outside user.*")

    async def setxattr(self, name: str, value: bytes, ctx) -> None:
        self._may_change_xattr(name, ctx)
        await self._change(lambda file: file.setxattr(name, value))

    async def removexattr(self, name: str, ctx) -> None:
        self._may_change_xattr(name, ctx)
        await self._change(lambda file: file.removexattr(name))


# --- blocking helpers (worker threads) ---------------------------------------------------

_LIST = os.O_RDONLY | os.O_DIRECTORY  # (the root adds O_NOFOLLOW: a symlink is ENOTDIR)


def _open(root, rel, flags: int) -> tuple[int, os.stat_result]:
    """An existing regular file, opened: (fd, its fstat). FUSE opens only what the
    kernel knows as one, but the name may hold a FIFO or a device by now (swapped in):
    opening that as root would block (the whole mount, on the trio thread) or reach a
    device. So O_NONBLOCK until it is known to be a regular file."""
    return _regular(root.open(rel, flags | os.O_NONBLOCK), flags)


def _create(root, rel, flags: int, mode: int, uid: int, gid: int):
    """beneath.py's create_settled, with _open's care for what was made meanwhile: a
    file made is given to uid:gid through its fd. (fd, made, its fstat or the error
    settling it: then fd is closed)."""
    fd, created, unsettled = root.create_settled(rel, flags | os.O_NONBLOCK, mode, uid, gid)
    fd, st = _regular(fd, flags)
    if unsettled is not None:
        os.close(fd)
        return fd, created, unsettled
    return fd, created, st


def _make(make, kind: int, root, rel, mode: int | None, uid: int, gid: int):
    """make(root, rel), then what a person makes through the mount is theirs (fs9 made
    it as root): owner uid:gid, mode exactly (None: as made), if the name still holds
    what was made (beneath.settle). Its lstat, or the OSError settling it raised (it was
    made: a change all the same)."""
    make(root, rel)
    try:
        root.settle(rel, kind, mode, uid, gid)
        return root.lstat(rel)
    except OSError as e:
        return e


def _changed(root, rel, guard, change):
    """change(rel pinned), unless guard (None: none) refuses its fstat: the refusal."""
    def pinned(file):
        if guard is not None:
            try:
                guard(file.stat())
            except Fs9Error as e:
                return e
        change(file)
    return root.pinned(rel, pinned)


def _regular(fd: int, flags: int) -> tuple[int, os.stat_result]:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ENOENT, CHANGED)
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class _Listed:
    """A vault directory held open while a listing of it is read (opendir..releasedir):
    its entries are lstat'ed by name relative to it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def scan(cls, root, rel) -> tuple["_Listed", list[tuple[str, os.stat_result]]]:
        """The directory rel held open, and its entries with their lstat, sorted by
        name (a name gone meanwhile is left out). Blocks."""
        listed = cls(root.open(rel, _LIST))
        try:
            out = []
            with os.scandir(listed.fd) as it:  # (on a dup of the fd)
                for e in it:
                    try:
                        out.append((e.name, e.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        pass
        except BaseException:
            listed.close()
            raise
        return listed, sorted(out, key=lambda entry: entry[0])

    def lstat(self, name: str) -> os.stat_result:
        if self.fd < 0:
            raise OSError(errno.EBADF, "listing released")
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
