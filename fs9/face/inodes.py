"""Inode bookkeeping: path <-> inode number, with the kernel's lookup counts.

Synthetic files are identified by path: an inode stays valid while the kernel
remembers it (lookup count > 0); what it serves is resolved afresh from the
tree on every request, so a path whose object went away answers ENOENT.
Only `forget` drops an inode, as pyfuse3's tmpfs example does. A file with an
inode of its own (the vault's) takes its inode along when renamed (`renamed`) and
away when removed (`gone`).
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

    def gone(self, path: tuple[str, ...]) -> None:
        """A file with an inode of its own was removed: its inode (which the kernel may
        still hold, an open file) moves aside, so a new file of that name gets an inode
        of its own."""
        self._graves += 1
        grave = ("\0gone", str(self._graves))
        self.move(lambda p: grave + p[len(path):] if p[:len(path)] == path else None)

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
        if ino != ROOT and ino in self._path:
            del self._ino[self._path.pop(ino)]
