"""Finished tasks: the latest TASKS_KEPT of each agent in memory, older ones read from
the log when asked for.

A task that reached a final state (done, failed, cancelled) changes no more, so memory
need not follow every task an agent ever ran (a Task with its Changes is ~300 B: a
million finished tasks were most of a big mount's RSS). Each agent keeps its latest
TASKS_KEPT finished tasks, in the order they ended; past that the oldest is retired:
gone from `Kernel.tasks` and the agent's `tasks` (so `tasks/` lists the latest), its
state tallies unchanged (`status`, metrics count every task), its events dropped from
the next snapshot's replay (snapshot.py). `tasks/ID` of a retired task is rebuilt from
its events, read by task id (an index of the log: log.py), on each lookup. Finished
tasks of killed agents share one such tail (`Kernel.orphans`).

Retiring happens in `_end`, which replay runs too: a full replay and a live server
retire the same tasks, so the state a snapshot holds is the state a replay rebuilds.
"""
from .log import Event
from .task import FINAL, MOVES, Task

TASKS_KEPT = 1000  # finished tasks of one agent kept in memory (and listed in tasks/)
TASK_KINDS = frozenset({"task_queued", *MOVES})  # the events of a task's lifecycle


def ended(k, task: Task) -> None:
    """task reached a final state (Kernel._end): it joins its agent's finished tasks
    (or the orphans', its agent killed), and the oldest past TASKS_KEPT retires."""
    if not task.final:
        return
    agent = k.agents.get(task.agent)
    mine = agent is not None and task.id > agent.spawn_seq  # (a name may be spawned again)
    finished = agent.finished if mine else k.orphans
    finished.append(task)
    while len(finished) > TASKS_KEPT:
        retire(k, finished.popleft())


def killed(k, agent) -> None:
    """agent was killed: its finished tasks join the orphans' tail."""
    for task in agent.finished:
        k.orphans.append(task)
    agent.finished.clear()
    while len(k.orphans) > TASKS_KEPT:
        retire(k, k.orphans.popleft())


def retire(k, task: Task) -> None:
    if k.tasks.get(task.id) is task:
        del k.tasks[task.id]
    agent = k.agents.get(task.agent)
    if agent is not None and task.id > agent.spawn_seq:
        try:
            agent.tasks.remove(task)  # (the oldest finished: near the front)
        except ValueError:
            pass
    k.log.task_ns.pop(task.id, None)
    k.plan.drop(task.seqs)  # its whole effect is the tallies a snapshot holds


def of(k, agent, tid: int) -> Task | None:
    """Agent's task tid, in memory or retired (None: not this agent's). A killed agent's
    finished tasks stay in memory under its name: never the next holder's, whichever
    node asks (face/tree.py, cluster/answers.py)."""
    task = k.tasks.get(tid)
    if task is None:  # a finished task retired from memory: rebuilt from its events
        return old(k, agent, tid)
    return task if task.agent == agent.name and task.id > agent.spawn_seq else None


def old(k, agent, tid: int) -> Task | None:
    """Agent's retired task tid, rebuilt from its events (None: no such finished task
    of this agent). The same moves `Kernel.apply` makes, without tallies or waiters;
    a row replay would set aside is left out here too."""
    if tid <= agent.spawn_seq or tid > k.log.last_seq or tid in k.tasks:
        return None
    task = None
    for e in k.log.task_events(tid, TASK_KINDS):
        if task is None:
            if e.kind != "task_queued" or e.seq != tid or e.agent != agent.name:
                return None
            d = e.data
            task = Task(tid, e.agent, e.corr, daemon=bool(d.get("daemon", False)),
                        queued_ts=e.ts, reply_to=str(d.get("reply_to", "")),
                        request=str(d.get("request", "")))
            continue
        state = MOVES.get(e.kind)
        if state is None or task.refusal(state):
            continue
        _move(task, state, e)
    return task if task is not None and task.state in FINAL else None


def _move(task: Task, state: str, e: Event) -> None:
    """What lifecycle.py's appliers set on a move (kept in step with them: the test of
    tests/test_replay.py compares a rebuilt task with the one that was in memory)."""
    task.move(state)
    d = e.data
    if state == "running":
        task.attempt, task.started_ts, task.exit, task.reason = d.get("attempt", 0), e.ts, \
            None, ""
    elif state in ("done", "failed"):
        task.exit, task.reason, task.ended_ts = d.get("exit"), \
            (str(d.get("reason", "")) if state == "failed" else ""), e.ts
    elif state in ("cancelled", "interrupted"):
        task.exit, task.reason, task.ended_ts = None, str(d.get("reason", "")), e.ts
