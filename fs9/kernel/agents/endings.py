"""What confined agents leave when they end, cleared in bulk: their control groups and
their scratch folders. A thousand agents end at once at an unmount (or a halt and a
kill of them all): one at a time, each sent to a worker thread of its own, that took
seconds (the threads queue on the GIL; an rmdir of a control group that was read
waits for its files' dentries to go), and an empty folder's rmdir on a disk mounted
with `discard` waits for the disk (about 2 ms each here).
"""
import os
import shutil
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor

import trio

from ...drivers import cgroups

SCRATCH_THREADS = 8  # folders removed at once (their disk's discards overlap)


class EmptyGroups:
    """Control groups removed in batches by one worker thread: those whose agent ended
    while a batch was under way go in the next one."""

    def __init__(self) -> None:
        self._waiting: list[tuple[cgroups.Group, trio.Event, list[bool]]] = []
        self._draining = False

    async def remove(self, group: cgroups.Group) -> bool:
        """Remove group if nothing is in it (any more): whether it is gone. If not, the
        caller ends what is in it (`group.remove`, in a thread: it waits)."""
        entry = (group, trio.Event(), [])
        self._waiting.append(entry)
        if not self._draining:  # the first caller drains for all who come meanwhile
            self._draining = True
            try:
                while self._waiting:
                    batch, self._waiting = self._waiting, []
                    gone = [False] * len(batch)  # (if it fails: each caller removes its own)
                    try:
                        gone = await trio.to_thread.run_sync(
                            lambda: [g.remove_empty() for g, _, _ in batch])
                    finally:
                        for (_, done, answer), ok in zip(batch, gone):
                            answer.append(ok)
                            done.set()
            finally:
                self._draining = False
                for _, done, answer in self._waiting:  # (only if a drain failed)
                    answer.append(False)
                    done.set()
                self._waiting = []
        await entry[1].wait()
        return entry[2][0]


def remove_scratch_roots(prefix: str) -> None:
    """Remove /tmp's folders named prefix* that root owns, each as below (only fs9 makes
    those: anyone may make a name in /tmp, nobody but root a folder of root's): this
    state's scratch root, and any a server of it killed -9 left (it removed nothing)."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if name.startswith(prefix) and stat.S_ISDIR(st.st_mode) and st.st_uid == 0:
            remove_scratch_root(path)


def remove_scratch_root(root: str) -> None:
    """Remove fs9's scratch root (agents/sandbox.py: root's, 0711) and the agents'
    folders in it, a few at a time. rmtree neither follows a link nor removes one."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    with ThreadPoolExecutor(SCRATCH_THREADS) as pool:
        for _ in pool.map(lambda n: shutil.rmtree(os.path.join(root, n), ignore_errors=True),
                          names):
            pass
    shutil.rmtree(root, ignore_errors=True)
