"""Watching the vault's backing directory for changes made behind fs9's back.

An editor, git or any other program may change the vault directory directly. The
watches (watches.py: inotify, every watch added beneath the vault root's fd, read in
one worker thread) hand each batch of changes to trio with `TrioToken.run_sync_soon`,
never blocking that thread on ours:
  - at once, the search index is told (kernel.search.touch);
  - after SETTLE_S, the changes of the batch are coalesced (a created file's
    modifications are its creation) and each is a `vault_changed` event, unless
    fs9 made that change itself within OWN_S (the face reports its own changes,
    with their actor, through OwnChanges.report: they are logged once).
The watcher is supervised: whenever it stops seeing every change (the kernel's inotify
queue overflowed, a folder cannot be watched, fs.inotify.max_user_watches is reached,
the vault directory went away, a defect), that is a `watch_unavailable` event with the
reason, and it starts again after a backoff (BACKOFF_S, doubling); once its watches are
back, a `watch_restored` event, and the search index compares the whole vault with what
it holds (mtime and size: only changed files are read), so what changed meanwhile is
found. Each further failed start rescans too, so search stays roughly current while
the watcher is down. An agent's own subtrees get a share of the watches (watches.py
PER_OWNER): folders it makes past it are not watched, which a `watch_capped` event
says (once per agent and watcher's life) while the rest of the vault stays watched.
Names starting with "." and everything under them (.git, editors' swap files) are
neither logged nor indexed. A vault path is a tuple of names (as the index keeps it; a
name that is not UTF-8 holds surrogate escapes); the watcher only names what changed:
the index reaches it beneath the vault root (index.py).
"""
import math
import time

import trio

from ...errors import Fs9Error
from ..names import shown_path, split_view
from .watches import PER_OWNER, Watches, WatchLost
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel import Kernel

BACKOFF_S = (0.5, 60.0)  # first restart after a loss, doubling up to the second
STEADY_S = 30.0  # a watcher that ran this long before its loss: the backoff starts over
SETTLE_S = 0.25  # a change waits this long: fs9's own report of it arrives first
OWN_S = 2.0  # a change fs9 made to a path within this long is not logged again


class OwnChanges:
    """The vault changes fs9 made itself, for whoever asked through the mount: each is a
    `vault_changed` event naming its actor, and the watcher, seeing the same change on
    disk a moment later, does not log it again (`ours`)."""

    def __init__(self, log, search) -> None:
        self.log = log
        self.search = search  # told at once, or None (no vault)
        self._when: dict[tuple[str, ...], float] = {}  # vault path -> when fs9 changed it

    def report(self, path: tuple[str, ...], op: str, uid: int | None = None,
               dest: tuple[str, ...] | None = None) -> None:
        """The face changed the vault at path (op: created | modified | deleted | moved,
        to dest): the actor is the agent whose view path is in, else `uid UID`."""
        agent, inner = split_view(path)
        if inner[:1] != ("vault",) or len(inner) < 2:
            return
        fields = dict(path=shown_path(inner), op=op, actor=agent or f"uid {uid}")
        rels = [tuple(inner[1:])]
        if dest is not None:
            dest_inner = split_view(dest)[1]
            fields["dest"] = shown_path(dest_inner)
            rels.append(tuple(dest_inner[1:]))
        now = trio.current_time()
        for rel in rels:
            self._when[rel] = now
            if self.search is not None:
                self.search.touch(rel)
        if len(self._when) > 4096:  # forget what is too old to matter
            self._when = {p: t for p, t in self._when.items() if now - t < OWN_S}
        self.log.append("vault_changed", agent=agent, **fields)

    def ours(self, rel: tuple[str, ...]) -> bool:
        """fs9 itself changed vault path rel (a tuple of names) within the last OWN_S."""
        when = self._when.get(rel)
        return when is not None and trio.current_time() - when < OWN_S


def coalesce(batch: list[tuple]) -> list[tuple]:
    """(op, rel, dest, is_dir) changes in order -> the (op, rel, dest) worth logging:
    each once, a created file's modifications dropped, directories' modifications
    dropped."""
    created = {rel for op, rel, _, _ in batch if op == "created"}
    out: dict[tuple, None] = {}  # in order, each once (a batch may be thousands long)
    for op, rel, dest, is_dir in batch:
        if op and not (op == "modified" and (is_dir or rel in created)):
            out[op, rel, dest] = None
    return list(out)


class Supervisor:
    """Runs the watches in a worker thread, again after each loss (see the module doc)."""

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.token = trio.lowlevel.current_trio_token()
        self.send, self.receive = trio.open_memory_channel(math.inf)
        self.first = trio.Event()  # the first start is over (up or down)
        self.down = ""  # why the watcher is not watching ("": it is, or never started)
        self.down_since = 0.0
        self._came_up = False  # the current attempt's watches were in place
        self._thread = trio.CapacityLimiter(1)  # not the default limiter's

    async def run(self) -> None:
        """Until cancelled: start the watcher, and again after each loss."""
        delay = BACKOFF_S[0]
        while True:
            t0, self._came_up = trio.current_time(), False
            reason = await self._attempt()
            if not self.down:
                self.down, self.down_since = reason, trio.current_time()
                self.kernel.log.append("watch_unavailable", reason=reason)
            if not self._came_up and self.kernel.search is not None:
                self.kernel.search.rescan()  # while it stays down, search catches up
            self.first.set()
            if trio.current_time() - t0 > STEADY_S:
                delay = BACKOFF_S[0]
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    async def _attempt(self) -> str:
        """One watcher's life, in a worker thread; returns why it ended."""
        watches = None
        try:
            owners = self.kernel.owner_of  # (a dict lookup per depth: safe from the thread)
            watches = Watches(self.kernel.vault_root, self._from_thread(self._arrived),
                              owner=lambda rel: owners(("vault",) + rel),
                              capped=self._from_thread(self._capped))
            await trio.to_thread.run_sync(watches.run, self._from_thread(self._up, watches),
                                          abandon_on_cancel=True, limiter=self._thread)
            return "the watcher stopped"
        except WatchLost as e:
            return str(e)
        except OSError as e:  # inotify_init1: EMFILE (fs.inotify.max_user_instances)...
            return f"cannot watch {self.kernel.vault_dir}: {e.strerror}"
        except Exception:
            self.kernel.log.bug("vaultwatch")
            return "the vault watcher failed (see the bug event)"
        finally:
            if watches is not None:
                watches.stop()  # an abandoned thread (unmount) ends by itself

    def _from_thread(self, fn, *args):
        """fn(*args, *more) to be run on the trio thread, called from the watcher's."""
        def call(*more) -> None:
            try:
                self.token.run_sync_soon(fn, *args, *more)
            except trio.RunFinishedError:
                pass  # the mount is going away
        return call

    def _up(self, watches: Watches) -> None:
        """Trio thread: the watches are in place."""
        self._came_up = True
        if self.down:
            self.kernel.log.append("watch_restored", after=self.down, folders=watches.watched,
                                   down_s=round(trio.current_time() - self.down_since, 3))
            self.down = ""
            if self.kernel.search is not None:  # changes made meanwhile were not seen
                self.kernel.search.rescan()
        self.first.set()

    def _capped(self, agent: str, rel: tuple[str, ...]) -> None:
        """Trio thread: a folder of agent's own subtrees past its share is not watched."""
        self.kernel.log.append(
            "watch_capped", agent=agent, path=shown_path(("vault", *rel)), folders=PER_OWNER,
            reason=f"{agent} has its share of folders watched ({PER_OWNER}): changes in "
                   "its further folders are neither logged nor indexed until a rescan")

    def _arrived(self, batch: list) -> None:
        """Trio thread: index now, log after SETTLE_S."""
        now = time.monotonic()
        search = self.kernel.search
        for op, rel, dest, is_dir in batch:
            if is_dir and op in ("modified", ""):  # a name came or went: its own event says
                continue
            if search is not None:
                search.touch(rel)
                if dest:
                    search.touch(dest)
            self.send.send_nowait((op, rel, dest, is_dir, now))


async def watch(kernel: "Kernel", *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Watch kernel.vault_dir until cancelled, supervised. Ready once the first start
    is over: the watches are in place, or a `watch_unavailable` event says why not (and
    it is tried again)."""
    supervisor = Supervisor(kernel)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_log_changes, kernel, supervisor.receive)
        nursery.start_soon(supervisor.run)
        await supervisor.first.wait()
        task_status.started()


async def _log_changes(kernel: "Kernel", receive) -> None:
    """Each change after SETTLE_S, coalesced, as a `vault_changed` event. A defect here
    is a `bug` event and costs this batch only; an event the log refuses stops the
    watcher until the next mount (changes it would have logged are not made up later)."""
    while True:
        first = await receive.receive()
        await trio.sleep(max(0.0, first[4] + SETTLE_S - time.monotonic()))
        items = [first]
        while True:
            try:
                items.append(receive.receive_nowait())
            except trio.WouldBlock:
                break
        try:
            _log_batch(kernel, items)
        except Fs9Error:  # the log takes no writes (a full disk): the watcher stops
            raise  # (Kernel._service says so in the root err; the mount goes on)
        except Exception:
            kernel.log.bug("vaultwatch")


def _log_batch(kernel: "Kernel", items: list) -> None:
    ours = kernel.vault_changes.ours
    for op, rel, dest in coalesce([item[:4] for item in items]):
        if ours(rel) or (dest and ours(dest)):
            continue
        fields = dict(path=shown_path(("vault", *rel)), op=op)
        if dest:
            fields["dest"] = shown_path(("vault", *dest))
        kernel.log.append("vault_changed", **fields)
