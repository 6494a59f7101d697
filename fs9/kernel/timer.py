"""A sleep shorter than a millisecond that lasts what it says.

trio waits for its next deadline in epoll_wait, whose timeout Python rounds up to a
whole millisecond: on a server with nothing else to do, `trio.sleep(0.0005)` takes a
millisecond (it is exact only while other I/O wakes the loop). A timerfd made readable
when it fires wakes epoll to the microsecond. Used where a delay is a cost paid by a
reader (a topic's hold for a batch: bus/topic.py); where no timerfd can be had, trio's
sleep.
"""
import ctypes
import os

import trio

CLOCK_MONOTONIC = 1  # <linux/time.h>
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


async def sleep(seconds: float) -> None:
    """Sleep `seconds` (> 0), to the microsecond when the machine allows."""
    fd = _libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        await trio.sleep(seconds)
        return
    try:
        whole = int(seconds)
        when = _Itimerspec(_Timespec(0, 0),
                           _Timespec(whole, max(1, int((seconds - whole) * 1e9))))
        if _libc.timerfd_settime(fd, 0, ctypes.byref(when), None) < 0:
            await trio.sleep(seconds)
            return
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
