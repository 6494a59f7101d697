"""When each file of the namespace last changed: the mtime (and ctime) stat(2) shows.

A file's time is a time the kernel already keeps, read as it is (no work per stat
beyond it): a task folder and its `input`, when the task was queued; a stream, its last
write (a task's, once the task ended, no later than its end); a mailbox and its `next`,
its last delivery or removal; a message, its `date`; a topic, its last event; anything
else about an agent or a task, the latest event about it (EventLog.agent_ns, task_ns);
the rest, the latest event of all. Where the kernel keeps nothing finer the time is
later than the change, never earlier, so `find -newer` and `make` may do more, never
miss one. `metrics` changes with every request: its time is now. atime is the mtime
(fs9 keeps no read times, as a noatime mount).
"""
import time
from datetime import datetime
from typing import Callable


def _ns(ts: float | None) -> int:
    return int(ts * 1e9) if ts else 0


def task_changed(k, task) -> int:
    """The latest event about task, else (logged before this mount) its own times."""
    at = k.log.task_ns.get(task.id)
    if at is None:
        at = _ns(max(task.queued_ts, task.started_ts or 0, task.ended_ts or 0))
    return at


def agent_changed(k, agent) -> int:
    return k.log.agent_ns.get(agent.name, k.log.opened_ns)


def stream_changed(k, task, fd: int) -> int | None:
    """A task's out (fd 1) or err (2): its last write; None: no task."""
    if task is None:
        return None
    stream = task.out if fd == 1 else task.err
    if task.final and task.ended_ts:  # nothing is written after the end
        ended = _ns(task.ended_ts)
        return ended if stream is None else min(ended, stream.changes.at_ns)
    return stream.changes.at_ns if stream is not None else task_changed(k, task)


def message_changed(msg) -> int | None:
    """When the message was sent: its `date` header, which the kernel stamps."""
    try:
        return int(datetime.fromisoformat(msg.headers["date"].replace("Z", "+00:00"))
                   .timestamp() * 1e9)
    except (KeyError, ValueError, AttributeError):
        return None


# a bound object -> its time (the most specific bound one answers: a path's last)
BY_OBJECT: dict[str, Callable] = {
    "task": task_changed,
    "agent": agent_changed,
    "msg": lambda k, msg: message_changed(msg),
    "omsg": lambda k, msg: message_changed(msg),
    "dead": lambda k, msg: message_changed(msg),
    "odead": lambda k, msg: message_changed(msg),
    "topic": lambda k, topic: topic.changes.at_ns,
}

# rows whose time is not their object's (tree.ROWS' patterns)
BY_ROW: dict[str, Callable] = {
    "agents/{agent}/tasks/{task}": lambda k, b: _ns(b["task"].queued_ts),
    "agents/{agent}/tasks/{task}/input": lambda k, b: _ns(b["task"].queued_ts),
    "agents/{agent}/tasks/{task}/out": lambda k, b: stream_changed(k, b["task"], 1),
    "agents/{agent}/tasks/{task}/err": lambda k, b: stream_changed(k, b["task"], 2),
    "agents/{agent}/out": lambda k, b: stream_changed(k, b["agent"].shown_task(), 1),
    "agents/{agent}/mail": lambda k, b: b["agent"].mailbox.changes.at_ns,
    "agents/{agent}/mail/next": lambda k, b: b["agent"].mailbox.changes.at_ns,
    "mail": lambda k, b: k.bus.operator.mailbox.changes.at_ns,
    "mail/next": lambda k, b: k.bus.operator.mailbox.changes.at_ns,
    "metrics": lambda k, b: time.time_ns(),
}


def of_row(pattern: str) -> Callable[..., int]:
    """(kernel, the bound objects) -> the time of the file row `pattern` serves, chosen
    once per row: its own (BY_ROW), else its most specific object's (the last bound),
    else the latest event's."""
    own = BY_ROW.get(pattern)
    names = [p[1:-1] for p in pattern.split("/") if p[1:-1] in BY_OBJECT]
    var = names[-1] if names else None
    by = BY_OBJECT.get(var)

    def changed(k, bound: dict) -> int:
        at = own(k, bound) if own is not None else None
        if at is None and by is not None:
            at = by(k, bound[var])
        return at or k.log.last_ns
    return changed
