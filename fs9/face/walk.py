"""Walking the namespace: a path resolved to the node that serves it, through tree.py's
table (ROWS, VARS), and a directory listed from the rows one level below it."""
import errno
import inspect
from dataclasses import dataclass
from typing import Callable

from ..errors import Fs9Error
from ..kernel.names import split_view
from . import remote, remoteview, times
from .kinds import Dir
from .node import Node, shown
from .tree import _ASKS, ROWS, UNLISTED, VARS
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel.kernel import Kernel


def _text(name: str) -> bool:
    """name is UTF-8 text: no byte of it that is not UTF-8 (a surrogate escape,
    kernel/names.py), so it may name a kernel object."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class _Row:
    parts: tuple[str, ...]
    factory: Callable[..., Node | None] | None
    asks: bool  # the factory takes `me`: what it serves depends on who asks
    subtree: bool = False  # PREFIX/...: the row serves PREFIX and every path below it
    changed: Callable[..., int] | None = None  # (kernel, bound) -> its time (times.py)
    # its fixed names and its {variables}, each with its place in the path: a walk
    # compares the names first, so the rows beside the one that serves a path (the
    # 19 four deep) are passed over without looking up their objects
    fixed: tuple[tuple[int, str], ...] = ()
    variables: tuple[tuple[int, str], ...] = ()


def _row(pattern: str, factory) -> _Row:
    subtree = pattern.endswith("/...")
    pattern = pattern[:-4] if subtree else pattern
    parts = tuple(pattern.split("/")) if pattern else ()
    return _Row(parts, factory,
                not subtree and factory is not None
                and "me" in inspect.signature(factory).parameters, subtree,
                times.of_row(pattern),
                tuple((i, p) for i, p in enumerate(parts) if not p.startswith("{")),
                tuple((i, p[1:-1]) for i, p in enumerate(parts) if p.startswith("{")))


_ROWS = [_row(p, f) for p, f in ROWS.items()]
_SUBTREES = [row for row in _ROWS if row.subtree]
_BY_DEPTH: dict[int, list[_Row]] = {}  # rows by path length: a walk tries only these
for _r in _ROWS:
    _BY_DEPTH.setdefault(len(_r.parts), []).append(_r)


class Tree:
    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel

    def resolve(self, path: tuple[str, ...]) -> Node:
        """The node serving path (a tuple of names), or Fs9Error(ENOENT)."""
        viewer, inner = split_view(path)
        if viewer is None:
            return self._resolve(path, None, path)
        view = self.view(viewer)
        if view.access(inner) is None:
            raise Fs9Error(errno.ENOENT, "no such file")
        return self.adopt(path, self._resolve(inner, view, path))

    def adopt(self, path: tuple[str, ...], node: Node) -> Node | None:
        """node as served at path: in a view, None if hidden, else shown read-only
        where it may not change it (write-only where it may not read it)."""
        viewer, inner = split_view(path)
        if viewer is None:
            return node
        return shown(node, self.view(viewer).access(inner))

    def view(self, name: str):
        agent = self.kernel.agents.get(name)
        if agent is None:
            raise Fs9Error(errno.ENOENT, "no such file")
        return agent.view

    def hidden(self, path: tuple[str, ...]) -> bool:
        """path is in a view, exists, and that view hides it (worth an audit event)."""
        viewer, inner = split_view(path)
        if viewer is None or viewer not in self.kernel.agents:
            return False
        if self.view(viewer).access(inner) is not None:
            return False
        try:
            self._resolve(inner, None, inner)
            return True
        except Fs9Error:
            return False

    def _resolve(self, path: tuple[str, ...], view, at: tuple[str, ...]) -> Node:
        """path (in view, or None: the operator's) as asked at `at`."""
        for row in _SUBTREES:
            if path[:len(row.parts)] == row.parts:
                return row.factory(self.kernel, at, path[len(row.parts):], view)
        me = view and view.agent
        served = remote.resolve(self.kernel, path) if view is None else \
            remoteview.resolve_as(self.kernel, path, me)
        if served is not None:
            return served
        for row in _BY_DEPTH.get(len(path), ()):
            bound = self._bind(row, path, me)
            if bound is None:
                continue
            node = Dir() if row.factory is None else \
                row.factory(self.kernel, **bound, **({"me": me} if row.asks else {}))
            node.changed_ns = row.changed(self.kernel, bound)
            if isinstance(node, Dir):
                node.names = lambda row=row, bound=bound: [
                    n for n in self._children(row, bound, me)
                    if view is None or view.access(path + (n,)) is not None]
            return node
        raise Fs9Error(errno.ENOENT, "no such file")

    def _bind(self, row: _Row, path, me) -> dict | None:
        for i, name in row.fixed:
            if path[i] != name:
                return None
        bound: dict = {}
        for i, var in row.variables:
            name = path[i]
            if var != "query" and not _text(name):
                return None  # a kernel object's name is text (kept in SQLite, in JSON)
            asks = {"me": me} if var in _ASKS else {}
            obj = VARS[var][1](self.kernel, name, **bound, **asks)
            if obj is None:
                return None
            bound[var] = obj
        return bound

    def _children(self, row: _Row, bound: dict, me) -> list[str]:
        names = []
        depth = len(row.parts)
        for child in _BY_DEPTH.get(depth + 1, ()):
            if child.parts[:depth] != row.parts:
                continue
            last = child.parts[-1]
            if "/".join(child.parts) in UNLISTED:
                continue
            if last.startswith("{"):
                asks = {"me": me} if last[1:-1] in _ASKS else {}
                names.extend(VARS[last[1:-1]][0](self.kernel, **bound, **asks))
            else:
                names.append(last)
        return names
