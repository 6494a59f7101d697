"""Who may do what through the mount.

fs9 serves every request as root and the mount has no default_permissions, so the
kernel decides nothing: fs9 does. `Gate` admits the operator to the whole tree and an
agent's uid only to its view, applies the view's unveil, pledge and ownership rules
(and to a link, `check_link`: a second name grants nothing), and logs each refusal.
For vault files it also applies the kernel's own rules for access(2), modes, owners
and new files (`may_access`, `may_set_attributes`, `new_mode`), and fs9's for files
with several names (`may_write_file`). Pure checks: nothing here blocks but the lstat
of a shared vault's directories and the read of a caller's groups (/proc).

With `fs9 mount --share-vault`, other local users (neither the operator nor an agent's
uid) are admitted to vault/ and only to it (the root may be traversed, not listed), and
each of their requests is checked as a kernel filesystem checks it (`Gate.shared` and
the `may_*` methods): search permission on every directory on the way (asked afresh per
request, since the mount has no default_permissions), mode bits for owner, group and
other with the caller's groups, sticky directories, chmod by the owner, chown by root.
"""
import contextlib
import errno
import os
import stat

from ..errors import Fs9Error
from ..kernel import approvals, labels
from ..kernel.names import shown_path, split_view
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel.kernel import Kernel


class Gate:
    """The access checks of one mount (uid: the operator's, the one who mounted it)."""

    def __init__(self, kernel: "Kernel", tree, uid: int, share_vault: bool = False) -> None:
        self.kernel = kernel
        self.tree = tree
        self.uid = uid
        self.share_vault = share_vault  # (fs9 mount --share-vault)

    def admit(self, path: tuple[str, ...], ctx, listing: bool = False) -> None:
        """Only the operator (the mounting user, or root) uses the whole tree; an agent's
        uid only its own view. Defence in depth: a confined agent's mount namespace
        shows it nothing else anyway. A shared vault's other local users: vault/, with
        search permission on each directory on the way, and the root only to pass
        through (listing: opendir)."""
        if ctx.uid in (0, self.uid):
            return
        if self.shared(ctx):
            if path == () and not listing:
                return
            if path[:1] != ("vault",):
                raise Fs9Error(errno.EACCES, "only vault/ is shared with other users")
            for depth in range(len(path) - 1):
                directory = self._vault_stat(path[1:1 + depth])
                if directory is not None and not may_access(
                        directory.st_mode, directory, os.X_OK, ctx, groups_of(ctx)):
                    raise Fs9Error(errno.EACCES, "no search permission on "
                                   + shown_path(path[:1 + depth]))
            return
        viewer, _ = split_view(path)
        agent = self.kernel.agents.get(viewer) if viewer else None
        if agent is None or agent.uid != ctx.uid:
            raise Fs9Error(errno.EACCES, "not yours")

    # --- a shared vault's other users: the kernel's rules, applied by fs9 (root) -------

    def shared(self, ctx) -> bool:
        """ctx is another local user of a shared vault: neither the operator nor an
        agent's uid (agents keep their views' rules)."""
        return self.share_vault and ctx is not None and ctx.uid not in (0, self.uid) \
            and ctx.uid not in self.kernel.uids

    def _vault_stat(self, rel) -> os.stat_result | None:
        try:
            return self.kernel.vault_root.lstat(rel)
        except OSError:
            return None  # gone or not a directory: the request itself will say so

    def may(self, node, want: int, ctx, what: str) -> None:
        """A shared vault's user asking want (R_OK, W_OK, X_OK bits) of node: EACCES
        unless its mode bits grant them."""
        if not self.shared(ctx):
            return
        st = getattr(node, "st", None)  # (only the vault's files have one)
        if st is None or not may_access(st.st_mode, st, want, ctx, groups_of(ctx)):
            raise Fs9Error(errno.EACCES, f"permission denied: {what}")

    def may_open(self, node, flags: int, ctx) -> None:
        want = 0 if flags & os.O_ACCMODE == os.O_WRONLY else os.R_OK
        if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR) or flags & os.O_TRUNC:
            want |= os.W_OK
        self.may(node, want, ctx, "open")

    def may_make_in(self, directory, ctx) -> None:
        """A new name in directory: write and search permission on it."""
        self.may(directory, os.W_OK | os.X_OK, ctx, "a new name in this directory")

    def may_remove(self, directory, node, ctx) -> None:
        """A name removed (or renamed away, or replaced) in directory: write and search
        permission on it and, in a sticky directory, the file's or the directory's
        owner (EPERM, as the kernel's sticky check)."""
        if not self.shared(ctx):
            return
        self.may_make_in(directory, ctx)
        if directory.st.st_mode & stat.S_ISVTX and \
                ctx.uid not in (node.st.st_uid, directory.st.st_uid):
            raise Fs9Error(errno.EPERM, "a sticky directory: only the owner removes or "
                                        "renames a name in it")

    def may_rename(self, old_dir, node, new_dir, replaced, ctx) -> None:
        """rename(2): removed from old_dir, made in new_dir (replacing replaced, if
        any); a directory moved to another parent needs write permission on itself
        (its ..)."""
        if not self.shared(ctx):
            return
        self.may_remove(old_dir, node, ctx)
        if replaced is not None:
            self.may_remove(new_dir, replaced, ctx)
        else:
            self.may_make_in(new_dir, ctx)
        if stat.S_ISDIR(node.st.st_mode) and old_dir.rel != new_dir.rel:
            self.may(node, os.W_OK, ctx, "moving a directory changes its ..")

    def may_link(self, node, ctx) -> None:
        """A second name for a file (protected_hardlinks): its owner's, or a regular,
        neither setuid nor setgid-executable file the caller may read and write."""
        if not self.shared(ctx) or ctx.uid == node.st.st_uid:
            return
        bits = node.st.st_mode
        if not stat.S_ISREG(bits) or bits & stat.S_ISUID or \
                bits & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP:
            raise Fs9Error(errno.EPERM, "no second name for another user's special file")
        try:
            self.may(node, os.R_OK | os.W_OK, ctx, "link")
        except Fs9Error:
            raise Fs9Error(errno.EPERM, "no second name for a file one may not read "
                                        "and write") from None

    def may_set(self, node, attr, fields, fh, ctx) -> None:
        """setattr beyond may_set_attributes: a size needs write permission (not through
        an open file: its open was checked), times the owner or (to now, as touch
        does) write permission; an owner's chmod keeps setgid only for a group of
        its own (the kernel clears it)."""
        if not self.shared(ctx):
            return
        if fields.update_size and fh is None:
            self.may(node, os.W_OK, ctx, "truncate")
        if (fields.update_atime or fields.update_mtime) and ctx.uid != node.st.st_uid:
            self.may(node, os.W_OK, ctx, "times of another user's file")
        if fields.update_mode and attr.st_mode & stat.S_ISGID and \
                node.st.st_gid not in (ctx.gid, *groups_of(ctx)):
            attr.st_mode &= ~stat.S_ISGID

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
                agent = self.kernel.agents[viewer]
                if approvals.vault_needs(agent, inner):  # one yes, one change of that path
                    where = shown_path(inner)
                    self.kernel.approvals.gate(
                        agent, "vault_write", where, f"a change of {where} (under "
                        "approval.vault_write)", agent.current.corr if agent.current else None,
                        True)

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

def new_mode(path, mode: int, ctx, parent: os.stat_result | None = None) -> int:
    """The permission bits of a new file: the caller's umask applied (fs9's own must
    not be); no agent makes a setuid or setgid file, and nobody but root a setgid file
    of a group not its own (parent: its directory, whose group a setgid one gives)."""
    mode &= 0o7777 & ~ctx.umask
    if split_view(path)[0] is not None:
        mode &= ~(stat.S_ISUID | stat.S_ISGID)
    if parent is not None and mode & stat.S_ISGID and ctx.uid != 0:
        group = parent.st_gid if parent.st_mode & stat.S_ISGID else ctx.gid
        if group not in (ctx.gid, *groups_of(ctx)):
            mode &= ~stat.S_ISGID
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


def groups_of(ctx) -> tuple[int, ...]:
    """The supplementary groups of the requesting process (thread) now, as FUSE servers
    without default_permissions read them: /proc/PID/status, Groups:. None readable
    (it exited): none; the primary group (ctx.gid) still counts."""
    try:
        with open(f"/proc/{int(ctx.pid)}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


def may_access(bits: int, st: os.stat_result, mode: int, ctx, groups=()) -> bool:
    """access(2) on a vault file: its mode bits (as a view shows them) for the caller's
    uid, primary gid and groups; root passes all but X_OK on a file nobody may
    execute."""
    if ctx.uid == 0:
        return not mode & os.X_OK or stat.S_ISDIR(bits) or bool(bits & 0o111)
    if ctx.uid == st.st_uid:
        have = bits >> 6
    elif ctx.gid == st.st_gid or st.st_gid in groups:
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
