"""The edge of every pyfuse3 handler: errors go out as errnos, names come in as str.

Every handler goes through `boundary`: Fs9Error becomes its errno, anything
else becomes EIO plus a logged traceback, because one exception escaping a
pyfuse3 handler ends the whole mount.
"""
import errno
import functools
import logging
import os
import time

import pyfuse3

from ..errors import Fs9Error

log = logging.getLogger("fs9.face")


def boundary(fn):
    @functools.wraps(fn)
    async def handler(self, *args):
        start, ok = time.perf_counter(), False
        try:
            result = await fn(self, *args)
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
