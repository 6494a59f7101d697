"""One vault file held by an fd (beneath.py resolved it): what fs9 does to that inode
whatever its name holds meanwhile. Where Linux has no *at call (chmod, truncate, xattrs,
times of a symlink, reading) the fd is reached through /proc/self/fd/N, as virtiofsd
does: that magic link is the pinned inode itself (a symlink stays a symlink). Blocking
functions; OSError only.
"""
import ctypes
import errno
import os
import stat

from ... import resolve

_AT_FDCWD, _UTIME_OMIT = -100, (1 << 30) - 2
_oserror = resolve.oserror
CHANGED = "the vault changed on disk under this name"


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


libc = ctypes.CDLL(None, use_errno=True)


def proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def read(fd: int, limit: int) -> bytes | None:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    rfd = os.open(proc(fd), os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)  # the same inode
    try:
        chunks = []
        while limit > 0 and (chunk := os.read(rfd, min(limit, 1 << 20))):
            chunks.append(chunk)
            limit -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(rfd)


def times(atime_ns: int | None, mtime_ns: int | None):
    """utimensat's two timespecs (None: UTIME_OMIT, keep)."""
    return (_Timespec * 2)(*(_Timespec(0, _UTIME_OMIT) if t is None
                             else _Timespec(*divmod(t, 10**9)) for t in (atime_ns, mtime_ns)))


def chmod(fd: int, mode: int) -> None:
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        raise _oserror(errno.EOPNOTSUPP)
    os.chmod(proc(fd), mode)  # the pinned inode, whatever its name has become


def create(d: int, n: bytes, flags: int, mode: int) -> tuple[int, bool]:
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW | os.O_CREAT
    try:
        fd = os.open(n, flags | os.O_EXCL, mode, dir_fd=d)
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        return os.open(n, flags & ~os.O_CREAT, dir_fd=d), False  # made meanwhile
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, True


def settle(fd: int, parent: os.stat_result, mode, uid: int, gid: int,
            kind: int | None = None) -> None:
    """fd: the file fs9 made (create), or what its name holds now (kind given: it must
    still be what fs9 made, see settle)."""
    made_gid = os.getegid()
    if parent.st_mode & stat.S_ISGID:  # the kernel gave it the directory's group
        gid = made_gid = parent.st_gid
    st = os.fstat(fd)
    if kind is not None and (stat.S_IFMT(st.st_mode) != kind
                             or (st.st_uid, st.st_gid) != (os.geteuid(), made_gid)
                             or (kind != stat.S_IFDIR and st.st_nlink != 1)):
        raise OSError(errno.ENOENT, f"{CHANGED}: not given away")
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(proc(fd), uid, gid)  # the pinned inode itself (a symlink: its own)
        if mode is None and not stat.S_ISLNK(st.st_mode):
            mode = stat.S_IMODE(st.st_mode)  # chown cleared setuid bits: put them back
    if mode is not None:
        if stat.S_ISDIR(st.st_mode) and parent.st_mode & stat.S_ISGID:
            mode |= stat.S_ISGID  # inherited, as mkdir(2) does
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            chmod(fd, mode)


class Pinned:
    """One vault file pinned by an O_PATH|O_NOFOLLOW fd (VaultRoot.pinned): its lstat,
    and changes to that inode whatever its name holds meanwhile (a symlink: its own)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def truncate(self, size: int) -> None:
        os.truncate(proc(self.fd), size)

    def chmod(self, mode: int) -> None:
        chmod(self.fd, mode)

    def chown(self, uid: int, gid: int) -> None:
        os.chown(proc(self.fd), uid, gid)

    def utimens(self, atime_ns: int | None, mtime_ns: int | None) -> None:
        """Times in ns since the epoch (None: keep)."""
        if libc.utimensat(ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(os.fsencode(
                proc(self.fd))), times(atime_ns, mtime_ns), ctypes.c_int(0)) != 0:
            raise _oserror(ctypes.get_errno())

    def setxattr(self, name: str, value: bytes, flags: int = 0) -> None:
        os.setxattr(proc(self.fd), name, value, flags)

    def removexattr(self, name: str) -> None:
        os.removexattr(proc(self.fd), name)
