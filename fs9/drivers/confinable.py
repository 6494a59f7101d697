"""Whether this host can confine agents, and whether an agent's uid can reach a path:
asked before anything starts (by `fs9 mount`'s parent too, which must not load the
sandbox's code and its event loop to ask). drivers/confine.py re-exports both.
"""
import ctypes
import os

# what every confined program may read (its Landlock layer), and the devices it may use
SYSTEM_READ = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/proc")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


def landlock_call(call, *args, **kwargs):
    """call(...) of the `landlock` package, which takes ctypes' thread-wide errno for the
    call's own (its errcheck never looks at the result): a failure left there by any
    earlier ctypes call in this thread (an openat2 that found nothing, a refused flag)
    would fail a call that succeeded, so it is cleared first."""
    ctypes.set_errno(0)
    return call(*args, **kwargs)


def unavailable() -> str | None:
    """Why exec agents cannot be confined here, or None."""
    if os.geteuid() != 0:
        return "confinement needs root (a private mount namespace and a uid per agent)"
    try:
        import landlock
        if landlock_call(landlock.landlock_abi_version) < 1:
            return "Landlock is not enabled in this kernel"
    except Exception as e:
        return f"Landlock is not available: {e}"
    if not os.path.exists("/proc/self/ns/mnt"):
        return "mount namespaces are not available"
    return None


def unreachable(path: str) -> str | None:
    """The first directory on the way to path (path itself excluded) that other users
    cannot pass (an agent's uid is another user), or None."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts)):
        d = os.sep.join(parts[:i]) or os.sep
        try:
            if not os.stat(d).st_mode & 0o001:
                return d
        except OSError:
            return d
    return None
