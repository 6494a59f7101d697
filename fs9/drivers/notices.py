"""The seccomp filter every confined program runs under (built once, by the fork
server), and its listeners, read and answered by fd: a sandbox's own filter's, and, in
a pooled sandbox (pooled.py), its first program's, which that program loaded itself
and handed over. pyseccomp answers only the listener of a filter object loaded in this
process; these are its calls (libseccomp's) with the fd named.
"""
import ctypes
import errno
import select
import stat

import pyseccomp
from pyseccomp import _libseccomp

HUNG_UP = select.POLLHUP | select.POLLERR | select.POLLNVAL

# Syscalls a confined program has no business making: each is refused and reported.
ESCAPES = ("mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "ptrace",
           "process_vm_readv", "process_vm_writev", "open_by_handle_at",
           "name_to_handle_at", "move_mount", "open_tree", "fsopen", "fsmount", "fspick",
           "mount_setattr", "bpf", "init_module", "finit_module", "delete_module",
           "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct",
           "settimeofday", "clock_settime", "adjtimex", "quotactl", "perf_event_open",
           "userfaultfd", "keyctl", "add_key", "request_key", "iopl", "ioperm",
           # io_uring does file and network I/O out of the filter's and the audit's sight
           "io_uring_setup", "io_uring_enter", "io_uring_register")
SETS_MODE = (("chmod", 1), ("fchmod", 1), ("fchmodat", 2), ("fchmodat2", 2), ("open", 2),
             ("openat", 3), ("creat", 1), ("mknod", 1), ("mknodat", 2))  # (syscall, mode arg)
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000,
                   0x20000000, 0x40000000, 0x00000080)  # NS, CGROUP, UTS, IPC, USER, PID, NET, TIME


def seccomp_filter() -> pyseccomp.SyscallFilter:
    flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in ESCAPES:
        try:
            flt.add_rule(pyseccomp.NOTIFY, name)
        except OSError:
            pass  # not a syscall on this architecture
    for flag in NAMESPACE_FLAGS:  # clone() that would make a namespace
        flt.add_rule(pyseccomp.NOTIFY, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory, out of the filter's reach: make libc fall back to clone
    flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    # No setuid or setgid files: in a vault subtree bound idmapped, the agent's files are
    # its subtree owner's on disk (root's, say), and a setuid one would outlive the sandbox.
    for name, arg in SETS_MODE:
        for bit in (stat.S_ISUID, stat.S_ISGID):
            try:
                flt.add_rule(pyseccomp.NOTIFY, name, pyseccomp.Arg(arg, pyseccomp.MASKED_EQ, bit, bit))
            except OSError:
                pass
    flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "openat2")  # its mode is in memory too
    return flt


def refuse_next(fd: int) -> pyseccomp.Notification | None:
    """Read the next notification on listener fd and refuse its syscall (EPERM): what
    was tried, or None if its caller died while we looked."""
    req = ctypes.POINTER(pyseccomp._Notif)()
    resp = ctypes.POINTER(pyseccomp._NotifResp)()
    if _libseccomp.seccomp_notify_alloc(ctypes.byref(req), ctypes.byref(resp)) != 0:
        raise OSError(errno.ENOMEM, "cannot allocate a seccomp notification")
    try:
        if _libseccomp.seccomp_notify_receive(fd, req) != 0:
            return None
        note = pyseccomp.Notification._from_raw(req.contents)
        pyseccomp.NotificationResponse(-errno.EPERM, 0, note.id, 0)._load_into_raw(
            resp.contents)
        _libseccomp.seccomp_notify_respond(fd, resp)  # (fails only if the caller died)
        return note
    finally:
        _libseccomp.seccomp_notify_free(req, resp)


def hung_up(fd: int) -> bool:
    """Whether no process is left under listener fd's filter (it then polls readable
    for ever: the caller stops listening and closes it)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(events & HUNG_UP for _, events in poller.poll(0))
