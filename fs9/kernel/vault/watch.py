"""Watching the vault's backing directory for changes made behind fs9's back.

An editor, git or any other program may change the vault directory directly. The
watcher (watchdog: inotify, in watchdog's own threads) hands each change to trio
with `TrioToken.run_sync_soon`, never blocking watchdog's thread on ours:
  - at once, the search index is told (kernel.search.touch);
  - after SETTLE_S, the changes of the batch are coalesced (a created file's
    modifications are its creation) and each is a `vault_changed` event, unless
    fs9 made that change itself within OWN_S (the face reports its own changes,
    with their actor, through OwnChanges.report: they are logged once).
When the kernel's inotify queue overflows (a big checkout, max_queued_events:
16,384 by default), its events are lost: watchdog re-adds its watches and says so
only in its log, so fs9 hooks its overflow callback (after watchdog's own), logs a
`watch_overflow` event and has the search index compare the whole vault with what it
holds (mtime and size: only changed files are read).
Names starting with "." and everything under them (.git, editors' swap files) are
neither logged nor indexed. Directory "modified" events (a name came or went in
it) say nothing the file's own event does not. A vault path is a tuple of names (as
the index keeps it; a name that is not UTF-8 holds surrogate escapes); the watcher
only names what changed: the index reaches it beneath the vault root (index.py).
"""
import logging
import math
import os
import time

import trio

from ..names import shown_path, split_view
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel import Kernel

SETTLE_S = 0.25  # a change waits this long: fs9's own report of it arrives first
OWN_S = 2.0  # a change fs9 made to a path within this long is not logged again
OPS = {"created": "created", "modified": "modified", "deleted": "deleted", "moved": "moved",
       "closed": "", "attrib": ""}  # watchdog's kind -> our op ("": index only)
log = logging.getLogger("fs9.vaultwatch")


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


def rel_path(vault: str, path: str) -> tuple[str, ...] | None:
    """path (absolute, under vault) as the names beneath it; None: outside or hidden
    (dot)."""
    rel = os.path.relpath(path, vault)
    if rel == "." or rel.startswith("../") or rel == ".." or any(
            part.startswith(".") for part in rel.split("/")):
        return None
    return tuple(rel.split("/"))


def coalesce(batch: list[tuple]) -> list[tuple]:
    """(op, rel, dest, is_dir) changes in order -> the (op, rel, dest) worth logging:
    each once, a created file's modifications dropped, directories' modifications
    dropped."""
    created = {rel for op, rel, _, _ in batch if op == "created"}
    out: list[tuple[str, str, str | None]] = []
    for op, rel, dest, is_dir in batch:
        if not op or (op == "modified" and (is_dir or rel in created)):
            continue
        if (op, rel, dest) not in out:
            out.append((op, rel, dest))
    return out


async def watch(kernel: "Kernel", *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Watch kernel.vault_dir until cancelled. Ready once the watch is in place; a
    watch that cannot start (inotify limits, no watchdog) is a `watch_unavailable`
    event, and the mount goes on without it."""
    vault = kernel.vault_dir
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel(math.inf)
    try:
        from watchdog import events
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):  # watchdog's thread
                op = OPS.get(event.event_type)
                if op is None:
                    return
                item = (op, os.fsdecode(event.src_path),
                        os.fsdecode(event.dest_path) if event.dest_path else None,
                        event.is_directory, time.monotonic())
                try:
                    token.run_sync_soon(_arrived, kernel, send, item)
                except trio.RunFinishedError:
                    pass  # the mount is going away

        observer = Observer()
        # Only changes: by default inotify also reports every open and every close of a
        # file read, which costs fs9 CPU for each read of the vault, and a `grep -r`
        # alone can overflow the kernel's event queue and lose real changes.
        changes = [events.FileCreatedEvent, events.DirCreatedEvent, events.FileModifiedEvent,
                   events.FileDeletedEvent, events.DirDeletedEvent, events.FileMovedEvent,
                   events.DirMovedEvent, events.FileClosedEvent]
        observer.schedule(Handler(), vault, recursive=True, event_filter=changes)
        await trio.to_thread.run_sync(observer.start)  # sets up the watches: walks the tree
        if not _hook_overflow(observer, lambda: _run_soon(token, _overflowed, kernel)):
            log.warning("watchdog %s: inotify queue overflows cannot be seen; changes "
                        "made during one may be missed", _watchdog_version())
    except Exception as e:
        kernel.log.append("watch_unavailable", reason=f"cannot watch {vault}: {e}")
        task_status.started()
        return
    task_status.started()
    try:
        await _log_changes(kernel, receive)
    except Exception:
        kernel.log.bug("vaultwatch")
        kernel.log.append("watch_unavailable", reason="the vault watcher failed (see bug)")
    finally:
        observer.stop()  # its threads end on their own; joining could stall the unmount


def _hook_overflow(observer, callback) -> bool:
    """Have callback called (in watchdog's thread) after watchdog handled an inotify
    queue overflow (IN_Q_OVERFLOW: it rebuilds its watches, then the callback runs, so
    a rescan started by it misses nothing). False: this watchdog has no such hook."""
    hooked = False
    for emitter in observer.emitters:
        group = getattr(emitter, "_inotify", None)  # watchdog 7: an InotifyWatchGroup
        original = getattr(group, "on_queue_overflow", None)
        if original is None:
            continue

        def on_queue_overflow(original=original) -> None:
            try:
                original()
            finally:
                callback()
        group.on_queue_overflow = on_queue_overflow  # InotifyFD calls it on the instance
        hooked = True
    return hooked


def _run_soon(token, fn, *args) -> None:
    try:
        token.run_sync_soon(fn, *args)
    except trio.RunFinishedError:
        pass  # the mount is going away


def _overflowed(kernel: "Kernel") -> None:
    """Trio thread: the watcher lost events."""
    kernel.log.append("watch_overflow", reason="the kernel's inotify queue overflowed: "
                      "changes were not reported one by one; the search index rescans the vault")
    if kernel.search is not None:
        kernel.search.rescan()


def _watchdog_version() -> str:
    try:
        from watchdog.version import VERSION_STRING
        return VERSION_STRING
    except ImportError:
        return "?"


def _arrived(kernel: "Kernel", send, item) -> None:
    """Trio thread: index now, log after SETTLE_S."""
    op, src, dest, is_dir, _ = item
    if is_dir and op in ("modified", ""):  # a name came or went: its own event says which
        return
    for path in (src, dest):
        rel = path and rel_path(kernel.vault_dir, path)
        if rel and kernel.search is not None:
            kernel.search.touch(rel)
    send.send_nowait(item)


async def _log_changes(kernel: "Kernel", receive) -> None:
    vault = kernel.vault_dir
    while True:
        first = await receive.receive()
        await trio.sleep(max(0.0, first[4] + SETTLE_S - time.monotonic()))
        items = [first]
        while True:
            try:
                items.append(receive.receive_nowait())
            except trio.WouldBlock:
                break
        batch = []
        for op, src, dest, is_dir, _ in items:
            rel = rel_path(vault, src)
            rel_dest = dest and rel_path(vault, dest)
            if op == "moved" and rel is None and rel_dest:  # from a hidden name: appears
                op, rel, rel_dest = "created", rel_dest, None
            elif op == "moved" and rel and not rel_dest:  # to a hidden name: goes away
                op, rel_dest = "deleted", None
            if rel is not None:
                batch.append((op, rel, rel_dest, is_dir))
        for op, rel, dest in coalesce(batch):
            ours = kernel.vault_changes.ours
            if ours(rel) or (dest and ours(dest)):
                continue
            fields = dict(path=shown_path(("vault", *rel)), op=op)
            if dest:
                fields["dest"] = shown_path(("vault", *dest))
            kernel.log.append("vault_changed", **fields)
