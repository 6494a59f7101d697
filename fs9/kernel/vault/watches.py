"""The vault's inotify watches: each one added on a folder opened beneath the vault
root's fd, kept in a tree of names, read by one thread that reports changes in batches.

Why not watchdog, which fs9 used before (issue 20): it adds each watch by path string
(inotify_add_watch: IN_DONT_FOLLOW covers only the last name, so a folder swapped for
a symlink between its listing and the add had root watching a directory outside the
vault, whose names then came out as vault changes); its walks are os.walk, recursive
in Python 3.11 (1,200 nested folders moved in raised RecursionError in its dispatcher
thread, which ended quietly: no later change was seen); and its threads die unseen.
Making it safe meant overriding four private methods of one version. So, here:
  - a folder is opened beneath the root (VaultRoot: openat2 RESOLVE_BENEATH |
    RESOLVE_NO_SYMLINKS, O_NOFOLLOW on the last name; a child of a folder just listed:
    openat of one name on that folder's fd, O_NOFOLLOW) and the watch is added on
    /proc/self/fd/N: a magic link to the inode held open, not a name resolved again, so
    the watch is on the folder checked whatever happens to names meanwhile (and
    IN_ONLYDIR checks it is a folder). A symlink anywhere is never followed;
  - the watch descriptor names the inode (inotify gives an inode it watches already the
    same wd), so the tree follows renames, even RENAME_EXCHANGE, by asking the disk what
    a name is now (`_settle`): a known folder moves with its subtree, a new one is
    walked. A folder that leaves the vault (moved out, to a hidden name) loses its
    watches once no move is pending (`_limbo`);
  - walks are iterative (an explicit stack) and bounded (MAX_WATCHES folders,
    MAX_ENTRIES names listed); an agent's own subtrees (`owner`: Kernel.owner_of) get at
    most PER_OWNER watches, and all owners together OWNED_SHARE, so one agent (or a
    few) making folders without end in what it owns cannot take the watches from
    everyone: past its share a folder of its is not watched (`capped` says so once
    per owner and watcher's life), and the rest of the vault stays watched; a folder
    gone or swapped for a symlink meanwhile is
    skipped (its parent's events say what became of it); anything else that leaves a
    folder unwatched (ENOSPC: fs.inotify.max_user_watches, an I/O error) or loses events
    (IN_Q_OVERFLOW) raises WatchLost: the supervisor (watch.py) starts over and rescans;
  - names starting with "." and everything under them are neither watched nor reported.
A change is (op, rel, dest, is_dir): op created | modified | deleted | moved (to dest)
| "" (closed after writing, attributes: the index only). A folder that appears (made,
moved in) is one change: what is in it already comes with it.
"""
import ctypes
import errno
import os
import select
import struct
import threading
import time
from typing import Callable

from .beneath import VaultRoot

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_UNMOUNT, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x2000, 0x4000, 0x8000
IN_ONLYDIR, IN_EXCL_UNLINK, IN_ISDIR = 0x01000000, 0x04000000, 0x40000000
# Changes only: IN_OPEN/IN_ACCESS/IN_CLOSE_NOWRITE would cost an event per read of the
# vault, and a `grep -r` alone could overflow the kernel's queue.
MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
        | IN_DELETE | IN_DELETE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK)
MAX_WATCHES = 65536  # folders watched (each costs the kernel about 1 KiB)
PER_OWNER = 4096  # of them for the folders of one agent's own subtrees...
OWNED_SHARE = MAX_WATCHES // 2  # ...and for all agents' together: the rest is the operator's
MAX_ENTRIES = 1_000_000  # names one walk lists
MOVE_WAIT_S = 0.05  # a MOVED_FROM waits this long for its MOVED_TO, else it moved out
_READ = 1 << 16  # bytes read at once (an event is 16 bytes and its name)
_GONE = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV))
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (name follows)

_libc = ctypes.CDLL(None, use_errno=True)
_init1 = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, use_errno=True)(("inotify_init1", _libc))
_add_watch = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32,
                              use_errno=True)(("inotify_add_watch", _libc))
_rm_watch = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int, use_errno=True)(
    ("inotify_rm_watch", _libc))


class WatchLost(Exception):
    """The watches no longer see every change (the reason, in words): start again and
    compare the whole vault."""


class Node:
    """A watched folder: its watch descriptor and its place (name in parent)."""
    __slots__ = ("wd", "name", "parent", "children", "owner")

    def __init__(self, wd: int, name: str, parent: "Node | None", owner: str | None) -> None:
        self.wd, self.name, self.parent, self.owner = wd, name, parent, owner
        self.children: dict[str, Node] = {}


def _hidden(name: str) -> bool:
    return name.startswith(".")


class Watches:
    """One inotify instance over the vault. `run` (blocking: a worker thread) adds the
    watches, calls ready(), then reports batches of changes until `stop` or WatchLost."""

    def __init__(self, root: VaultRoot, report: Callable[[list], None],
                 owner: Callable[[tuple[str, ...]], str | None] = lambda rel: None,
                 capped: Callable[[str, tuple[str, ...]], None] = lambda who, rel: None,
                 ) -> None:
        self.root = root
        self.report = report  # called in the thread with a list of changes
        self.owner = owner  # the agent owning a vault path (a tuple of names), or None
        self.capped = capped  # (owner, path): its first folder not watched (in the thread)
        self._owned: dict[str, int] = {}  # owner -> its folders watched
        self._capped: set[str] = set()  # owners told of already
        self.fd = _init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            os.close(self.fd)
            raise
        self._lock = threading.Lock()  # stop() may race the thread's closing of the pipe
        self._closed = False
        self._by_wd: dict[int, Node] = {}
        self._top: Node | None = None
        self._limbo: dict[int, Node] = {}  # detached folders: moved (to come back) or out
        self._moves: dict[int, tuple] = {}  # cookie -> (rel, is_dir, when) of a MOVED_FROM

    @property
    def watched(self) -> int:
        return len(self._by_wd)

    def stop(self) -> None:
        """Have run() return soon (any thread)."""
        with self._lock:
            if not self._closed:
                try:
                    os.write(self._wake_w, b"!")
                except BlockingIOError:
                    pass  # a wake-up is pending already

    def run(self, ready: Callable[[], None]) -> None:
        """Blocking. Watch the whole vault, call ready(), then report changes until
        stop() (returns) or until the watches lose changes (WatchLost). Closes the
        inotify instance (all its watches) on the way out."""
        try:
            if self._watch(None, "") is None:
                raise WatchLost("the vault directory cannot be opened")
            ready()
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            while True:
                wait = MOVE_WAIT_S * 1000 if self._moves else None
                readable = {fd for fd, _ in poller.poll(wait)}
                if self._wake_r in readable:
                    return
                changes: list = []
                if self.fd in readable:
                    self._read(changes)
                self._expire_moves(changes, time.monotonic())
                if not self._moves:
                    self._drop_limbo()
                if changes:
                    self.report(changes)
        finally:
            with self._lock:
                self._closed = True
                for fd in (self.fd, self._wake_r, self._wake_w):
                    os.close(fd)

    # --- events ------------------------------------------------------------------

    def _read(self, changes: list) -> None:
        try:
            data = os.read(self.fd, _READ)
        except BlockingIOError:
            return
        i = 0
        while i + _EVENT.size <= len(data):
            wd, mask, cookie, length = _EVENT.unpack_from(data, i)
            name = data[i + _EVENT.size:i + _EVENT.size + length].rstrip(b"\0")
            i += _EVENT.size + length
            self._event(wd, mask, cookie, os.fsdecode(name), changes)

    def _event(self, wd: int, mask: int, cookie: int, name: str, changes: list) -> None:
        if mask & IN_Q_OVERFLOW:
            raise WatchLost("the kernel's inotify queue overflowed "
                            "(fs.inotify.max_queued_events): changes were lost")
        node = self._by_wd.get(wd)
        if node is None:
            return  # a watch removed meanwhile
        if mask & (IN_IGNORED | IN_UNMOUNT):
            if node is self._top:
                raise WatchLost("the vault directory was removed or unmounted")
            self._forget(node)
            self._detach(node)
            self._limbo.pop(wd, None)
            return
        if not name:
            if node is self._top and mask & IN_DELETE_SELF:
                raise WatchLost("the vault directory was removed")
            return  # about a folder itself: its parent's event says it
        where = self._rel(node)
        if where is None:
            return  # a folder no longer in the vault
        is_dir = bool(mask & IN_ISDIR)
        if is_dir and mask & (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO):
            self._settle(node, name)
        rel = where + (name,)
        if mask & IN_MOVED_FROM:
            self._moves[cookie] = (rel, is_dir, time.monotonic())
        elif mask & IN_MOVED_TO:
            src = self._moves.pop(cookie, None)
            if src is None or _hidden(src[0][-1]):  # from outside or a hidden name
                if not _hidden(name):
                    changes.append(("created", rel, None, is_dir))
            elif _hidden(name):  # to a hidden name: it goes away
                changes.append(("deleted", src[0], None, is_dir))
            else:
                changes.append(("moved", src[0], rel, is_dir))
        elif not _hidden(name):
            op = "created" if mask & IN_CREATE else "deleted" if mask & IN_DELETE else \
                "modified" if mask & IN_MODIFY else ""
            changes.append((op, rel, None, is_dir))

    def _expire_moves(self, changes: list, now: float) -> None:
        """MOVED_FROMs whose MOVED_TO did not come: moved out of the vault."""
        for cookie, (rel, is_dir, when) in list(self._moves.items()):
            if now - when >= MOVE_WAIT_S:
                del self._moves[cookie]
                if not _hidden(rel[-1]):
                    changes.append(("deleted", rel, None, is_dir))

    # --- the tree ----------------------------------------------------------------

    def _rel(self, node: Node) -> tuple[str, ...] | None:
        """node's vault path; None if it is no longer attached beneath the root."""
        names = []
        while node is not self._top:
            if node.parent is None or len(names) > len(self._by_wd):
                return None
            names.append(node.name)
            node = node.parent
        return tuple(reversed(names))

    def _detach(self, node: Node) -> None:
        parent = node.parent
        if parent is not None and parent.children.get(node.name) is node:
            del parent.children[node.name]
        node.parent = None

    def _settle(self, parent: Node, name: str) -> None:
        """Make parent's child `name` what the disk has now: a folder (watched, with
        its subtree if new to us) or nothing. A folder that was there waits in limbo:
        it moved (and comes back with its MOVED_TO) or it left."""
        old = parent.children.get(name)
        if old is not None:
            self._detach(old)
            self._limbo[old.wd] = old
        if not _hidden(name):
            self._watch(parent, name)

    def _drop_limbo(self) -> None:
        """Folders detached and not back: no longer in the vault; their watches go."""
        limbo, self._limbo = self._limbo, {}
        for top in limbo.values():
            if top.parent is not None:
                continue  # attached again meanwhile
            stack = [top]
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                node.children.clear()
                if self._by_wd.get(node.wd) is node:
                    self._forget(node)
                    _rm_watch(self.fd, node.wd)  # EINVAL if already gone: nothing to do

    def _watch(self, parent: Node | None, name: str) -> Node | None:
        """Watch folder `name` in parent (None: the vault root) and, if it is new to us,
        everything beneath it, depth first with an explicit stack. None: not a folder."""
        stack: list[tuple[Node | None, str]] = [(parent, name)]
        held: tuple[Node | None, int] = (None, -1)  # the folder listed last, and its fd
        first: Node | None = None
        listed = 0
        try:
            while stack:
                at, child = stack.pop()
                fd = self._open(at, child, held)
                if fd < 0:
                    continue
                try:
                    node, new = self._add(fd, at, child)
                except BaseException:
                    os.close(fd)
                    raise
                if node is None:  # its owner's share is used up: not watched
                    os.close(fd)
                    continue
                if at is parent and child == name:
                    first = node
                if not new:
                    os.close(fd)
                    continue
                if held[1] >= 0:
                    os.close(held[1])
                held = (node, fd)
                subdirs = []
                try:
                    with os.scandir(fd) as entries:  # on a dup of fd
                        for entry in entries:
                            listed += 1
                            if listed > MAX_ENTRIES:
                                raise WatchLost(f"over {MAX_ENTRIES} names in one walk of "
                                                "the vault")
                            if not _hidden(entry.name) and entry.is_dir(follow_symlinks=False):
                                subdirs.append(entry.name)
                except OSError as e:
                    if e.errno in _GONE:
                        continue
                    raise WatchLost(f"cannot list {self._where(node)}: {e.strerror}") from None
                stack.extend((node, n) for n in sorted(subdirs, reverse=True))
        finally:
            if held[1] >= 0:
                os.close(held[1])
        return first

    def _open(self, at: Node | None, name: str, held: tuple) -> int:
        """A read fd of folder name in at, reached beneath the root; -1 if it is gone or
        is not a folder (any more): a symlink is never followed."""
        try:
            if at is not None and at is held[0]:  # a child of the folder just listed
                return os.open(os.fsencode(name), _DIR, dir_fd=held[1])
            rel = () if at is None else self._rel(at)
            if rel is None:
                return -1
            if at is not None:
                rel += (name,)
            return self.root.open(rel, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            if e.errno in _GONE:
                return -1
            where = "vault" if at is None else f"a folder in {self._where(at)}"
            raise WatchLost(f"cannot open {where}: {e.strerror}") from None

    def _add(self, fd: int, parent: Node | None, name: str) -> tuple[Node | None, bool]:
        """Watch the folder open as fd and put it at parent/name: (its node, new?);
        (None, False): not watched, its owner's share is used up. The caller keeps fd."""
        if len(self._by_wd) >= MAX_WATCHES:
            raise WatchLost(f"over {MAX_WATCHES} folders to watch")
        wd = _add_watch(self.fd, f"/proc/self/fd/{fd}".encode(), MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSPC:
                raise WatchLost("the kernel's limit of inotify watches is reached "
                                "(fs.inotify.max_user_watches)")
            raise WatchLost(f"cannot watch a folder in "
                            f"{'vault' if parent is None else self._where(parent)}: "
                            f"{os.strerror(err)}")
        node = self._by_wd.get(wd)
        new = node is None
        if new:
            owner = self._owner_of(parent, name)
            if owner is not None and not self._room(owner, parent, name):
                _rm_watch(self.fd, wd)  # (a folder watched already is never refused)
                return None, False
            node = self._by_wd[wd] = Node(wd, name, None, owner)
            if owner is not None:
                self._owned[owner] = self._owned.get(owner, 0) + 1
        elif parent is not None and self._is_within(parent, node):
            return node, False  # the same folder twice (a bind mount): no cycle
        self._detach(node)
        self._limbo.pop(wd, None)
        node.name, node.parent = name, parent
        if parent is None:
            self._top = node  # the vault root: paths are named from it, even mid-walk
        else:
            parent.children[name] = node
        return node, new

    def _owner_of(self, parent: Node | None, name: str) -> str | None:
        """The agent owning folder name in parent (claims never overlap: a folder in an
        owned one is that owner's); the vault root is nobody's share."""
        if parent is None:
            return None
        if parent.owner is not None:
            return parent.owner
        rel = self._rel(parent)
        return None if rel is None else self.owner(rel + (name,))

    def _room(self, owner: str, parent: Node, name: str) -> bool:
        """owner may have one more folder watched; if not, `capped` says so (once)."""
        if self._owned.get(owner, 0) < PER_OWNER and \
                sum(self._owned.values()) < OWNED_SHARE:
            return True
        if owner not in self._capped:
            self._capped.add(owner)
            self.capped(owner, (self._rel(parent) or ()) + (name,))
        return False

    def _forget(self, node: Node) -> None:
        """node's watch is gone: no longer counted."""
        self._by_wd.pop(node.wd, None)
        if node.owner is not None and self._owned.get(node.owner, 0) > 0:
            self._owned[node.owner] -= 1

    def _is_within(self, node: Node, ancestor: Node) -> bool:
        for _ in range(len(self._by_wd) + 1):
            if node is ancestor:
                return True
            if node.parent is None:
                return False
            node = node.parent
        return True  # a cycle already: refuse

    def _where(self, node: Node) -> str:
        rel = self._rel(node)
        return "vault" if not rel else "/".join(("vault",) + rel)
