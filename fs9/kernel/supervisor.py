"""Restart decisions, in OTP's words (supervisor.erl). Pure functions: no kernel, no
I/O, the clock an argument; kernel/supervision.py acts on what they decide.

A child's restart type:
restart = permanent: the child is always restarted.
restart = transient: restarted only if it terminates abnormally (exit status != 0).
restart = temporary: never restarted (not even when a sibling's death terminates it).
Intensity: if more than max_restarts restarts occur within within_s seconds (OTP's
intensity and period), the supervisor gives up: it terminates its children and itself
fails, and its own supervisor decides (up to the kernel, which tells the operator).
Strategies: one_for_one restarts the child that died; one_for_all terminates every
other child and restarts them all; rest_for_one does so for the child that died and
the children started after it.
"""
import math
from dataclasses import dataclass, field

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
SHUTDOWN_DEFAULT_S = 2.0  # SIGTERM to SIGKILL (drivers/exec.py's GRACE_S)
SHUTDOWN_MAX_S = 3600.0
MAX_DEPTH = 8  # supervisors nested deeper are refused (a definition that contains itself)


def should_restart(policy: str, exit_status: int) -> bool:
    if policy == "permanent":
        return True
    if policy == "transient":
        return exit_status != 0
    return False


@dataclass
class RestartWindow:
    max_restarts: int
    within_s: float
    stamps: list[float] = field(default_factory=list)  # restarts inside the window

    def add(self, now: float) -> bool:
        """Record a restart at `now`; False means the intensity is exceeded: give up."""
        self.stamps = [t for t in self.stamps if now - t < self.within_s] + [now]
        return len(self.stamps) <= self.max_restarts


@dataclass(frozen=True)
class Child:
    """One entry of a supervisor's `children`: the agent's name, the definition it
    runs, and its shutdown: seconds from SIGTERM to SIGKILL (0: OTP's brutal_kill)."""
    name: str
    definition: str
    shutdown_s: float = SHUTDOWN_DEFAULT_S


def children(spec) -> list[Child]:
    """The manifest's `children` (a list of names, or of tables with name, def and
    shutdown) as Child entries, in start order; ValueError saying what is wrong."""
    if not isinstance(spec, list):
        raise ValueError("children must be a list of names or of tables (name, def, shutdown)")
    out: list[Child] = []
    for entry in spec:
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"children: {entry!r} is not a name or a table with a name")
        unknown = sorted(set(entry) - {"name", "def", "shutdown"})
        if unknown:
            raise ValueError(f"children: unknown key(s) {', '.join(unknown)} "
                             "(known: name, def, shutdown)")
        definition = entry.get("def", entry["name"])
        if not isinstance(definition, str):
            raise ValueError(f"children: def of {entry['name']!r} must be a string")
        out.append(Child(entry["name"], definition, shutdown_s(entry.get("shutdown"))))
    names = [c.name for c in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"children: {twice[0]!r} is named twice")
    return out


def shutdown_s(value) -> float:
    """A child's shutdown: "brutal_kill" (0), a number of seconds, or the default."""
    if value is None:
        return SHUTDOWN_DEFAULT_S
    if value == "brutal_kill":
        return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value) and 0 < value <= SHUTDOWN_MAX_S:
        return float(value)
    raise ValueError(f"children: shutdown = {value!r}; expected \"brutal_kill\" or seconds "
                     f"(0 < N <= {SHUTDOWN_MAX_S:g})")


def plan(strategy: str, kids: list[tuple[str, str]], died: str) -> tuple[list[str], list[str]]:
    """What a supervisor does when child `died` is to be restarted; kids: (name, restart
    type) in start order. Returns (terminate, start): the other children to terminate,
    in reverse start order, and the children to start again, in start order. A
    temporary sibling is terminated and not started again."""
    names = [name for name, _ in kids]
    i = names.index(died)
    affected = {"one_for_one": kids[i:i + 1], "one_for_all": kids,
                "rest_for_one": kids[i:]}[strategy]
    terminate = [name for name, _ in reversed(affected) if name != died]
    start = [name for name, kind in affected if name == died or kind != "temporary"]
    return terminate, start
