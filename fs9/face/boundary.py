"""The edge of every pyfuse3 handler: errors go out as errnos, names come in as str.

Every handler goes through `boundary`: Fs9Error becomes its errno, anything
else becomes EIO plus a logged traceback, because one exception escaping a
pyfuse3 handler ends the whole mount. It is also where a request is acknowledged:
at durability=power its reply waits until the events it logged are on disk
(kernel/sync.py; the wait is shared with every request logged before the same fsync).
"""
import errno
import functools
import logging
import os
import time

import pyfuse3

from ..errors import Fs9Error

log = logging.getLogger("fs9.face")


# The requests whose reply acknowledges a change: at durability=power each waits until
# the events logged meanwhile are on disk. (A read may log too, e.g. mail_delivered, but
# its reader was promised nothing durable; release is not awaited by close(2).)
ACKNOWLEDGING = frozenset({"open", "create", "write", "flush", "fsync", "setattr", "unlink",
                           "rmdir", "mkdir", "mknod", "symlink", "link", "rename",
                           "setxattr", "removexattr"})


def boundary(fn):
    acknowledges = fn.__name__ in ACKNOWLEDGING

    @functools.wraps(fn)
    async def handler(self, *args):
        events = self.kernel.log
        start, ok = time.perf_counter(), False
        try:
            before = events.last_seq
            result = await fn(self, *args)
            if acknowledges and events.last_seq != before:  # it (or a request beside it)
                await events.sync.wait_synced(events.last_seq)  # logged: at power, on disk
            ok = True
            return result
        except pyfuse3.FUSEError:
            raise
        except Fs9Error as e:
            log.debug("%s%r: %s", fn.__name__, args[:2], e)
            raise pyfuse3.FUSEError(e.errno)
        except Exception:
            self.kernel.log.bug(fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO)
        finally:  # counted in the root `metrics` (kernel/metrics.py)
            self.kernel.metrics.request(fn.__name__, time.perf_counter() - start, ok)
    return handler


def file_name(raw: bytes) -> str:
    """A name from the kernel as fs9 holds names (kernel/names.py): any bytes Linux
    allows, a byte that is not UTF-8 as a surrogate escape, so os.fsencode (and every
    call beneath the vault root) gives the same bytes back; at most 255 bytes."""
    if len(raw) > 255:
        raise Fs9Error(errno.ENAMETOOLONG, "file name too long")
    return os.fsdecode(raw)
