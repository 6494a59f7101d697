"""What `fs9 top` shows, read from a mount's files into plain data, and what its keys write.

Only the mount's files are used (status, tree, models/, approvals/, events, agents/NAME/ctl),
so it works on any fs9 the operator can reach, local or remote. A file that vanishes between
`ls` and `read` (an agent killed meanwhile) is skipped: the next refresh shows the new state.
The textual view is fs9/topapp.py.
"""
import json
import os
import select
import time
from dataclasses import dataclass, field
from pathlib import Path

# what the events pane keeps: a tail, not a history (log/audit is the history)
EVENT_LINES = 200


def read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def fields(text: str | None) -> dict[str, str]:
    """A status file's KEY=VALUE lines as a dict (empty when the file was gone)."""
    pairs = (line.split("=", 1) for line in (text or "").splitlines() if "=" in line)
    return {k: v for k, v in pairs}


@dataclass
class Agent:
    name: str
    state: str
    task: str       # the running task's id, or ""
    elapsed: str    # how long the running task has run ("1m05s"), or ""
    queued: str
    restarts: str
    tokens_today: str
    progress: str   # the running task's latest progress report
    reason: str


@dataclass
class Model:
    name: str
    state: str
    calls: str
    tokens: str     # in/out
    in_flight: str  # in flight / max concurrent
    breaker: str    # state and recent failures/threshold


@dataclass
class Approval:
    id: str
    agent: str
    action: str
    what: str
    deadline: str   # the time of day of the kernel's UTC deadline (it denies then)


@dataclass
class Snapshot:
    agents: list[Agent] = field(default_factory=list)
    tree: str = ""
    models: list[Model] = field(default_factory=list)
    usage: str = ""
    approvals: list[Approval] = field(default_factory=list)
    kernel: str = ""  # the root ctl's line: running or halted, counts


def agents(mnt: Path) -> list[Agent]:
    out = []
    for name in sorted(_ls(mnt / "agents")):
        s = fields(read(mnt / "agents" / name / "status"))
        if not s:
            continue
        state = s.get("state", "?")
        if s.get("breaker") in ("open", "half_open"):  # cut off (agents/breaker.py)
            state += f" (breaker {s['breaker']})"
        out.append(Agent(name, state, s.get("task", ""),
                         duration(s.get("task_elapsed", "")), s.get("queued", ""),
                         s.get("restarts", ""), s.get("tokens_today", ""),
                         s.get("task_progress", ""), s.get("reason", "")))
    return out


def duration(seconds: str) -> str:
    """A status's elapsed seconds ("65.2") as "1m05s"; "" when there is none (an fs9
    older than task timing says nothing)."""
    try:
        s = max(0, int(float(seconds)))
    except (ValueError, OverflowError):
        return ""
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def event_line(raw: str) -> str:
    """One event of the stream, short: `HH:MM:SS kind agent=A task=T key=value...`."""
    try:
        e = json.loads(raw)
    except ValueError:
        e = None
    if not isinstance(e, dict):
        e = {"kind": "unparsed", "line": raw}
    ts = e.pop("ts", None)
    clock = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, (int, float)) else "?"
    e.pop("seq", None)
    e.pop("corr", None)
    kind = e.pop("kind", "?")
    line = " ".join([clock, str(kind), *(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                                         for k, v in e.items())])
    # an agent's text (a progress report, a topic) reaches the operator's terminal: no
    # control character of it does
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in line)


def models(mnt: Path) -> list[Model]:
    out = []
    for name in sorted(_ls(mnt / "models")):
        info = fields(read(mnt / "models" / name / "info"))
        if not info:  # `usage`, or a model removed meanwhile
            continue
        breaker = info.get("breaker", "")
        if breaker and breaker != "none":
            breaker += f" {info.get('breaker_failures', '')}"
        out.append(Model(name, info.get("state", "?"), info.get("calls", ""),
                         f"{info.get('tokens_in', '')}/{info.get('tokens_out', '')}",
                         f"{info.get('in_flight', '')}/{info.get('max_concurrent', '')}",
                         breaker))
    return out


def approvals(mnt: Path) -> list[Approval]:
    """The requests still waiting for the operator's answer, oldest id first."""
    out = []
    for aid in sorted(_ls(mnt / "approvals"), key=lambda a: (len(a), a)):
        s = fields(read(mnt / "approvals" / aid / "status"))
        if s.get("state") == "pending":
            out.append(Approval(aid, s.get("agent", ""), s.get("action", ""),
                                s.get("what", ""), s.get("deadline", "").partition("T")[2]))
    return out


def snapshot(mnt: Path) -> Snapshot:
    usage = read(mnt / "models" / "usage") or ""
    return Snapshot(agents(mnt), read(mnt / "tree") or "", models(mnt), usage,
                    approvals(mnt), (read(mnt / "ctl") or "").strip())


def command(mnt: Path, agent: str, verb: str) -> str | None:
    """Write verb (stop, start, restart, reset: its breaker) to the agent's ctl: None, or why it was refused."""
    return _write(mnt / "agents" / agent / "ctl", verb)


def answer(mnt: Path, approval: str, verb: str) -> str | None:
    """Write verb (approve, deny) to approvals/ID/ctl: None, or why it was refused."""
    return _write(mnt / "approvals" / approval / "ctl", f"{verb} from fs9 top")


class EventTail:
    """The `events` stream, read without waiting: the latest EVENT_LINES lines since open."""

    def __init__(self, mnt: Path) -> None:
        self.fd = os.open(mnt / "events", os.O_RDONLY | os.O_NONBLOCK)
        self.partial = b""

    def new_lines(self) -> list[str]:
        """The complete lines that arrived since the last call (at most EVENT_LINES)."""
        while select.select([self.fd], [], [], 0)[0]:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.partial += chunk
        *lines, self.partial = self.partial.split(b"\n")
        return [line.decode(errors="replace") for line in lines[-EVENT_LINES:]]

    def close(self) -> None:
        os.close(self.fd)


def _ls(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _write(path: Path, line: str) -> str | None:
    try:
        with open(path, "w") as f:
            f.write(line + "\n")
    except OSError as e:
        return f"{path.parent.name}: {e.strerror}"
    return None
