"""Retention (kernel/retention.py): only retired tasks' output is cut, after its copy is
archived; every event stays, so a replay and a snapshot give the same state after."""
import hashlib
import sqlite3
import time

import pytest

from fs9.errors import Fs9Error
from fs9.kernel import finished, retention, snapshot

from test_replay import _kernel, _picture


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
                 "other = 1\n", "not toml ["):
        (state / "retention.toml").write_text(text)
        with pytest.raises(Fs9Error):
            retention.Policy.load(str(state))
    (state / "retention.toml").write_text("outputs_days = 7\narchive = '/srv/a'\n")
    assert retention.Policy.load(str(state)) == retention.Policy(7.0, "/srv/a")
