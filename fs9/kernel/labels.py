"""Labels on the namespace: the classification a path carries, and who may read it.

Classification is information flow (bus/message.py): an agent cleared below a label
does not read what carries it. The one rule for every path of the namespace:
  - a vault path inside a subtree an agent owns carries its owner's clearance;
  - `agents/X/...` (X's memory, tasks, mail, out, err, status...) carries X's;
  - `topics/T` carries T's label (the highest clearance that published on it);
  - nothing else carries a label: an unowned vault path, `ctl`, `events`, `log`, the
    registry, search and models are the operator's, who decides who reads them by
    unveiling them (a manifest is the operator's: an agent cannot widen one).
It is checked where an agent could read: at spawn (an unveil that reads anything
labelled above the agent is refused; an ancestor such as `vault` is not, its labelled
subtrees are filtered at each read), at every read through the face (access.py), in
search (`Cleared`), and for what a sandbox binds from disk, which fs9 cannot filter
(`above` keeps it out of the native binds; `check_claim` refuses an owner that would
appear inside a bind already made). Pure functions over the kernel's agents and topics.
"""
import errno
from dataclasses import dataclass

from ..errors import Fs9Error
from .bus.message import clearance_allows
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kernel import Kernel

Path = tuple[str, ...]


@dataclass(frozen=True)
class Label:
    level: str  # a classification (bus/message.py)
    holder: Path  # what carries it: the owned subtree, agents/X, topics/T
    agent: str = ""  # whose it is (the owner, X), for the reason in words


def label_of(kernel: "Kernel", path: Path) -> Label | None:
    """The label path carries (see the module doc); None: none, the operator's."""
    if path[:1] == ("vault",):
        owner = kernel.owner_of(path)
        if owner is None:
            return None
        agent = kernel.agents[owner]
        subtree = next(p for p in agent.view.owns if path[:len(p)] == p)
        return Label(agent.manifest["clearance"], subtree, owner)
    if path[:1] == ("agents",) and len(path) >= 2:
        agent = kernel.agents.get(path[1])
        return None if agent is None else Label(agent.manifest["clearance"], path[:2],
                                                agent.name)
    if path[:1] == ("topics",) and len(path) == 2:
        topic = kernel.bus.topics.get(path[1])
        return None if topic is None else Label(topic.label, path)
    return None


def refusal(kernel: "Kernel", label: Label, path: Path, reader: str, clearance: str,
            by: str | None = None) -> Fs9Error:
    """EACCES for reader (cleared `clearance`) and path labelled above it, in words
    that name only agents the one told (`by`, None: the operator) knows of."""
    if path[:1] == ("topics",):
        what = f"topic {path[1]} is {label.level}"
    elif path[:1] == ("agents",) and by is not None and not kernel.knows(by, label.agent):
        what = f"another agent's directory is {label.level}"
    elif path[:1] == ("agents",):
        what = f"{'/'.join(path)} is {label.level} (agent {label.agent}'s)"
    else:
        what = f"{'/'.join(path)} is {label.level} ({'/'.join(label.holder)} is owned " \
               f"by {named(kernel, by, label.agent)})"
    return Fs9Error(errno.EACCES, f"{what}; {reader} is cleared for {clearance}")


def named(kernel: "Kernel", by: str | None, agent: str) -> str:
    """An agent as said to `by`: by name if by knows of it, else without one (a hidden
    agent is not told apart from no agent at all)."""
    return f"agent {agent}" if by is None or kernel.knows(by, agent) else \
        "an agent outside your view"


def check_read(kernel: "Kernel", reader, path: Path) -> None:
    """Fs9Error(EACCES) unless reader (an Agent) is cleared for path's label (its own
    directory is always its own)."""
    if path[:2] == ("agents", reader.name):
        return
    label = label_of(kernel, path)
    clearance = reader.manifest["clearance"]
    if label is not None and not clearance_allows(clearance, label.level):
        raise refusal(kernel, label, path, reader.name, clearance, reader.name)


def above(kernel: "Kernel", clearance: str) -> tuple[Path, ...]:
    """The vault subtrees owned by agents cleared above `clearance`."""
    return tuple(sorted(prefix for prefix, owner in kernel.owners.items()  # (not every agent)
                        if not clearance_allows(clearance,
                                                kernel.agents[owner].manifest["clearance"])))


def check_unveils(kernel: "Kernel", name: str, view, clearance: str,
                  by: str | None = None) -> None:
    """Spawn: Fs9Error(EACCES) if view (agent name's, cleared `clearance`) unveils for
    reading anything labelled above it: a path inside (or equal to) a subtree owned by
    an agent cleared higher, another agent's directory or part of it, a topic. An
    ancestor (`vault`, `agents`, `topics`) is allowed: what it holds is filtered at
    each read."""
    for prefix, mode in view.unveiled:
        if "r" not in mode or prefix[:2] == ("agents", name):
            continue
        label = label_of(kernel, prefix)
        if label is not None and not clearance_allows(clearance, label.level):
            e = refusal(kernel, label, prefix, name, clearance, by)
            raise Fs9Error(errno.EACCES, f"agent {name} may not unveil for reading what "
                                         f"its clearance does not allow: {e.text}")


def check_claim(kernel: "Kernel", name: str, owns, clearance: str,
                by: str | None = None) -> None:
    """Spawn of an owner (agent name, cleared `clearance`, claiming `owns`): Fs9Error
    (EBUSY) if a running sandbox of an agent cleared lower binds from disk a vault
    subtree holding or inside a claimed one. Its programs read that folder natively,
    past fs9's label checks, so the claim would label what they already read. (Its
    binds are made when its sandbox starts, and last until the agent is killed and
    every process of that sandbox has ended.)"""
    for agent, subtrees in kernel.native_reads.items():
        if clearance_allows(agent.manifest["clearance"], clearance):
            continue
        for claim in owns:
            for sub in subtrees:
                if claim[:len(sub)] == sub or sub[:len(claim)] == claim:
                    raise Fs9Error(errno.EBUSY, (
                        f"agent {name} ({clearance}) may not own {'/'.join(claim)} now: "
                        f"{named(kernel, by, agent.name)}, cleared for "
                        f"{agent.manifest['clearance']}, reads {'/'.join(sub)} from disk "
                        "(its sandbox binds it), past fs9's label checks; kill that agent "
                        "first, or start the owner before it"))


@dataclass(frozen=True)
class Cleared:
    """A view as it reads the vault's contents: less the subtrees owned by agents
    cleared above it (search answers from the files this shows: none above its
    clearance shapes a hit, a count or a snippet)."""
    view: object  # the agent's View (agents/view.py)
    above: tuple[Path, ...]

    @property
    def agent(self) -> str:
        return self.view.agent

    def access(self, path: Path) -> str | None:
        if any(path[:len(sub)] == sub for sub in self.above):
            return None
        return self.view.access(path)


def cleared_view(kernel: "Kernel", agent) -> Cleared:
    return Cleared(agent.view, above(kernel, agent.manifest["clearance"]))
