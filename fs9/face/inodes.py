"""Inode bookkeeping: path <-> inode number, with the kernel's lookup counts.

Synthetic files are identified by path: an inode stays valid while the kernel
remembers it (lookup count > 0); what it serves is resolved afresh from the
tree on every request, so a path whose object went away answers ENOENT.
Only `forget` drops an inode, as pyfuse3's tmpfs example does.
"""
import pyfuse3

ROOT = pyfuse3.ROOT_INODE


class Inodes:
    def __init__(self) -> None:
        self._ino: dict[tuple[str, ...], int] = {(): ROOT}
        self._path: dict[int, tuple[str, ...]] = {ROOT: ()}
        self._lookups: dict[int, int] = {}
        self._next = ROOT + 1

    def path(self, ino: int) -> tuple[str, ...] | None:
        return self._path.get(ino)

    def known(self, path: tuple[str, ...]) -> int | None:
        return self._ino.get(path)

    def number(self, path: tuple[str, ...]) -> int:
        """The inode of path, allocated if new (without counting a lookup)."""
        ino = self._ino.get(path)
        if ino is None:
            ino, self._next = self._next, self._next + 1
            self._ino[path], self._path[ino] = ino, path
        return ino

    def lookup(self, path: tuple[str, ...]) -> int:
        """Count one kernel reference to path's inode (lookup, create)."""
        ino = self.number(path)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return ino

    def move(self, rename) -> None:
        """A rename: every known path p becomes rename(p) (None: unchanged). An inode
        whose path is taken by another is dropped (it was replaced): stale from now on."""
        moves = [(p, ino, new) for p, ino in self._ino.items()
                 if (new := rename(p)) is not None]
        for p, ino, _ in moves:
            del self._ino[p]
        for _, ino, new in moves:
            replaced = self._ino.pop(new, None)
            if replaced is not None:
                self._path.pop(replaced, None)
            self._ino[new], self._path[ino] = ino, new

    def forget(self, ino: int, n: int) -> None:
        left = self._lookups.get(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        if ino != ROOT and ino in self._path:
            del self._ino[self._path.pop(ino)]
