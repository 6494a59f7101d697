"""Retention (kernel/retention.py): only retired tasks' output is cut, after its copy is
archived; every event stays, so a replay and a snapshot give the same state after."""
import hashlib
import json
import os
import random
import sqlite3
import time

import pytest
import trio

from fs9.errors import Fs9Error
from fs9.kernel import event_retention, finished, retention, snapshot
from fs9.kernel import state as states
from fs9.kernel.kernel import Kernel

from test_replay import _kernel, _picture, _work


def _run(k, agent, text: bytes, end: str = "task_done"):
    task = k.submit(agent, text)
    ids = dict(agent=agent.name, task=task.id, corr=task.corr)
    k.record("task_started", attempt=1, **ids)
    k.log.add_chunk(task.id, 1, 1, b"out of " + text)
    k.log.add_chunk(task.id, 1, 2, b"err of " + text)
    if end:
        k.record(end, exit=0, **ids)
    return task


async def test_only_retired_tasks_output_is_cut_archived_and_said(tmp_path, monkeypatch):
    monkeypatch.setattr(finished, "TASKS_KEPT", 3)
    k = _kernel(tmp_path)
    k.ctl(b"spawn w cmd=cat unconfined=true\nspawn idle cmd=cat unconfined=true")
    w, idle = k.agents["w"], k.agents["idle"]
    idle.stop()
    done = [_run(k, w, b"t%d\n" % i, "task_done" if i % 2 else "task_failed") for i in range(10)]
    running = _run(k, w, b"still\n", end="")
    queued = k.submit(idle, b"waits\n")
    retired = [t for t in done if t.id not in k.tasks]
    assert len(retired) == 7 and running.id in k.tasks and queued.id in k.tasks
    statuses = {t.id: t.status() for t in done}
    snapshot.write_now(k)
    before = _picture(k)

    policy = retention.Policy(outputs_days=0, archive=str(tmp_path / "archive"))
    assert await retention.cut_outputs(k, policy, now=time.time() + 1) == 7
    for t in retired:  # output gone; input, events and status stay
        assert k.log.chunks(t.id, 1, 1) == k.log.chunks(t.id, 1, 2) == b""
        assert k.log.blob(t.id).startswith(b"t")
        assert finished.old(k, w, t.id).status() == statuses[t.id]
        assert [e.kind for e in k.log.trace(t.corr)][:2] == ["task_queued", "task_started"]
    for t in [*[t for t in done if t not in retired], running]:  # never live work's, nor listed
        assert k.log.chunks(t.id, 1, 1).startswith(b"out of ")
    (said,) = [e for e in k.log.events_after(0, 10_000) if e.kind == "outputs_retired"]
    assert said.data["tasks"] == 7 and said.data["first"] == retired[0].id
    assert said.data["last"] == retired[-1].id and said.data["bytes"] > 0
    path = said.data["archive"]
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == said.data["sha256"]
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT task, fd, data FROM chunks ORDER BY task, fd").fetchall()
    finally:
        db.close()
    assert rows == [(t.id, fd, (b"out of " if fd == 1 else b"err of ") + k.log.blob(t.id))
                    for t in retired for fd in (1, 2)]
    assert sum(len(r[2]) for r in rows) == said.data["bytes"]
    assert await retention.cut_outputs(k, policy, now=time.time() + 1) == 0  # nothing more
    k.log.close()

    # the state is the same, from the snapshot and from event 1
    k2 = _kernel(tmp_path)
    k2._replay()
    assert k2.snapshot_seq > 0 and _picture(k2) == before
    k2.log.close()
    k3 = _kernel(tmp_path)
    k3.full_replay = True
    k3._replay()
    assert _picture(k3) == before
    k3.log.close()


async def test_no_policy_keeps_everything_and_a_bad_one_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    assert retention.Policy.load(str(state)) == retention.Policy()
    for text in ("outputs_days = -1\n", "outputs_days = 'x'\n", "archive = 'rel'\n",
                 "events_days = true\n", "events_days = 40000\n",
                 "other = 1\n", "not toml ["):
        (state / "retention.toml").write_text(text)
        with pytest.raises(Fs9Error):
            retention.Policy.load(str(state))
    (state / "retention.toml").write_text("outputs_days = 7\narchive = '/srv/a'\n")
    assert retention.Policy.load(str(state)) == retention.Policy(7.0, "/srv/a")


# --- retention of events (kernel/event_retention.py) -------------------------------------

def _rows(state, table: str = "events") -> dict:
    db = sqlite3.connect(state / "log.sqlite")
    try:
        return {r[0]: r for r in db.execute(f"SELECT * FROM {table} ORDER BY seq")}
    finally:
        db.close()


def _same(a: dict, b: dict) -> bool:
    """Two pictures alike but for the count of events_retired applied."""
    def strip(p):
        return {**p, "applied": {k: n for k, n in p["applied"].items() if k != "events_retired"}}
    return strip(a) == strip(b)


def _live_work(k):
    """A queued task, a running one with a progress record, pending mail (one carrying
    a retired task's correlation id on): what the cut must leave whole."""
    k.ctl(b"spawn lw cmd=cat unconfined=true\nspawn held cmd=cat unconfined=true")
    k.agents["held"].stop()
    queued = k.submit(k.agents["held"], b"waits\n")
    running = _run(k, k.agents["lw"], b"runs\n", end="")
    k.log.append("task_progress", agent="lw", task=running.id, corr=running.corr, note="x")
    mail = k.bus.send(k.agents["held"], b"pending\n")
    return [queued.corr, running.corr, mail.headers["correlation-id"]]


@pytest.mark.parametrize("seed,search_max", [(1, None), (2, None), (3, 37), (4, 13)])
async def test_an_events_cut_leaves_the_state_a_replay_and_a_snapshot_rebuild(
        tmp_path, monkeypatch, seed, search_max):
    """Random work, live work, a snapshot, more work; then every event older than the
    policy that the snapshot's plan leaves out is cut (archived first; with a small
    SEARCH_MAX, in many searches whose bounds split tasks and mail): the live state,
    a mount from the snapshot and a full replay are the state before the cut; live
    work's traces are whole; the archive holds exactly the cut events; fs9 check passes
    on the log and on the archive; nothing is set aside."""
    monkeypatch.setattr(finished, "TASKS_KEPT", 4)
    if search_max:
        monkeypatch.setattr(event_retention, "SEARCH_MAX", search_max)
    rng = random.Random(seed)
    k = _kernel(tmp_path)
    _work(k, rng, 300)
    live = _live_work(k)
    _work(k, rng, 200)
    snapshot.write_now(k)
    _work(k, rng, 100)
    state = tmp_path / "state"
    traces = {c: [e.seq for e in k.log.trace(c)] for c in live}
    assert all(traces.values())
    rows = _rows(state)
    before = _picture(k)

    policy = retention.Policy(events_days=0, archive=str(tmp_path / "archive"))
    cut, rounds = 0, 0
    while n := await event_retention.cut_events(k, policy, now=time.time() + 1):
        cut, rounds = cut + n, rounds + 1  # (a unit split by a search's bound: the next)
        assert rounds < 20
    assert cut > 100, cut
    assert _same(_picture(k), before)
    assert {c: [e.seq for e in k.log.trace(c)] for c in live} == traces
    left = _rows(state)
    gone = sorted(set(rows) - set(left))
    assert len(gone) == cut and set(left) - set(rows) == {s for s, r in left.items()
                                                          if r[2] == "events_retired"}
    said = [e for e in k.log.events_after(0, 100_000) if e.kind == "events_retired"]
    assert sum(e.data["count"] for e in said) == cut
    archived = {}
    for e in said:
        path = e.data["archive"]
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == e.data["sha256"]
        assert event_retention.check_archive(path)[0] == []
        db = sqlite3.connect(path)
        try:
            archived.update({r[0]: r for r in db.execute("SELECT * FROM events")})
        finally:
            db.close()
    assert archived == {s: rows[s] for s in gone}  # exactly the cut events, as they were
    assert states.check(str(state))[0] == []
    # more work, a new snapshot: the next cut takes the superseded records too
    _work(k, rng, 100)
    for i in range(70):
        k.log.append("mount", mountpoint="/m")
    snapshot.write_now(k)
    records = [e.seq for e in k.log.events_after(0, 100_000) if e.kind == "events_retired"]
    while await event_retention.cut_events(k, policy, now=time.time() + 1):
        pass
    left = [e.seq for e in k.log.events_after(0, 100_000) if e.kind == "events_retired"]
    assert not set(records[:-1]) & set(left), "a superseded record stayed"
    assert states.check(str(state))[0] == []
    traces = {c: [e.seq for e in k.log.trace(c)] for c in live}
    after = _picture(k)
    k.log.close()

    k2 = _kernel(tmp_path)
    k2._replay()
    assert k2.snapshot_seq > 0 and _picture(k2) == after and k2.log.set_aside() == []
    k2.log.close()
    k3 = Kernel(str(state), str(tmp_path / "agents"), full_replay=True)
    k3._replay()
    assert _picture(k3) == after and k3.log.set_aside() == []
    assert {c: [e.seq for e in k3.log.trace(c)] for c in live} == traces
    k3.log.close()


def test_fs9_check_finds_a_gap_no_events_retired_record_accounts_for(tmp_path):
    k = _kernel(tmp_path)
    k.ctl(b"spawn w cmd=cat unconfined=true\n")
    for i in range(5):
        k.log.append("mount", mountpoint="/m")
    k.log.close()
    db = sqlite3.connect(tmp_path / "state" / "log.sqlite")
    try:
        db.execute("DROP TRIGGER events_no_delete")
        db.execute("DELETE FROM events WHERE seq = 3")
        db.commit()
    finally:
        db.close()
    problems, _ = states.check(str(tmp_path / "state"))
    assert problems and "gaps" in problems[0]


async def test_a_bad_policy_file_cuts_no_event(tmp_path, monkeypatch):
    monkeypatch.setattr(finished, "TASKS_KEPT", 1)
    k = _kernel(tmp_path)
    k.ctl(b"spawn w cmd=cat unconfined=true")
    for i in range(6):
        _run(k, k.agents["w"], b"t%d\n" % i)
    snapshot.write_now(k)
    for i in range(70):
        k.log.append("mount", mountpoint="/m")
    (tmp_path / "state" / "retention.toml").write_text("events_days = -3\narchive = '/a'\n")
    count = len(_rows(tmp_path / "state"))
    await retention.keep(k)  # (returns at once: nothing to keep doing)
    (said,) = [e for e in k.log.events_after(0, 10_000) if e.kind == "retention_config_error"]
    assert "events_days" in said.data["reason"] and "nothing is cut" in said.data["reason"]
    assert len(_rows(tmp_path / "state")) == count + 1
    k.log.close()


CUTTER = r"""
import os, signal, sys, time
import trio
from fs9.kernel import event_retention, finished, retention
from fs9.kernel.kernel import Kernel
from fs9.kernel.log import EventLog
finished.TASKS_KEPT = 4
state, agents, archive, when = sys.argv[1:]
k = Kernel(state, agents)
k._replay()
if when == "during":  # the deletes made, the events_retired row not yet: SIGKILL
    store = EventLog._store
    def dying(self, seq, ts, kind, *args, **kw):
        if kind == "events_retired":
            os.kill(os.getpid(), signal.SIGKILL)
        return store(self, seq, ts, kind, *args, **kw)
    EventLog._store = dying
cut = trio.run(event_retention.cut_events, k, retention.Policy(events_days=0, archive=archive),
               time.time() + 1)
print(cut, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # (after the commit: no clean close)
"""


def test_kill_9_during_or_after_an_events_cut_loses_nothing(tmp_path, monkeypatch):
    """A server killed inside the cut's transaction keeps every event; one killed just
    after it keeps the cut whole: either way a mount from the snapshot and a full replay
    give the state before the cut (live work's tasks, mail and traces), nothing is set
    aside, and fs9 check passes."""
    import subprocess
    import sys
    monkeypatch.setattr(finished, "TASKS_KEPT", 4)
    k = _kernel(tmp_path)
    _work(k, random.Random(7), 300)
    live = _live_work(k)
    snapshot.write_now(k)
    _work(k, random.Random(8), 100)
    traces = {c: [e.seq for e in k.log.trace(c)] for c in live}
    before = _picture(k)
    state, count = tmp_path / "state", len(_rows(tmp_path / "state"))
    k.log.close()
    for when in ("during", "after"):
        child = subprocess.run(
            [sys.executable, "-c", CUTTER, str(state), str(tmp_path / "agents"),
             str(tmp_path / "archive"), when], capture_output=True, text=True, timeout=120)
        assert child.returncode == -9, child.stderr
        cut = int(child.stdout) if when == "after" else 0
        assert (cut > 100) == (when == "after")
        assert len(_rows(state)) == count - cut + (1 if cut else 0)
        for full in (False, True):
            again = Kernel(str(state), str(tmp_path / "agents"), full_replay=full)
            again._replay()
            assert _same(_picture(again), before), (when, full)
            assert again.log.set_aside() == [] and (again.snapshot_seq > 0) != full
            assert {c: [e.seq for e in again.log.trace(c)] for c in live} == traces
            again.log.close()
        assert states.check(str(state))[0] == []
    for path in (tmp_path / "archive").iterdir():
        assert event_retention.check_archive(str(path))[0] == []


def test_a_mount_after_an_events_cut_serves_what_was_there(tmp_path):
    """On a real mount, after a cut of events made by the kernel (its default 1,000
    finished tasks kept, so old ones retired): `fs9 mount --full-replay` and a mount
    from the snapshot both serve the tallies there were, the queued task and the
    pending mail, live work's trace whole; `fs9 check` passes on the state and on the
    archive; no handler hit a bug."""
    from conftest import Mount, fs9, fuse_unavailable
    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"cannot mount FUSE here: {reason}")
    m = Mount(tmp_path)
    k = Kernel(str(m.state), str(m.agents))
    k.ctl(b"spawn w cmd=cat unconfined=true\nspawn held cmd=cat unconfined=true")
    w, held = k.agents["w"], k.agents["held"]
    held.stop()
    for i in range(finished.TASKS_KEPT + 300):
        _run(k, w, b"t%d\n" % i, "task_done" if i % 4 else "task_failed")
    for i in range(50):
        msg = k.bus.send(w, b"m%d\n" % i)
        k.bus.ack(w, msg.name)
    w.stop()
    queued = k.submit(held, b"waits\n")
    mail = k.bus.send(held, b"pending\n")
    snapshot.write_now(k)
    for i in range(100):
        k.log.append("mount", mountpoint="/m")
    policy = retention.Policy(events_days=0, archive=str(tmp_path / "archive"))
    assert trio.run(event_retention.cut_events, k, policy, time.time() + 1) > 900
    line = {f: v for f, v in (w.split("=") for w in k.state_line().split())
            if f in ("agents", "queued", "running", "done", "failed")}
    trace = [e.seq for e in k.log.trace(queued.corr)]
    k.log.close()
    for extra in (("--full-replay",), ()):
        m.mount(*extra)
        try:
            served = dict(w.split("=") for w in m.read("ctl").split())
            assert {f: served[f] for f in line} == line, extra
            assert str(queued.id) in os.listdir(m.path / "agents/held/tasks")
            assert "state=queued" in m.read(f"agents/held/tasks/{queued.id}/status").split()
            assert len(m.read("agents/held/mail/" + mail.name)) > 0
            seen = [json.loads(x)["seq"] for x in m.read(f"log/trace/{queued.corr}").splitlines()]
            assert seen[:len(trace)] == trace
        finally:
            m.umount()
    assert fs9("check", str(m.state)).returncode == 0
    for path in (tmp_path / "archive").iterdir():
        r = fs9("check", str(path))
        assert r.returncode == 0 and "an archive of" in r.stdout, r.stderr
    assert not m.bugs()


async def test_work_made_live_while_a_cut_is_prepared_keeps_its_events(tmp_path, monkeypatch):
    """A retired task's correlation id carried on by new mail between the search for
    candidates and the commit: its events stay (and stay out of the archive)."""
    monkeypatch.setattr(finished, "TASKS_KEPT", 2)
    k = _kernel(tmp_path)
    k.ctl(b"spawn w cmd=cat unconfined=true\nspawn held cmd=cat unconfined=true")
    k.agents["held"].stop()
    old = [_run(k, k.agents["w"], b"t%d\n" % i) for i in range(8)]
    for i in range(70):  # (the rows the snapshot's digest names stay)
        k.log.append("mount", mountpoint="/m")
    snapshot.write_now(k)
    (batch,), more = event_retention.candidates(k.log.path, time.time() + 1,
                                                event_retention.live_corrs(k))
    assert more is None
    revived = old[0]
    assert revived.id in batch.tasks
    k.bus.send(k.agents["held"], b"correlation-id: %s\n\nagain\n" % revived.corr.encode())
    policy = retention.Policy(events_days=0, archive=str(tmp_path / "archive"))
    cut = await event_retention._cut(k, policy, batch)
    assert 0 < cut < len(batch.seqs)
    assert [e.kind for e in k.log.trace(revived.corr)][:3] == \
        ["task_queued", "task_started", "task_done"]
    (said,) = [e for e in k.log.events_after(0, 10_000) if e.kind == "events_retired"]
    db = sqlite3.connect(said.data["archive"])
    try:
        archived = {r[0] for r in db.execute("SELECT seq FROM events")}
    finally:
        db.close()
    assert len(archived) == cut and not archived & {e.seq for e in k.log.trace(revived.corr)}
    assert states.check(str(tmp_path / "state"))[0] == []
    k.log.close()
