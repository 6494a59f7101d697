"""Names every layer shares: what a name may be, the operator's name, and where a
path enters an agent's view."""
import re

# agents, definitions, topics, models, memory notes: one file name each
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
OPERATOR = "operator"  # the person at the mount: a mailbox, a budget, never an agent


def split_view(path: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """(the agent whose view path is in, the path inside it); (None, path): the
    operator's. `agents/NAME/view/P` is P as agent NAME sees it."""
    if len(path) >= 3 and path[0] == "agents" and path[2] == "view":
        return path[1], path[3:]
    return None, path
