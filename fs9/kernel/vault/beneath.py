"""Vault files reached beneath one directory fd: no path-based syscall as root on the vault.

A path is a tuple of names under the vault root. Every operation resolves the parent of
the last name to an O_PATH fd beneath the root's fd (fs9/resolve.py: openat2 with
RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS, or a name-by-name O_NOFOLLOW walk): a symlink
anywhere on the way (one an agent swapped in meanwhile, even by renameat2
RENAME_EXCHANGE) is refused in the same lookup (ELOOP; EXDEV if the walk left the root).
Then it acts on the last name with an *at call that does not follow it:
a symlink there is the file itself (lstat shows it, readlink reads it, open: ELOOP).
Where Linux has no such call (chmod, truncate, xattrs, reading regular files only) the
file is pinned by an O_PATH|O_NOFOLLOW fd and reached through /proc/self/fd/N, as
virtiofsd does: that magic link is the pinned inode itself (a symlink stays a symlink);
`pinned` hands out that fd for a check and changes that must concern one file. What fs9
makes for a caller is given to them by the file made, never by a name they may swap
meanwhile: a create through its fd (create_settled), the rest only while the name still
holds what was made (settle).

Nothing is cached across calls: a call costs an openat2 and a close more than a path-
based one. A per-directory O_PATH fd cache (virtiofsd keeps an fd per inode) would save
those in hot directories, at the price of invalidation on rename and rmdir, an fd budget
and names gone stale. Blocking functions (run them in worker threads); OSError only.
"""
import ctypes
import errno
import functools
import os
import stat
import sys

from ... import resolve
from .pinned import Pinned, create as _create, libc as _libc, proc as _proc, \
    read as _read, settle as _settle, times as _times, chmod as _chmod

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_SYMLINK_NOFOLLOW = 0x100
_PIN = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC  # the last name itself, pinned
_LIST = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FSENC, _BAD_NAMES = sys.getfilesystemencoding(), frozenset((b"", b".", b".."))
_oserror = resolve.oserror


def path_of(rel) -> bytes:
    """rel as one path b"a/b/c" (b"" for the root); EINVAL unless rel is a tuple (or list)
    of names, str (surrogate escapes too) or bytes, none "", ".", ".." or with "/" or NUL."""
    try:
        if not isinstance(rel, (tuple, list)):
            raise TypeError
        try:
            path = "/".join(rel).encode(_FSENC, "surrogateescape")
        except TypeError:  # bytes names
            path = b"/".join([os.fsencode(n) for n in rel])
    except (TypeError, UnicodeError):
        raise _oserror(errno.EINVAL, repr(rel)) from None
    names = path.split(b"/") if path else ()
    if len(names) != len(rel) or not _BAD_NAMES.isdisjoint(names) or b"\0" in path:
        raise _oserror(errno.EINVAL, repr(rel))
    return path


def _vault_errors(fn):
    """OSError only, naming the vault path; misuse (bad types, a NUL in an xattr name, a
    huge mode) is EINVAL."""
    @functools.wraps(fn)
    def method(self, *args, **kw):
        try:
            return fn(self, *args, **kw)
        except OSError as e:
            rel = next((a for a in args if isinstance(a, tuple)), ())
            where = "/".join(n if isinstance(n, str) else repr(n) for n in rel)
            raise OSError(e.errno, e.strerror, where) from None
        except (ValueError, TypeError, UnicodeError, OverflowError) as e:
            raise _oserror(errno.EINVAL, str(e)) from None
    return method


class VaultRoot:
    """The vault root as an O_PATH fd; every method reaches its file beneath it. rel is a
    tuple of names; () is the root itself, as "." of the root fd, so the kernel's own
    answers (mkdir: EEXIST, unlink: EISDIR, rmdir: EINVAL, rename: EBUSY). openat2=False:
    always the name-by-name walk (tests; kernels before 5.6)."""

    def __init__(self, path: str, openat2: bool = True) -> None:
        self.path, self.openat2 = path, openat2
        self.fd = os.open(path, resolve.DIR)  # the operator's choice: resolved normally

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "VaultRoot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _at(self, rel, fn):
        """fn(O_PATH fd of the parent, last name) for rel."""
        parent, _, name = path_of(rel).rpartition(b"/")
        if self.fd < 0:
            raise _oserror(errno.EBADF)
        if not parent:  # the root is the parent
            return fn(self.fd, name or b".")
        pfd = resolve.directory_beneath(self.fd, parent, self.openat2)
        try:
            return fn(pfd, name)
        finally:
            os.close(pfd)

    def _pinned(self, rel, fn):
        """fn(O_PATH|O_NOFOLLOW fd of rel itself)."""
        return self._at(rel, lambda d, n: _pin(d, n, fn))

    def lstat(self, rel) -> os.stat_result:
        return self._at(rel, lambda d, n: os.stat(n, dir_fd=d, follow_symlinks=False))

    def open(self, rel, flags: int) -> int:
        """An existing file, never through a symlink (ELOOP); O_CREAT, O_TMPFILE: EINVAL."""
        if flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE:
            raise _oserror(errno.EINVAL, "open creates nothing: use create")
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        return self._at(rel, lambda d, n: os.open(n, flags, dir_fd=d))

    def create(self, rel, flags: int, mode: int) -> tuple[int, bool]:
        """Open rel, creating it with exactly mode (not fs9's umask): (fd, created)."""
        return self._at(rel, lambda d, n: _create(d, n, flags, mode))

    def create_settled(self, rel, flags: int, mode: int, uid: int,
                       gid: int) -> tuple[int, bool, OSError | None]:
        """create, and a file made is given to uid:gid as settle does, through the fd it
        was made with: never by its name, which may hold another file by then (swapped
        in by whoever may rename there). (fd, created, the OSError settling raised: the
        file was made all the same, still fs9's; else None)."""
        def create(d, n):
            fd, created = _create(d, n, flags, mode)
            try:
                if created:
                    _settle(fd, os.fstat(d), None, uid, gid)
            except OSError as e:
                return fd, created, e
            except BaseException:
                os.close(fd)
                raise
            return fd, created, None
        return self._at(rel, create)

    def scandir(self, rel) -> list[tuple[str, os.stat_result]]:
        """A directory's entries with their lstat, sorted by name."""
        return self._at(rel, lambda d, n: _using(os.open(n, _LIST, dir_fd=d), _listing))

    def mkdir(self, rel, mode: int = 0o777) -> None:
        self._at(rel, lambda d, n: os.mkdir(n, mode, dir_fd=d))

    def mknod(self, rel, mode: int = 0o600, rdev: int = 0) -> None:
        self._at(rel, lambda d, n: os.mknod(n, mode, rdev, dir_fd=d))

    def symlink(self, target: str, rel) -> None:
        target = os.fsencode(target)  # text, never resolved here
        self._at(rel, lambda d, n: os.symlink(target, n, dir_fd=d))

    def link(self, src_rel, dst_rel) -> None:
        """A hard link to src itself (a symlink is linked, not followed)."""
        self._at(src_rel, lambda sd, sn: self._at(dst_rel, lambda dd, dn: os.link(
            sn, dn, src_dir_fd=sd, dst_dir_fd=dd, follow_symlinks=False)))

    def unlink(self, rel) -> None:
        self._at(rel, lambda d, n: os.unlink(n, dir_fd=d))

    def rmdir(self, rel) -> None:
        self._at(rel, lambda d, n: os.rmdir(n, dir_fd=d))

    def rename(self, old_rel, new_rel, flags: int = 0) -> None:
        """rename(2), with renameat2's RENAME_NOREPLACE and RENAME_EXCHANGE flags."""
        def rename(od, on, nd, nn):
            if not flags:
                os.rename(on, nn, src_dir_fd=od, dst_dir_fd=nd)
            elif _libc.renameat2(ctypes.c_int(od), ctypes.c_char_p(on), ctypes.c_int(nd),
                                 ctypes.c_char_p(nn), ctypes.c_uint(flags)) != 0:
                raise _oserror(ctypes.get_errno())
        self._at(old_rel, lambda od, on: self._at(new_rel, lambda nd, nn: rename(
            od, on, nd, nn)))

    def readlink(self, rel) -> str:
        return os.fsdecode(self._at(rel, lambda d, n: os.readlink(n, dir_fd=d)))

    def chmod(self, rel, mode: int) -> None:
        """The file's mode; a symlink's: EOPNOTSUPP (as fchmodat AT_SYMLINK_NOFOLLOW)."""
        self._pinned(rel, lambda fd: _chmod(fd, mode))

    def chown(self, rel, uid: int, gid: int) -> None:
        self._at(rel, lambda d, n: os.chown(n, uid, gid, dir_fd=d, follow_symlinks=False))

    def utimens(self, rel, atime_ns: int | None, mtime_ns: int | None) -> None:
        """Times in ns since the epoch (None: keep); a symlink's own times."""
        ts = _times(atime_ns, mtime_ns)

        def utimens(d, n):
            if _libc.utimensat(ctypes.c_int(d), ctypes.c_char_p(n), ts,
                               ctypes.c_int(_AT_SYMLINK_NOFOLLOW)) != 0:
                raise _oserror(ctypes.get_errno())
        self._at(rel, utimens)

    def truncate(self, rel, size: int) -> None:
        """A regular file's size (the kernel says EISDIR for a directory, else EINVAL)."""
        self._pinned(rel, lambda fd: os.truncate(_proc(fd), size))

    def getxattr(self, rel, name: str) -> bytes:
        return self._pinned(rel, lambda fd: os.getxattr(_proc(fd), name))

    def setxattr(self, rel, name: str, value: bytes, flags: int = 0) -> None:
        self._pinned(rel, lambda fd: os.setxattr(_proc(fd), name, value, flags))

    def listxattr(self, rel) -> list[str]:
        return self._pinned(rel, lambda fd: os.listxattr(_proc(fd)))

    def removexattr(self, rel, name: str) -> None:
        self._pinned(rel, lambda fd: os.removexattr(_proc(fd), name))

    def settle(self, rel, kind: int, mode: int | None, uid: int, gid: int) -> None:
        """A name fs9 (root) just made for a caller, of kind (stat.S_IFDIR, S_IFIFO...):
        give it to uid:gid as the kernel would have (a setgid directory's group is
        inherited), with mode exactly (None: as made, a symlink). Only if the name still
        holds what fs9 made: that kind, fs9's own (its uid, the group it was made with)
        and, but for a directory, one name. Else whoever may rename there swapped
        something else in meanwhile (a second name of a file it may not change), and it
        is left alone: ENOENT. The root: EINVAL."""
        if not rel:
            raise _oserror(errno.EINVAL)
        self._at(rel, lambda d, n: _pin(d, n, lambda fd: _settle(
            fd, os.fstat(d), mode, uid, gid, kind)))

    def pinned(self, rel, fn):
        """fn(Pinned(rel itself)): its fstat and changes through one O_PATH fd, so all
        concern the file that was there when it was pinned."""
        return self._pinned(rel, lambda fd: fn(Pinned(fd)))

    def read(self, rel, limit: int) -> bytes | None:
        """A regular file's first limit bytes; None if not a regular file or not
        reachable. Opens nothing else (never a FIFO or a device)."""
        path_of(rel)  # a bad name is the caller's mistake: EINVAL, not None
        try:
            return self._pinned(rel, lambda fd: _read(fd, limit))
        except OSError:
            return None

    def walk(self, rel=(), skip=lambda name: name.startswith("."),
             max_entries: int = 1_000_000):
        """(rel, lstat) of every non-directory entry beneath rel, depth first, by name;
        names skip() accepts are left out, with all under them. A directory that cannot
        be opened (gone, a symlink swapped in) is skipped. Stops after max_entries
        entries listed (directories and skipped names count). Iterative: an explicit
        stack; one directory fd held (also while yielding), a few more while opening."""
        path, left = path_of(rel), max_entries
        stack = [tuple(map(os.fsdecode, path.split(b"/"))) if path else ()]
        held, held_fd = None, -1  # the directory listed last, kept for its children
        try:
            while stack and left > 0:
                d = stack.pop()
                try:
                    if d[:-1] == held:  # a child of it: one openat, no resolution
                        dfd = os.open(os.fsencode(d[-1]), _LIST, dir_fd=held_fd)
                    else:
                        dfd = self._at(d, lambda p, n: os.open(n, _LIST, dir_fd=p))
                except OSError:
                    continue
                if held_fd >= 0:
                    os.close(held_fd)
                held, held_fd = d, dfd
                try:
                    entries = _listing(dfd, left)
                except OSError:
                    continue
                left -= len(entries)
                entries = [(n, st) for n, st in entries if not skip(n)]
                dirs = [d + (n,) for n, st in entries if stat.S_ISDIR(st.st_mode)]
                for name, st in entries:
                    if not stat.S_ISDIR(st.st_mode):
                        yield d + (name,), st
                stack.extend(reversed(dirs))
        finally:
            if held_fd >= 0:
                os.close(held_fd)


for _name, _fn in list(vars(VaultRoot).items()):  # all but walk (which never raises
    if not _name.startswith("_") and _name not in ("close", "walk"):  # for one path)
        setattr(VaultRoot, _name, _vault_errors(_fn))


def _using(fd: int, fn):
    try:
        return fn(fd)
    finally:
        os.close(fd)


def _pin(pfd: int, name: bytes, fn):
    return _using(os.open(name, _PIN, dir_fd=pfd), fn)


def _listing(dfd: int, limit: int | None = None):
    """An open directory's entries with their lstat (fstatat on it), sorted by name; a
    name gone meanwhile is left out."""
    out = []
    with os.scandir(dfd) as it:  # on a dup of dfd: the caller closes dfd
        for e in it:
            if limit is not None and len(out) >= limit:
                break
            try:
                out.append((e.name, e.stat(follow_symlinks=False)))
            except FileNotFoundError:
                pass
    return sorted(out, key=lambda entry: entry[0])
