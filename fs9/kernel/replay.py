"""A mount's rebuilding of the state: replay the log (from its snapshot when one checks
out: snapshot.py), then recover what a stopped server left running.

An event replay cannot take is set aside (kept in the log, listed in its set-aside
store, said in the server's log and, until the operator dismisses it, in a
`replay_set_aside` event at every mount and the root `err`): everything else comes back.
Tasks that were running when the server died are marked interrupted, then re-queued
(restart permanent/transient) or failed (temporary, daemon runs).
"""
import logging

from . import snapshot
from .lifecycle import Unappliable

SET_ASIDE_REPORTED = 100  # set-aside events reported one by one at mount (the rest counted)
log = logging.getLogger("fs9.kernel")


def replay(k) -> None:
    """Rebuild k's state from its log (k.full_replay: from event 1, snapshot or not)."""
    aside: dict[int, tuple[str, str]] = {}
    damaged: dict[int, tuple[str, str]] = {}  # rows that do not read as events
    k._replaying = True
    snap = None if k.full_replay else snapshot.load(k)
    if snap is not None:  # its plan's events, then its residue, then the rest
        apply_all(k, k.log.replay_seqs(snap.kept, damaged), aside)
        snapshot.restore(k, snap)
        k.snapshot_seq = snap.seq
    apply_all(k, k.log.replay(damaged, after=k.snapshot_seq), aside)
    for seq in damaged:  # kept in the plan like events set aside: reported again
        k.plan.keep(seq)
    aside.update(damaged)
    k._replaying = False
    k.log.keep_aside(aside)
    pending = k.log.set_aside()
    for r in pending[:SET_ASIDE_REPORTED]:
        k.log.append("replay_set_aside", agent=r.agent, task=r.task, event=r.seq,
                     event_kind=r.kind, reason=r.reason, found=r.found)
    if len(pending) > SET_ASIDE_REPORTED:
        k.log.append("replay_set_aside", not_shown=len(pending) - SET_ASIDE_REPORTED,
                     reason="more events set aside than reported one by one "
                            "(the root err lists them all)")


def apply_all(k, events, aside: dict[int, tuple[str, str]]) -> None:
    for event, blob in events:
        k._fresh_blob = (event.seq, blob)  # (None: read when applied)
        try:
            k.apply(event)
        except Exception as e:  # a defect's event (Unappliable) or a damaged one
            reason = str(e) if isinstance(e, Unappliable) else f"{type(e).__name__}: {e}"
            aside[event.seq] = (event.kind, reason)
            log.warning("replay set aside event %d (%s): %s", event.seq, event.kind,
                        reason, exc_info=not isinstance(e, Unappliable))


def recover(k) -> None:
    """Tasks running when the server stopped: interrupted, then re-queued or failed."""
    for task in [t for t in k.tasks.values() if t.state == "running"]:
        ids = dict(agent=task.agent, task=task.id, corr=task.corr)
        k.record("task_interrupted", reason="fs9 stopped while the task ran", **ids)
        agent = k.agents.get(task.agent)
        if task.daemon or agent is None or agent.manifest["restart"] == "temporary":
            k.record("task_failed", reason="interrupted; not re-queued "
                     "(restart = temporary, a daemon run, or the agent is gone)", **ids)
        else:
            k.record("task_requeued", reason="interrupted; re-queued", **ids)
