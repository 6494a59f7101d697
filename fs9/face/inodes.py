"""Inode bookkeeping: path <-> inode number, with the kernel's lookup counts.

Synthetic files are identified by path: an inode stays valid while the kernel
remembers it (lookup count > 0); what it serves is resolved afresh from the
tree on every request, so a path whose object went away answers ENOENT.
Only `forget` drops an inode, as pyfuse3's tmpfs example does. A file with an
inode of its own (the vault's) takes its inode along when renamed (`renamed`) and
away when removed (`gone`). A file with several names (hard links) is one inode of ours
under all the names looked up (`number`'s file: which file on disk it is, in which
view), as a kernel filesystem shows it: the inode is served through the name looked up
last (which held the file then), and lives on while any of its names is known.
"""
import pyfuse3

from ..kernel.names import split_view

ROOT = pyfuse3.ROOT_INODE


class Inodes:
    def __init__(self) -> None:
        self._ino: dict[tuple[str, ...], int] = {(): ROOT}
        self._path: dict[int, tuple[str, ...]] = {ROOT: ()}
        self._lookups: dict[int, int] = {}
        self._next = ROOT + 1
        self._graves = 0  # removed names (see gone)
        self._names: dict[int, set[tuple[str, ...]]] = {ROOT: {()}}  # inode -> its paths
        self._files: dict[tuple, int] = {}  # a file on disk (number's file) -> its inode
        self._file_of: dict[int, tuple] = {}

    def path(self, ino: int) -> tuple[str, ...] | None:
        return self._path.get(ino)

    def known(self, path: tuple[str, ...]) -> int | None:
        return self._ino.get(path)

    def number(self, path: tuple[str, ...], file: tuple | None = None) -> int:
        """The inode of path, allocated if new (without counting a lookup); file: which
        file on disk path names now (None: path is the file), so that a new name of a
        file with an inode already is that inode."""
        ino = self._ino.get(path)
        if ino is not None:
            if file is not None and file not in self._files and ino not in self._file_of:
                self._files[file], self._file_of[ino] = ino, file  # (it was just linked)
            return ino
        ino = self._files.get(file) if file is not None else None
        if ino is None:
            ino, self._next = self._next, self._next + 1
            if file is not None:
                self._files[file], self._file_of[ino] = ino, file
        self._ino[path], self._path[ino] = ino, path
        self._names.setdefault(ino, set()).add(path)
        return ino

    def lookup(self, path: tuple[str, ...], file: tuple | None = None) -> int:
        """Count one kernel reference to path's inode (lookup, create)."""
        ino = self.number(path, file)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return ino

    def move(self, rename) -> None:
        """A rename: every known path p becomes rename(p) (None: unchanged). An inode
        whose path is taken by another is dropped (it was replaced): stale from now on."""
        moves = [(p, ino, new) for p, ino in self._ino.items()
                 if (new := rename(p)) is not None]
        for p, ino, _ in moves:
            del self._ino[p]
            self._names[ino].discard(p)
        for _, ino, new in moves:
            replaced = self._ino.pop(new, None)
            if replaced is not None and replaced != ino:  # (not a name of the same file)
                self._unname(replaced, new)
            self._ino[new] = ino
            self._names[ino].add(new)
            if self._path.get(ino) not in self._names[ino]:
                self._path[ino] = new

    def _unname(self, ino: int, path: tuple[str, ...]) -> None:
        """path no longer names inode ino: it is served through another of its names,
        or (none left) stale from now on, and its file may be another's later (the
        disk reuses inode numbers)."""
        names = self._names.get(ino, set())
        names.discard(path)
        if self._path.get(ino) == path:
            if names:
                self._path[ino] = next(iter(names))
            else:
                self._path.pop(ino, None)
        if not names:
            self._files.pop(self._file_of.pop(ino, None), None)

    def gone(self, path: tuple[str, ...]) -> None:
        """A file with an inode of its own was removed: its inode (which the kernel may
        still hold, an open file) moves aside, so a new file of that name gets an inode
        of its own."""
        self._graves += 1
        grave = ("\0gone", str(self._graves))
        ino = self._ino.get(path)
        self.move(lambda p: grave + p[len(path):] if p[:len(path)] == path else None)
        if ino is not None and ino in self._file_of:
            if len(self._names[ino]) > 1:  # served through its other names
                del self._ino[grave]
                self._unname(ino, grave)
            else:  # a file made later may get its number on disk
                self._files.pop(self._file_of.pop(ino))

    def renamed(self, old: tuple[str, ...], new: tuple[str, ...], exchange=False) -> None:
        """Keep every inode naming the moved file (in the operator's tree and in every
        view) on its new path, so a held inode never resolves to what replaced it.
        old, new: paths outside any view; exchange: the two swapped places
        (RENAME_EXCHANGE)."""
        swaps = [(old, new), (new, old)] if exchange else [(old, new)]

        def rename(path):
            viewer, inner = split_view(path)
            prefix = path[:len(path) - len(inner)]
            for src, dst in swaps:
                if inner[:len(src)] == src:
                    return prefix + dst + inner[len(src):]
            return None
        self.move(rename)

    def forget(self, ino: int, n: int) -> None:
        left = self._lookups.get(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        if ino != ROOT:
            for path in self._names.pop(ino, ()):
                if self._ino.get(path) == ino:
                    del self._ino[path]
            self._path.pop(ino, None)
            self._files.pop(self._file_of.pop(ino, None), None)
