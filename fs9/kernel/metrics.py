"""The root `metrics`: the kernel's state in the Prometheus text exposition format,
rendered from the state at each read (nothing kept twice) but for task durations, a
histogram kept as tasks end (at replay too, from the logged times, so a new mount
shows the same).

Also counted as they happen: the state events applied (Kernel.apply: live and at
replay alike, so mail sent, acked and expired and topic events survive a new mount),
and the FUSE requests served by each handler and their latency (face/boundary.py;
since this mount, a stream's read including the time it waited for data).

A read renders the text itself, a line a sample (Family), rather than through
prometheus-client's collectors: those build a Sample and format it at ~30 us a sample,
which made a read with 1,000 agents (5 or more samples each) cost 120 ms; an f-string
a line with each agent's label written once (_label) costs well under a microsecond.
The format is prometheus-client's own (its parser reads it back in tests/test_metrics.py).

`fs9 mount --metrics 127.0.0.1:PORT` also serves the operator's exposition over HTTP
for a Prometheus scraper, to the operator's programs only (scrape.py).

Read through an agent's view, only the agents it may know of appear (Kernel.knows):
a metric must not name an agent that answers elsewhere as one nobody has; the
event and request counts, which tell of every agent, are the operator's.
"""
import bisect
import collections
import functools

from prometheus_client.metrics import Histogram
from prometheus_client.utils import floatToGoString

from .names import OPERATOR
from .task import FINAL
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kernel import Kernel

BUCKETS = tuple(b for b in Histogram.DEFAULT_BUCKETS if b != float("inf"))  # seconds
LE = tuple(repr(b) for b in BUCKETS) + ("+Inf",)  # the buckets' `le` labels


class Durations:
    """One histogram: counts per bucket (not cumulative) and their sum."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bucket
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for le, count in zip(LE, self.counts):
            total += count
            out.append((le, total))
        return out


class Metrics:
    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        # one histogram for all agents' tasks: 16 series per agent would be most of a
        # read with a thousand agents
        self.durations = Durations()
        self.applied: collections.Counter = collections.Counter()  # state events by kind
        self.served: dict[str, Durations] = collections.defaultdict(Durations)  # FUSE ops
        self.failed: collections.Counter = collections.Counter()  # FUSE ops answered an errno

    def request(self, op: str, seconds: float, ok: bool) -> None:
        """A FUSE handler answered (face/boundary.py)."""
        self.served[op].observe(seconds)
        if not ok:
            self.failed[op] += 1

    def task_ended(self, task) -> None:
        """A task reached a final state (Kernel._end): its run time, if it ran."""
        if task.state in FINAL and not task.daemon and task.started_ts is not None \
                and task.ended_ts is not None:
            self.durations.observe(max(0.0, task.ended_ts - task.started_ts))

    def text(self, me: str | None = None) -> str:
        """The exposition as `me` (an agent; None: the operator) may see it."""
        return "".join(f.text() for f in _families(self, me))


# --- rendering ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8192)
def _label(name: str, value: str) -> str:
    """name="value", escaped as the text format wants (once per agent name, cached)."""
    return name + '="' + value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') + '"'


def _num(value) -> str:
    if type(value) is int and -1_000_000 < value < 1_000_000:  # the common case, fast
        return f"{value}.0"
    return floatToGoString(value)


class Family:
    """One metric family as text: its HELP and TYPE lines, then a line a sample."""

    def __init__(self, name: str, kind: str, help: str) -> None:
        self.name = name + "_total" if kind == "counter" else name  # (as prometheus-client)
        self.head = f"# HELP {self.name} {help}\n# TYPE {self.name} {kind}\n"
        self.lines: list[str] = []

    def add(self, labels: str, value, suffix: str = "") -> None:
        """A sample; labels: `_label`s joined by commas ("" for none)."""
        self.lines.append(f"{self.name}{suffix}{{{labels}}} {_num(value)}\n" if labels
                          else f"{self.name}{suffix} {_num(value)}\n")

    def histogram(self, labels: str, d: Durations) -> None:
        sep = "," if labels else ""
        for le, total in d.cumulative():
            self.add(f"{labels}{sep}le=\"{le}\"", total, "_bucket")
        self.add(labels, total, "_count")
        self.add(labels, d.sum, "_sum")

    def text(self) -> str:
        return self.head + "".join(self.lines)


def _families(metrics: Metrics, me: str | None) -> list[Family]:
    k = metrics.kernel
    agents = [a for _, a in sorted(k.agents.items()) if me is None or k.knows(me, a.name)]
    g = Family("fs9_agents", "gauge", "Agents by state.")
    restarts = Family("fs9_agent_restarts", "counter", "Restarts of an agent (by its "
                      "supervisor or by command).")
    queued = Family("fs9_agent_queue_depth", "gauge", "Tasks waiting in an agent's queue.")
    tasks = Family("fs9_agent_tasks", "gauge", "An agent's tasks by state (daemon runs not "
                   "counted).")
    breakers = Family("fs9_agent_breaker", "gauge", "1 for the state an agent's circuit "
                      "breaker is in (agents with one: agents/breaker.py).")
    by_state: collections.Counter = collections.Counter()
    totals: collections.Counter = collections.Counter()
    # the lines a sample an agent, written inline: this loop is most of a read
    restart, queue, task = restarts.lines.append, queued.lines.append, tasks.lines.append
    for a in agents:
        by_state[a.state] += 1
        who = _label("agent", a.name)
        restart(f"fs9_agent_restarts_total{{{who}}} {a.restarts}.0\n")
        queue(f"fs9_agent_queue_depth{{{who}}} {len(a.queue)}.0\n")
        for state, n in a.tally.items():
            if n:
                task(f'fs9_agent_tasks{{{who},state="{state}"}} {n}.0\n')
                totals[state] += n
        if a.breaker.threshold > 0:
            breakers.add(f"{who},{_label('state', a.breaker.state)}", 1)
    for state in sorted(by_state):
        g.add(_label("state", state), by_state[state])
    t = Family("fs9_tasks", "gauge", "Tasks of the agents shown, by state.")
    for state in sorted(totals):
        t.add(_label("state", state), totals[state])
    out = [g, restarts, queued, tasks, breakers, t, *_mail(k, agents, me),
           *_models(k, {a.name for a in agents}, me)]
    if me is None:
        out += _operators(metrics)
    return out


def _operators(m: Metrics) -> list[Family]:
    h = Family("fs9_task_duration_seconds", "histogram", "Run time of the tasks that ended "
               "(done, failed, cancelled).")
    h.histogram("", m.durations)
    waiting = Family("fs9_approvals_pending", "gauge", "Actions waiting for the operator's "
                     "yes in approvals/ (approvals.py).")
    for agent, ids in sorted(m.kernel.approvals.pending.items()):
        waiting.add(_label("agent", agent), len(ids))
    events = Family("fs9_state_events", "counter", "State events applied, by kind "
                    "(mail_sent, mail_acked, mail_expired, published...).")
    for kind in sorted(m.applied):
        events.add(_label("kind", kind), m.applied[kind])
    latency = Family("fs9_fuse_request_seconds", "histogram", "FUSE requests served since "
                     "mount, by handler, and their latency.")
    errors = Family("fs9_fuse_errors", "counter", "FUSE requests answered with an errno, "
                    "by handler.")
    for op in sorted(m.served):
        latency.histogram(_label("op", op), m.served[op])
        errors.add(_label("op", op), m.failed[op])
    return [h, waiting, events, latency, errors]


def _mail(k, agents, me) -> list[Family]:
    owners = agents + ([k.bus.operator] if me is None else [])
    pending = Family("fs9_mail_pending", "gauge", "Messages not yet acknowledged.")
    dead = Family("fs9_mail_dead", "gauge", "Messages past their deadline unacknowledged "
                  "(mail/dead/).")
    waiting, expired = pending.lines.append, dead.lines.append
    for owner in owners:
        who, box = _label("agent", owner.name), owner.mailbox
        waiting(f"fs9_mail_pending{{{who}}} {len(box.order)}.0\n")
        expired(f"fs9_mail_dead{{{who}}} {len(box.dead)}.0\n")
    return [pending, dead]


def _models(k, names: set[str], me) -> list[Family]:
    shown = names | ({OPERATOR} if me is None else set())
    calls = Family("fs9_model_calls", "counter", "Model calls.")
    tokens = Family("fs9_model_tokens", "counter", "Model tokens.")
    refused = Family("fs9_model_refused", "counter", "Model calls refused (budgets, limits).")
    for key, u in sorted(k.models.usage.items(), key=lambda kv: str(kv[0])):
        if key[0] == "model" and key[2] in shown:
            who = f"{_label('agent', key[2])},{_label('model', key[1])}"
            calls.add(who, u.calls)
            tokens.add(f"{who},direction=\"in\"", u.tokens_in)
            tokens.add(f"{who},direction=\"out\"", u.tokens_out)
        elif key[0] == "agent" and key[1] in shown and u.refused:
            refused.add(_label("agent", key[1]), u.refused)
    up = Family("fs9_model_reachable", "gauge", "1 if the model's endpoint answered its "
                "latest check.")
    breaker = Family("fs9_model_breaker", "gauge", "1 for the state the model's circuit "
                     "breaker is in (breaker.py).")
    for name, model in sorted(k.models.models.items()):
        which = _label("model", name)
        up.add(which, 1 if model.state == "reachable" else 0)
        for state in ("closed", "open", "half_open"):
            breaker.add(f"{which},state=\"{state}\"", 1 if model.breaker.state == state else 0)
    return [calls, tokens, refused, up, breaker]
