"""An agent's view of the namespace: what its manifest unveils, what it pledged.

OpenBSD's unveil(2), applied to the namespace: a path outside the view does not
exist for the agent; a path it sees but may not change is read-only. pledge(2)'s
promises name the kinds of operation it may do at all. Pure data and functions
(sans-I/O): the face asks `access(path)` and `pledge_for(path)`; the kernel
checks manifests with `parse`.

Rules, in order:
  - `agents/*/view` never exists inside a view (a view is not a way into another);
  - the agent's own `agents/NAME/` is always visible, read-write;
  - `registry/` is visible read-only to agents that pledge `discover`;
  - an unveiled path and everything under it has the unveiled mode, and a vault
    subtree it owns (manifest `owns`) is read-write: the longest prefix of these
    wins (an owned subtree inside a read-only unveil is writable; an unveil inside
    an owned subtree, or of the subtree itself, narrows it); the ancestors of all of
    them are visible as directories that list only what leads into the view;
  - everything else is hidden.
"""
import errno
from dataclasses import dataclass

from ... import drivers
from ...errors import Fs9Error
from ..names import shown_path

PLEDGES = {
    "read": "read files outside the agent's own directory",
    "write": "change vault files",
    "send": "send mail (outbox, mail/new, tasks/ID/progress, another agent's in)",
    "publish": "publish on topics",
    "spawn": "write the kernel's ctl and other agents' ctl",
    "discover": "see the capability registry",
    "declassify": "label its mail below its clearance (each time logged: `declassified`)",
    "federate": "send mail to agents of other OSs (outbox/NAME@OS), within the peers' terms",
    "inet": "reach the network (else its sandbox has none); [net] narrows it to TCP ports",
}
DEFAULT_PLEDGE = ("read", "write", "send")
MODES = ("r", "w", "rw")

# Write-like operations and the promise each needs: (pattern, pledge). "*" matches
# one name; a pattern also covers everything below it. The first match wins.
WRITE_PLEDGES = (
    (("ctl",), "spawn"),
    (("agents", "*", "ctl"), "spawn"),
    (("agents", "*", "in"), "send"),
    (("agents", "*", "mail"), "send"),
    (("agents", "*", "outbox"), "send"),
    (("agents", "*", "tasks", "*", "progress"), "send"),
    (("topics",), "publish"),
    (("vault",), "write"),
    (("models",), None),  # a request to a model changes nothing: unveiling it is enough
)


def _matches(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    return len(path) >= len(pattern) and all(p in ("*", n) for p, n in zip(pattern, path))


@dataclass(frozen=True)
class View:
    agent: str
    pledges: frozenset[str]
    unveiled: tuple[tuple[tuple[str, ...], str], ...]  # (path, mode), longest first
    owns: tuple[tuple[str, ...], ...] = ()  # vault subtrees this agent alone may change

    def own(self, path: tuple[str, ...]) -> bool:
        return path[:2] == ("agents", self.agent)

    def access(self, path: tuple[str, ...]) -> str | None:
        """The mode ("r", "w", "rw") path has in this view, or None: hidden."""
        if len(path) >= 3 and path[0] == "agents" and path[2] == "view":
            return None
        if self.own(path):
            return "rw"
        if path[:1] == ("registry",) and "discover" in self.pledges:
            return "r"
        unveiled = next(((len(prefix), mode) for prefix, mode in self.unveiled
                         if path[:len(prefix)] == prefix), None)  # (longest first)
        if any(path[:len(prefix)] == prefix and (unveiled is None or len(prefix) > unveiled[0])
               for prefix in self.owns):
            return "rw"
        if unveiled is not None:
            return unveiled[1]
        if path in ((), ("agents",)) or any(
                prefix[:len(path)] == path for prefix in self._roots()):
            return "r"  # a directory on the way to something visible
        return None

    def _roots(self):
        yield from (prefix for prefix, _ in self.unveiled)
        yield from self.owns

    def pledge_for(self, path: tuple[str, ...]) -> str | None:
        """The promise a write-like operation on path needs (None: no promise needed)."""
        for pattern, promise in WRITE_PLEDGES:
            if _matches(pattern, path):
                if promise == "spawn" and self.own(path):
                    return None  # an agent may always stop or restart itself
                return promise
        return None if self.own(path) else "write"

    def check_write(self, path: tuple[str, ...]) -> None:
        """Raise Fs9Error unless this view may change path: ENOENT where the path is
        outside the view (creating a name there too), EACCES where it is read-only."""
        mode = self.access(path)
        if mode is None:
            raise Fs9Error(errno.ENOENT, f"{shown_path(path)} is outside the view of {self.agent}")
        if "w" not in mode:
            raise Fs9Error(errno.EACCES, f"{shown_path(path)} is read-only in the view of "
                                         f"{self.agent} (unveil it with mode w or rw)")
        if path[:1] == ("agents",) and len(path) > 2 and path[2] == "tasks" and not self.own(path):
            raise Fs9Error(errno.EACCES, f"only agent {path[1]} reports on its tasks")
        promise = self.pledge_for(path)
        if promise and promise not in self.pledges:
            raise Fs9Error(errno.EACCES, f"agent {self.agent} did not pledge {promise!r} "
                                         f"({PLEDGES[promise]})")

    def check_remove(self, path: tuple[str, ...]) -> None:
        """As check_write; and a message is acknowledged (rm) only by its recipient."""
        self.check_write(path)
        if path[:1] == ("agents",) and path[2:3] == ("mail",) and not self.own(path):
            raise Fs9Error(errno.EACCES, f"only agent {path[1]} acknowledges its mail")
        if path[:1] == ("mail",) and len(path) > 1:  # the root mailbox: the operator's
            raise Fs9Error(errno.EACCES, "only the operator acknowledges its mail")

    def check_read(self, path: tuple[str, ...]) -> None:
        """Raise Fs9Error(EACCES) unless this view may read path (which it sees)."""
        if "r" not in (self.access(path) or ""):
            raise Fs9Error(errno.EACCES, f"{shown_path(path)} is write-only in the view of "
                                         f"{self.agent}")
        if not self.own(path) and path and "read" not in self.pledges and not (
                path[0] == "registry" and "discover" in self.pledges):
            raise Fs9Error(errno.EACCES, f"agent {self.agent} did not pledge 'read' "
                                         f"({PLEDGES['read']})")

    def read_only_vault(self, above=()) -> list[tuple[str, ...]]:
        """The vault subtrees unveiled read-only, with nothing else unveiled or owned
        inside or around them: its sandbox binds them read-only from disk (reads at
        native speed; a write is EROFS). What it may write, or must be refused with a
        reason (someone else's subtree unveiled rw), stays with fs9; so does a subtree
        that holds or lies in one of `above` (the subtrees labelled above its clearance,
        from the kernel: kernel/labels.py), since only fs9 filters reads by label."""
        if "read" not in self.pledges:
            return []
        roots = list(self._roots())
        return [prefix for prefix, mode in self.unveiled
                if prefix[:1] == ("vault",) and mode == "r"
                and not any(other != prefix and (other[:len(prefix)] == prefix
                                                 or prefix[:len(other)] == other)
                            for other in roots)
                and not any(sub[:len(prefix)] == prefix or prefix[:len(sub)] == sub
                            for sub in above)]

    def owned_vault(self) -> list[tuple[str, ...]]:
        """The vault subtrees it owns and may write, with nothing unveiled inside or
        around them: its sandbox binds them read-write from disk (what it owns is all
        its own: no other owner inside, see Kernel.check_claims)."""
        if "write" not in self.pledges or "read" not in self.pledges:
            return []
        return [prefix for prefix in self.owns
                if not any(other[:len(prefix)] == prefix or prefix[:len(other)] == other
                           for other, _ in self.unveiled)]

    def render(self) -> str:
        """The effective view as text: one `MODE PATH` line per visible root."""
        lines = [f"pledge {' '.join(sorted(self.pledges))}",
                 f"rw agents/{self.agent}"]
        if "discover" in self.pledges:
            lines.append("r registry")
        lines += [f"{mode} {'/'.join(path)}" for path, mode in sorted(self.unveiled)]
        lines += [f"owns {'/'.join(path)}" for path in self.owns]
        return "\n".join(lines) + "\n"


def parse(agent: str, manifest: dict) -> View:
    """The view a manifest declares; Fs9Error(EINVAL) naming the bad entry."""
    pledge = manifest.get("pledge", list(DEFAULT_PLEDGE))
    if not isinstance(pledge, list) or not all(isinstance(p, str) for p in pledge):
        raise Fs9Error(errno.EINVAL, "pledge must be a list of strings")
    unknown = sorted(set(pledge) - set(PLEDGES))
    if unknown:
        raise Fs9Error(errno.EINVAL, f"pledge: unknown promise(s) {', '.join(unknown)} "
                                     f"(known: {', '.join(PLEDGES)})")
    unveil = manifest.get("unveil", {})
    if not isinstance(unveil, dict):
        raise Fs9Error(errno.EINVAL, 'unveil must be a table of "PATH" = "r" | "w" | "rw"')
    model = drivers.of(manifest).model(manifest)
    if model is not None:  # a driver's program talks to its model: that much is unveiled
        unveil = {f"models/{model}": "rw", **unveil}
    entries = []
    for raw, mode in unveil.items():
        parts = tuple(raw.strip("/").split("/")) if raw.strip("/") else ()
        if not parts or any(p in ("", ".", "..") for p in parts):
            raise Fs9Error(errno.EINVAL, f"unveil: {raw!r} is not a path of the namespace "
                                         "(relative, like vault/docs, no . or ..)")
        if mode not in MODES:
            raise Fs9Error(errno.EINVAL, f"unveil: {raw!r} = {mode!r}; expected r, w or rw")
        if len(parts) >= 3 and parts[0] == "agents" and parts[2] == "view":
            raise Fs9Error(errno.EINVAL, f"unveil: {raw!r}: another agent's view cannot "
                                         "be unveiled")
        entries.append((parts, mode))
    entries.sort(key=lambda e: -len(e[0]))
    owns = manifest.get("owns", [])
    if not isinstance(owns, list) or not all(isinstance(p, str) for p in owns):
        raise Fs9Error(errno.EINVAL, "owns must be a list of vault paths")
    owned = []
    for raw in owns:
        parts = tuple(raw.strip("/").split("/"))
        if len(parts) < 2 or parts[0] != "vault" or any(p in ("", ".", "..") for p in parts):
            raise Fs9Error(errno.EINVAL, f"owns: {raw!r} is not a vault subtree "
                                         "(like vault/docs)")
        owned.append(parts)
    return View(agent, frozenset(pledge), tuple(entries), tuple(owned))
