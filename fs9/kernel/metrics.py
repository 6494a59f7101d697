"""The root `metrics`: the kernel's state in the Prometheus text exposition format,
rendered by prometheus-client from the state at each read (a custom collector: no
global registry, nothing kept twice) but for task durations, a histogram kept as
tasks end (at replay too, from the logged times, so a new mount shows the same).

Also counted as they happen: the state events applied (Kernel.apply: live and at
replay alike, so mail sent, acked and expired and topic events survive a new mount),
and the FUSE requests served by each handler and their latency (face/boundary.py;
since this mount, a stream's read including the time it waited for data).

`fs9 mount --metrics 127.0.0.1:PORT` also serves the operator's exposition over HTTP
for a Prometheus scraper (`serve_http`: prometheus-client's server, in its thread; the
state is read on the trio thread, where it changes).

Read through an agent's view, only the agents it may know of appear (Kernel.knows):
a metric must not name an agent that answers elsewhere as one nobody has; the
event and request counts, which tell of every agent, are the operator's.
"""
import bisect
import collections
import ipaddress

import trio
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.metrics import Histogram

from .names import OPERATOR
from .task import FINAL
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kernel import Kernel

BUCKETS = tuple(b for b in Histogram.DEFAULT_BUCKETS if b != float("inf"))  # seconds


class Durations:
    """One agent's task durations: counts per bucket (not cumulative) and their sum."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bucket
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, count in zip(BUCKETS + (float("inf"),), self.counts):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class Metrics:
    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        # one histogram for all agents' tasks: 16 series per agent would make a read of a
        # thousand agents cost a second (prometheus-client renders ~30 us a sample)
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
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, me))
        return generate_latest(registry).decode()


def http_address(text: str) -> tuple[str, int]:
    """HOST:PORT of --metrics, a loopback address (the exposition names every agent);
    ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9109")
    if not loopback:
        raise ValueError(f"--metrics {text!r}: serve it on a loopback address (127.0.0.1, "
                         "::1): it names every agent; put a proxy in front to reach it")
    return host, int(port)


async def serve_http(kernel: "Kernel", host: str, port: int, *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the operator's exposition at http://HOST:PORT/ until cancelled."""
    token = trio.lowlevel.current_trio_token()

    class OnTrioThread:  # a scrape (the server's thread) renders on the trio thread
        def collect(self):
            return trio.from_thread.run_sync(
                lambda: list(_Collector(kernel.metrics, None).collect()), trio_token=token)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OnTrioThread())
    server, _ = start_http_server(port, host, registry)  # (its thread is a daemon)
    try:
        task_status.started()
        await trio.sleep_forever()
    finally:
        server.shutdown()
        server.server_close()


class _Collector:
    def __init__(self, metrics: Metrics, me: str | None) -> None:
        self.metrics, self.me = metrics, me

    def collect(self):
        k, me = self.metrics.kernel, self.me
        agents = [a for _, a in sorted(k.agents.items()) if me is None or k.knows(me, a.name)]
        names = {a.name for a in agents}
        by_state = collections.Counter(a.state for a in agents)
        g = GaugeMetricFamily("fs9_agents", "Agents by state.", labels=["state"])
        for state in sorted(by_state):
            g.add_metric([state], by_state[state])
        yield g
        restarts = CounterMetricFamily("fs9_agent_restarts", "Restarts of an agent "
                                       "(by its supervisor or by command).", labels=["agent"])
        queued = GaugeMetricFamily("fs9_agent_queue_depth", "Tasks waiting in an agent's "
                                   "queue.", labels=["agent"])
        tasks = GaugeMetricFamily("fs9_agent_tasks", "An agent's tasks by state (daemon "
                                  "runs not counted).", labels=["agent", "state"])
        totals: collections.Counter = collections.Counter()
        for a in agents:
            restarts.add_metric([a.name], a.restarts)
            queued.add_metric([a.name], len(a.queue))
            for state, n in sorted(a.tally.items()):
                if n:
                    tasks.add_metric([a.name, state], n)
                    totals[state] += n
        yield from (restarts, queued, tasks)
        t = GaugeMetricFamily("fs9_tasks", "Tasks of the agents shown, by state.",
                              labels=["state"])
        for state in sorted(totals):
            t.add_metric([state], totals[state])
        yield t
        yield from self._mail(k, agents)
        yield from self._models(k, names)
        if me is None:
            yield from self._operators()

    def _operators(self):
        m = self.metrics
        h = HistogramMetricFamily("fs9_task_duration_seconds", "Run time of the tasks "
                                  "that ended (done, failed, cancelled).")
        h.add_metric([], m.durations.cumulative(), m.durations.sum)
        yield h
        waiting = GaugeMetricFamily("fs9_approvals_pending", "Actions waiting for the "
                                    "operator's yes in approvals/ (approvals.py).",
                                    labels=["agent"])
        for agent, ids in sorted(self._pending().items()):
            waiting.add_metric([agent], len(ids))
        yield waiting
        events = CounterMetricFamily("fs9_state_events", "State events applied, by kind "
                                     "(mail_sent, mail_acked, mail_expired, published...).",
                                     labels=["kind"])
        for kind in sorted(m.applied):
            events.add_metric([kind], m.applied[kind])
        yield events
        latency = HistogramMetricFamily("fs9_fuse_request_seconds", "FUSE requests served "
                                        "since mount, by handler, and their latency.",
                                        labels=["op"])
        errors = CounterMetricFamily("fs9_fuse_errors", "FUSE requests answered with an "
                                     "errno, by handler.", labels=["op"])
        for op in sorted(m.served):
            latency.add_metric([op], m.served[op].cumulative(), m.served[op].sum)
            errors.add_metric([op], m.failed[op])
        yield from (latency, errors)

    def _pending(self) -> dict[str, list[str]]:
        pending: dict[str, list[str]] = {}
        for a in self.metrics.kernel.approvals.items.values():
            if a.state == "pending":
                pending.setdefault(a.agent, []).append(a.id)
        return pending

    def _mail(self, k, agents):
        owners = agents + ([k.bus.operator] if self.me is None else [])
        pending = GaugeMetricFamily("fs9_mail_pending", "Messages not yet acknowledged.",
                                    labels=["agent"])
        dead = GaugeMetricFamily("fs9_mail_dead", "Messages past their deadline "
                                 "unacknowledged (mail/dead/).", labels=["agent"])
        for owner in owners:
            pending.add_metric([owner.name], len(owner.mailbox.order))
            dead.add_metric([owner.name], len(owner.mailbox.dead))
        yield from (pending, dead)

    def _models(self, k, names: set[str]):
        shown = names | ({OPERATOR} if self.me is None else set())
        calls = CounterMetricFamily("fs9_model_calls", "Model calls.", labels=["model", "agent"])
        tokens = CounterMetricFamily("fs9_model_tokens", "Model tokens.",
                                     labels=["model", "agent", "direction"])
        refused = CounterMetricFamily("fs9_model_refused", "Model calls refused (budgets, "
                                      "limits).", labels=["agent"])
        for key, u in sorted(k.models.usage.items(), key=lambda kv: str(kv[0])):
            if key[0] == "model" and key[2] in shown:
                calls.add_metric([key[1], key[2]], u.calls)
                tokens.add_metric([key[1], key[2], "in"], u.tokens_in)
                tokens.add_metric([key[1], key[2], "out"], u.tokens_out)
            elif key[0] == "agent" and key[1] in shown and u.refused:
                refused.add_metric([key[1]], u.refused)
        yield from (calls, tokens, refused)
        up = GaugeMetricFamily("fs9_model_reachable", "1 if the model's endpoint answered "
                               "its latest check.", labels=["model"])
        for name, model in sorted(k.models.models.items()):
            up.add_metric([name], 1 if model.state == "reachable" else 0)
        yield up
        breaker = GaugeMetricFamily("fs9_model_breaker", "1 for the state the model's "
                                    "circuit breaker is in (breaker.py).",
                                    labels=["model", "state"])
        for name, model in sorted(k.models.models.items()):
            for state in ("closed", "open", "half_open"):
                breaker.add_metric([name, state], 1 if model.breaker.state == state else 0)
        yield breaker
