"""A sandbox's seccomp listeners, read and answered by fd: its own filter's, and, in a
pooled sandbox (pooled.py), its first program's, which that program loaded itself and
handed over. pyseccomp answers only the listener of a filter object loaded in this
process; these are its calls (libseccomp's) with the fd named.
"""
import ctypes
import errno
import select

import pyseccomp
from pyseccomp import _libseccomp

HUNG_UP = select.POLLHUP | select.POLLERR | select.POLLNVAL


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
