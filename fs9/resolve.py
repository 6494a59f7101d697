"""A directory reached beneath a directory fd with no symlink followed on the way.

fs9 acts as root on trees hostile programs can change (the vault, the sandbox's view of
it): a path string handed to a syscall there may cross a symlink swapped in a moment
before. So a directory is resolved to an O_PATH fd with openat2(dirfd, "a/b",
RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS): a symlink anywhere on the
way is refused in the same lookup (ELOOP; EXDEV if the walk left dirfd). Without openat2
(ENOSYS, kernels before 5.6) or for a path over PATH_MAX, it walks name by name with
openat(O_PATH|O_NOFOLLOW|O_DIRECTORY), as QEMU 9p's relative_openat_nofollow does
(CVE-2016-9602). The vault (kernel/vault/beneath.py) and the sandbox's binds
(drivers/zygote.py) both resolve here; this module imports nothing of fs9.
"""
import ctypes
import errno
import os
import stat

RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08
_SYS_OPENAT2 = 437  # the unified syscall table: x86_64, aarch64, riscv64, ...
PATH_MAX = 4000  # a longer path is walked name by name (the kernel's limit is 4096)
DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC  # a directory on the way, pinned


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
# syscall(SYS_openat2, dirfd, path, &how, sizeof how), typed (half the cost of untyped)
_sys_openat2 = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_char_p,
                                ctypes.c_void_p, ctypes.c_size_t, use_errno=True)(
    ("syscall", _libc))
_HOW = _OpenHow(DIR, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
_HOW_P, _HOW_SIZE = ctypes.addressof(_HOW), ctypes.sizeof(_HOW)
_have_openat2 = True  # until the kernel says ENOSYS


def oserror(err: int, what=None) -> OSError:
    return OSError(err, os.strerror(err), what)


def openat2_beneath(dirfd: int, names) -> int:
    """A new O_PATH fd of the directory dirfd/names (bytes): openat2 refuses a symlink on
    the way (ELOOP) and anything outside dirfd (EXDEV)."""
    path = b"/".join(names)
    for _ in range(3):  # EAGAIN: a rename meanwhile, the kernel asks for a retry
        fd = _sys_openat2(_SYS_OPENAT2, dirfd, path, _HOW_P, _HOW_SIZE)
        if fd >= 0 or ctypes.get_errno() != errno.EAGAIN:
            break
    if fd < 0:
        err = ctypes.get_errno()
        ctypes.set_errno(0)  # ctypes' errno is shared: a library that checks it after a
        raise oserror(err, os.fsdecode(path))  # call that succeeded (landlock) must see 0
    return fd


def walk_beneath(dirfd: int, names) -> int:
    """As openat2_beneath, name by name with openat(O_PATH|O_NOFOLLOW|O_DIRECTORY)."""
    if not names:
        raise oserror(errno.ENOENT)  # as openat2 of ""
    fd = dirfd
    try:
        for name in names:
            try:
                nfd = os.open(name, DIR | os.O_NOFOLLOW, dir_fd=fd)
            except NotADirectoryError:  # a symlink? say so, as openat2 does
                if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise oserror(errno.ELOOP, os.fsdecode(name)) from None
                raise
            if fd != dirfd:
                os.close(fd)
            fd = nfd
    except BaseException:
        if fd != dirfd:
            os.close(fd)
        raise
    return fd


def directory_beneath(dirfd: int, path: bytes, openat2: bool = True) -> int:
    """A new O_PATH fd of the directory dirfd/path (b"a/b", not empty): openat2 where
    the kernel has it and the path fits, else the name-by-name walk (openat2=False:
    always the walk)."""
    global _have_openat2
    if openat2 and _have_openat2 and len(path) <= PATH_MAX:
        try:
            return openat2_beneath(dirfd, (path,))
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _have_openat2 = False
    return walk_beneath(dirfd, path.split(b"/"))
