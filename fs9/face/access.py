"""Who may do what through the mount.

fs9 serves every request as root and the mount has no default_permissions, so the
kernel decides nothing: fs9 does. `Gate` admits the operator to the whole tree and an
agent's uid only to its view, applies the view's unveil, pledge and ownership rules
(and to a link, `check_link`: a second name grants nothing), and logs each refusal.
For vault files it also applies the kernel's own rules for access(2), modes, owners
and new files (`may_access`, `may_set_attributes`, `new_mode`), and fs9's for files
with several names (`may_write_file`). Pure checks: nothing here blocks.
"""
import contextlib
import errno
import os
import stat

from ..errors import Fs9Error
from ..kernel import labels
from ..kernel.names import shown_path, split_view
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel.kernel import Kernel


class Gate:
    """The access checks of one mount (uid: the operator's, the one who mounted it)."""

    def __init__(self, kernel: "Kernel", tree, uid: int) -> None:
        self.kernel = kernel
        self.tree = tree
        self.uid = uid

    def admit(self, path: tuple[str, ...], ctx) -> None:
        """Only the operator (the mounting user, or root) uses the whole tree; an agent's
        uid only its own view. Defence in depth: a confined agent's mount namespace
        shows it nothing else anyway."""
        if ctx.uid in (0, self.uid):
            return
        viewer, _ = split_view(path)
        agent = self.kernel.agents.get(viewer) if viewer else None
        if agent is None or agent.uid != ctx.uid:
            raise Fs9Error(errno.EACCES, "not yours")

    def refusals_logged(self, path: tuple[str, ...]):
        return refusals_logged(self.kernel, path)

    def check(self, path: tuple[str, ...], writing: bool, removing: bool = False) -> None:
        """A view's refusal of a write (unveil mode, pledge, ownership) or read (unveil
        mode, pledge, label): logged."""
        viewer, inner = split_view(path)
        if viewer is None:
            return
        with self.refusals_logged(path):
            view = self.tree.view(viewer)
            if removing:
                view.check_remove(inner)
            else:
                view.check_write(inner) if writing else view.check_read(inner)
            if not writing:
                labels.check_read(self.kernel, self.kernel.agents[viewer], inner)
            if writing and inner[:1] == ("vault",) and len(inner) > 1:
                owner = self.kernel.owner_of(inner)
                if owner != viewer:
                    raise Fs9Error(errno.EACCES, f"{shown_path(inner)} is owned by "
                                   + (f"agent {owner}: ask it by mail" if owner else
                                      "no agent: only the operator changes it"))

    def check_listing(self, path: tuple[str, ...]) -> None:
        """A view's refusal to list a directory labelled above its clearance (names are
        contents too): logged."""
        viewer, inner = split_view(path)
        if viewer is None:
            return
        with self.refusals_logged(path):
            self.tree.view(viewer)  # (ENOENT: no such agent)
            labels.check_read(self.kernel, self.kernel.agents[viewer], inner)

    def check_walk(self, path: tuple[str, ...]) -> None:
        """A view's refusal to look up a name inside a vault subtree labelled above its
        clearance, as a directory it may not search (EACCES whether the name exists or
        not; the subtree itself may be stat'ed): logged. Names hidden by the view stay
        ENOENT (the walk finds them absent); elsewhere a name is looked up to write to
        it too (mail or work sent up to a higher clearance), so only reads check."""
        viewer, inner = split_view(path)
        if viewer is None or inner[:1] != ("vault",) or len(inner) < 3:
            return
        if self.tree.view(viewer).access(inner) is not None:
            self.check_listing(path[:-1])


    def check_link(self, src: tuple[str, ...], dst: tuple[str, ...]) -> None:
        """A new name dst for the file at src (link(2); dst already checked as a name
        to make): the operator makes any; an agent only for a file it may write under
        src (unveil, pledge, ownership) and owned by the same agent at dst. So no link
        gives a file rights, an owner or a label its first name did not: EPERM, as
        Linux's protected_hardlinks answers a link to a file the caller may not write."""
        viewer, inner = split_view(src)
        if viewer is None:
            return
        with self.refusals_logged(src):
            name = "/".join(inner)
            try:
                self.tree.view(viewer).check_write(inner)
            except Fs9Error as e:
                raise Fs9Error(errno.EPERM, f"no second name for {name}, which agent "
                                            f"{viewer} may not write: {e.text}") from None
            owner = self.kernel.owner_of(inner)
            if owner != viewer or self.kernel.owner_of(split_view(dst)[1]) != owner:
                raise Fs9Error(errno.EPERM, f"no second name for {name} under another "
                                            "owner: a link would change its owner and label")


@contextlib.contextmanager
def refusals_logged(kernel: "Kernel", path: tuple[str, ...]):
    """A refusal (Fs9Error) made in the block is an event and a line in the err of the
    agent whose view path is in, then goes on to the caller."""
    try:
        yield
    except Fs9Error as e:
        viewer, inner = split_view(path)
        kernel.refused(e, agent=viewer, file=shown_path(inner))
        raise


# --- the kernel's own rules, which fs9 (root) applies for the caller ----------------
# (node: a vault file, with .st its lstat and .mode that as a view shows it)

def new_mode(path, mode: int, ctx) -> int:
    """The permission bits of a new file: the caller's umask applied (fs9's own must
    not be); no agent makes a setuid or setgid file."""
    mode &= 0o7777 & ~ctx.umask
    if split_view(path)[0] is not None:
        mode &= ~(stat.S_ISUID | stat.S_ISGID)
    return mode


def may_set_attributes(path, node, attr, fields, ctx) -> None:
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


def may_access(node, mode: int, ctx) -> bool:
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


def may_write_file(path, st: os.stat_result, uid: int) -> None:
    """An agent (uid) writes a file with more than one name (hard links: opens it to
    write, truncates it, changes its mode, times or attributes) only if the file is its
    own on disk, as fs9 made it for it. Its other names may be anywhere: outside the
    agent's subtree, under another owner's label (the operator may plant them); finding
    them needs a walk of the vault, so the rule asks the inode alone (st, from an fd
    on the very file changed). EACCES."""
    if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and st.st_uid != uid:
        raise Fs9Error(errno.EACCES, f"{'/'.join(split_view(path)[1])} has "
                                     f"{st.st_nlink} names and is not this agent's own: "
                                     "only the operator changes it")
