"""Model use, without FUSE: budgets (kernel/models/budget.py), the call scheduler
(kernel/models/scheduler.py) and the scripted model (drivers/scripted.py)."""
import errno

import pytest
import trio
import trio.testing

from fs9.drivers import scripted
from fs9.errors import Fs9Error
from fs9.kernel.models import budget
from fs9.kernel.models.budget import Limits, Scope, Usage
from fs9.kernel.models.scheduler import AGED_S, Scheduler


def test_limits_are_checked():
    assert Limits.of({"tokens_per_day": 5}, "x").tokens_per_day == 5
    for bad in ({"tokens": 5}, {"tokens_per_day": -1}, {"tokens_per_day": "5"},
                {"requests_per_minute": True}):
        with pytest.raises(Fs9Error) as e:
            Limits.of(bad, "agent.toml budget")
        assert e.value.errno == errno.EINVAL and "agent.toml budget" in e.value.text


def test_admit_clamps_then_refuses_naming_the_scope():
    u = Usage()
    agent = Scope("agent a", Limits(tokens_per_day=1000), u)
    assert budget.admit([agent], 100, 500, now=0) == 500
    u.add(0, 300, 500)  # 800 used
    assert budget.admit([agent], 100, 500, now=1) == 100  # 200 left: 100 prompt, 100 reply
    with pytest.raises(Fs9Error) as e:
        budget.admit([agent], 250, 500, now=2)
    assert e.value.errno == errno.EDQUOT and "agent a has 200 of its 1000 tokens_per_day" \
        in e.value.text
    assert budget.admit([agent], 250, 500, now=budget.DAY_S + 1) == 500  # a day later


def test_task_budget_counts_the_task_total():
    u = Usage()
    task = Scope("task 7", Limits(tokens_per_task=100), u, per_task=True)
    u.add(0, 40, 40)
    with pytest.raises(Fs9Error, match="tokens_per_task"):
        budget.admit([task], 30, 10, now=budget.DAY_S * 3)  # never forgiven by time


def test_rate_wait():
    u = Usage()
    s = Scope("model m", Limits(requests_per_minute=2), u)
    assert budget.wait_s([s], 0) == 0
    u.started(0)
    u.started(10)
    assert budget.wait_s([s], 20) == pytest.approx(40)
    assert budget.wait_s([s], 61) == 0


async def test_scheduler_priority_then_fairness_then_arrival(autojump_clock):
    # (the clock is trio's mock one: `first` holds the slot until every caller has queued,
    # however slowly the machine runs them)
    recent = {"busy": 1000, "quiet": 0, "boss": 0}
    sched = Scheduler(1, lambda who: recent[who])
    order = []

    async def call(who, priority, hold=0.0):
        async with sched.slot(who, priority):
            order.append(who)
            await trio.sleep(hold)

    async with trio.open_nursery() as n:
        n.start_soon(call, "first", "background", 0.2)  # takes the one slot
        await trio.testing.wait_all_tasks_blocked()
        recent["first"] = 0
        for who, prio in (("busy", "normal"), ("quiet", "normal"), ("bg", "background"),
                          ("boss", "interactive")):
            recent.setdefault(who, 0)
            n.start_soon(call, who, prio)
            await trio.testing.wait_all_tasks_blocked()
    assert order == ["first", "boss", "quiet", "busy", "bg"]
    assert sched.busy == 0


async def test_a_cancelled_waiter_gives_its_slot_away(autojump_clock):
    # (mock clock: `a` holds the slot until b has queued and left, however slow the machine)
    sched = Scheduler(1, lambda who: 0)
    got = []

    async def call(who):
        async with sched.slot(who, "normal"):
            got.append(who)
            await trio.sleep(0.5)

    async with trio.open_nursery() as n:
        n.start_soon(call, "a")
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            n.start_soon(call, "c")
            scope.cancel()
        async with trio.open_nursery() as inner:
            inner.start_soon(call, "b")
            await trio.testing.wait_all_tasks_blocked()
            inner.cancel_scope.cancel()  # b leaves the queue
    async with sched.slot("d", "normal"):
        pass
    assert "b" not in got and sched.busy == 0 and not sched.waiting


def test_scripted_rules(tmp_path):
    script = tmp_path / "s.toml"
    script.write_text('[[rule]]\nmatch = "bug report: (.*)"\nreply = "triaged {1}"\n'
                      '[[rule]]\nmatch = "look at (\\\\S+)"\ncall = "read"\n'
                      'args = { path = "vault/{1}" }\n')
    rules = scripted.load_script(str(script))
    user = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    assert scripted.answer(rules, user("bug report: it crashes"), []) == ("triaged it crashes", [])
    tools = [{"type": "function", "function": {"name": "read"}}]
    assert scripted.answer(rules, user("look at a.md"), tools) == \
        ("", [{"name": "read", "arguments": {"path": "vault/a.md"}}])
    # a call the request does not offer is not made
    assert scripted.answer(rules, user("look at a.md"), [])[0].startswith("(scripted model)")
    summary, _ = scripted.answer(rules, [{"role": "system", "content": "SUMMARIZE it"}]
                                 + user("one two three"), [])
    assert summary == "summary: one two three"
    script.write_text('[[rule]]\nreply = "x"\ncall = "y"\n')
    with pytest.raises(Fs9Error, match="exactly one of reply, call"):
        scripted.load_script(str(script))


async def test_a_long_wait_beats_fairness(autojump_clock):
    """Fairness alone could hold a heavy user back for the whole minute; not past AGED_S."""
    recent = {"heavy": 10_000}
    sched = Scheduler(1, lambda who: recent.get(who, 0))
    order = []

    async def call(who, hold):
        async with sched.slot(who, "normal"):
            order.append(who)
            await trio.sleep(hold)

    async with trio.open_nursery() as n:
        n.start_soon(call, "first", AGED_S + 1)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(call, "heavy", 0.5)  # waits over AGED_S: aged when the slot frees
        await trio.sleep(AGED_S + 0.5)
        n.start_soon(call, "light", 0.5)  # waits 0.5 s: fairness would pick it
    assert order == ["first", "heavy", "light"]


def test_usage_sums_stay_right_as_days_pass():
    u = Usage()
    for t in range(10):
        u.add(t * 10_000.0, 5, 5)
    assert u.tokens_today(90_000.0) == 10 * 9  # the call at t=0 is over a day old
    assert u.tokens_within(90_000.0, 60) == 10
