"""Traces: the event log's chains exported as OpenTelemetry spans over OTLP/HTTP.

Off unless `fs9 mount --otlp URL` names a collector; then `export` follows the log
from the mount on (like the `events` stream) and turns what it reads into spans:

- a task: `fs9.task AGENT`, from task_queued to task_done/failed/cancelled; its
  starts, steps (agent_step), progress and requeues are span events;
- a message: `fs9.mail TYPE`, from mail_sent to mail_acked (or expiry); a handoff is
  one with type handoff; a message an agent sends in a chain is the child of its latest
  task in that chain (a result, a request it makes), and a task made from a message
  (a work_request, a handoff) is the message's child;
- a model call: `chat MODEL` (a client span after the GenAI semantic conventions:
  gen_ai.operation.name, gen_ai.system, gen_ai.request.model, gen_ai.usage.*), the
  child of its task.

Every span of a correlation id is one trace: the trace id is a hash of the id, and
span ids are hashes of (id, what the span is), so a chain stays one trace across
remounts (a task queued before a remount and ending after it is still sent, its start
read from the log; a span begun before this mount parents nothing). A span is built
when it ends, from the times in the log: nothing is held open in the SDK.
`log/trace/ID` is the file view of the same chain. The SDK's batch processor sends
from its own thread through a bounded queue (spans beyond it are dropped, never
waited for); the OpenTelemetry modules are imported only here, only when configured.
"""
import collections
import hashlib
import logging

import trio

log = logging.getLogger("fs9")

TRACES_PATH = "/v1/traces"
PENDING_MAX = 10_000  # spans begun and not ended (tasks queued, mail unacked) kept
SPAN_EVENTS_MAX = 128  # span events kept per task (its steps beyond: counted)
FOLLOW_S = 0.2  # the log is read for spans at most this often, unless it falls behind
BATCH = 1000  # events read at once
ATTRIBUTE_MAX = 1024  # characters of one attribute value (agents write some of them)


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a collector's base URL (http://host:4318)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


def trace_id(corr: str) -> int:
    return int.from_bytes(hashlib.sha256(corr.encode()).digest()[:16], "big") or 1


def span_id(corr: str, what: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{corr}\0{what}".encode()).digest()[:8], "big") or 1


def _ns(ts: float) -> int:
    return int(ts * 1e9)


class Pending:
    """A span begun in the log and not yet ended: where it sits and what it carries."""
    __slots__ = ("corr", "what", "name", "start", "parent", "attrs", "events", "dropped")

    def __init__(self, corr, what, name, start, parent, attrs) -> None:
        self.corr, self.what, self.name, self.start = corr, what, name, start
        self.parent, self.attrs = parent, attrs  # parent: a `what` in the same chain, or None
        self.events: list[tuple[str, dict, float]] = []
        self.dropped = 0


class Spans:
    """Turns events into spans for a tracer (the SDK's), keyed by deterministic ids."""

    def __init__(self, kernel, tracer, ids, trace_api) -> None:
        self.kernel, self.tracer, self.ids, self.api = kernel, tracer, ids, trace_api
        self.pending: collections.OrderedDict[str, Pending] = collections.OrderedDict()
        self.latest: dict[str, tuple[str, str]] = {}  # agent -> its latest task: what, corr
        self.begun: collections.OrderedDict[str, None] = collections.OrderedDict()  # ids made

    def follow(self, event) -> None:
        handle = getattr(self, "_" + event.kind, None)
        if handle is not None and event.corr:
            handle(event)

    # --- tasks ---------------------------------------------------------------------

    def _task_queued(self, e) -> None:
        request = e.data.get("request")
        parent = f"mail/{request}" if request else None
        self._begin(e, f"task/{e.task}", f"fs9.task {e.agent}", parent, {
            "fs9.agent": e.agent, "fs9.task": e.task, "fs9.correlation_id": e.corr,
            **({"fs9.reply_to": e.data["reply_to"]} if e.data.get("reply_to") else {})})

    def _task_started(self, e) -> None:
        self.latest[e.agent] = (f"task/{e.task}", e.corr)
        self._note(e, f"task/{e.task}", "started", {"attempt": e.data.get("attempt", 0)})

    def _task_requeued(self, e) -> None:
        self._note(e, f"task/{e.task}", "requeued", {"reason": e.data.get("reason", "")})

    def _task_progress(self, e) -> None:
        self._note(e, f"task/{e.task}", "progress", {})

    def _agent_step(self, e) -> None:
        step = e.data.get("step")
        kind = step.get("kind", "step") if isinstance(step, dict) else "step"
        self._note(e, f"task/{e.task}", f"step {kind}",
                   {"step": str(step)} if step is not None else {})

    def _task_done(self, e) -> None:
        self._end_task(e, None)

    def _task_failed(self, e) -> None:
        self._end_task(e, e.data.get("reason") or f"exit {e.data.get('exit')}")

    def _task_cancelled(self, e) -> None:
        self._end_task(e, e.data.get("reason") or "cancelled")

    def _end_task(self, e, error: str | None) -> None:
        what = f"task/{e.task}"
        if what not in self.pending and e.task:  # queued before this mount: the log says when
            queued = self.kernel.log.events_after(e.task - 1, 1)
            if queued and queued[0].kind == "task_queued" and queued[0].corr == e.corr:
                self._task_queued(queued[0])
        self._end(e, what, error, {"fs9.exit": e.data["exit"]}
                  if e.data.get("exit") is not None else {})

    # --- mail ----------------------------------------------------------------------

    def _mail_sent(self, e) -> None:
        sender = e.data.get("sender", "")
        task, corr = self.latest.get(sender, (None, None))  # (a result is sent as it ends)
        parent = task if corr == e.corr else None
        self._begin(e, f"mail/{e.data.get('id')}", f"fs9.mail {e.data.get('type', '')}",
                    parent, {"fs9.mail.id": str(e.data.get("id")), "fs9.mail.from": sender,
                             "fs9.mail.to": e.agent or "", "fs9.mail.type": e.data.get("type", ""),
                             "fs9.correlation_id": e.corr})

    def _mail_delivered(self, e) -> None:
        self._note(e, f"mail/{e.data.get('id')}", "delivered", {})

    def _mail_acked(self, e) -> None:
        self._end(e, f"mail/{e.data.get('id')}", None, {})

    def _mail_expired(self, e) -> None:
        self._end(e, f"mail/{e.data.get('id')}", "expired: moved to dead letters", {})

    # --- model calls (GenAI semantic conventions) -----------------------------------

    def _model_call(self, e) -> None:
        self._model(e, None, {"gen_ai.usage.input_tokens": e.data.get("tokens_in", 0),
                              "gen_ai.usage.output_tokens": e.data.get("tokens_out", 0),
                              "gen_ai.response.finish_reasons": [str(e.data.get("finish"))]})

    def _model_error(self, e) -> None:
        self._model(e, e.data.get("reason") or "model error", {})

    def _model(self, e, error, attrs) -> None:
        name = str(e.data.get("model", ""))
        model = self.kernel.models.models.get(name)
        conf = model.conf if model is not None else {}
        start = e.ts - float(e.data.get("ms") or 0) / 1000
        self._begin(e, f"model/{e.seq}", f"chat {name}",
                    f"task/{e.task}" if e.task else None, {
                        "gen_ai.operation.name": "chat",
                        "gen_ai.system": str(conf.get("provider", name)),
                        "gen_ai.request.model": str(conf.get("model", name)),
                        "gen_ai.conversation.id": str(e.data.get("conv", "")),
                        "fs9.agent": e.agent or "", "fs9.correlation_id": e.corr, **attrs},
                    start=start, kind="CLIENT")
        self._end(e, f"model/{e.seq}", error, {})

    # --- building spans --------------------------------------------------------------

    def _begin(self, e, what, name, parent, attrs, start=None, kind="INTERNAL") -> None:
        if len(self.pending) >= PENDING_MAX:  # (a chain never ended: its span is not sent)
            self.pending.popitem(last=False)
        if parent not in self.begun:  # (begun before this mount: this span is a root)
            parent = None
        self.begun[what] = None
        if len(self.begun) > 2 * PENDING_MAX:
            self.begun.popitem(last=False)
        p = Pending(e.corr, what, name, e.ts if start is None else start, parent, attrs)
        p.attrs["fs9.kind"] = kind
        self.pending[what] = p

    def _note(self, e, what, name, attrs) -> None:
        p = self.pending.get(what)
        if p is None or p.corr != e.corr:
            return
        if len(p.events) < SPAN_EVENTS_MAX:
            p.events.append((name, attrs, e.ts))
        else:
            p.dropped += 1

    def _end(self, e, what, error, attrs) -> None:
        p = self.pending.pop(what, None)
        if p is None or p.corr != e.corr:  # (never begun here, or another chain's id)
            return
        api = self.api
        kind = getattr(api.SpanKind, p.attrs.pop("fs9.kind"))
        parent = api.set_span_in_context(api.INVALID_SPAN if p.parent is None else
                                         api.NonRecordingSpan(api.SpanContext(
                                             trace_id(p.corr), span_id(p.corr, p.parent),
                                             is_remote=False,
                                             trace_flags=api.TraceFlags(api.TraceFlags.SAMPLED))))
        # a root takes its trace id, and every span its span id, from Ids (in export):
        # hashes of the chain and of what the span is, not random numbers
        self.ids.next = (trace_id(p.corr), span_id(p.corr, p.what))
        span = self.tracer.start_span(p.name, context=parent, kind=kind,
                                      attributes={**p.attrs, **attrs}, start_time=_ns(p.start))
        for name, fields, ts in p.events:
            span.add_event(name, fields, timestamp=_ns(ts))
        if p.dropped:
            span.set_attribute("fs9.events_dropped", p.dropped)
        if error is not None:
            span.set_status(api.Status(api.StatusCode.ERROR, str(error)[:ATTRIBUTE_MAX]))
        span.end(end_time=_ns(max(e.ts, p.start)))


async def export(kernel, endpoint: str) -> None:
    """Follow the log from now on and export its chains as spans to endpoint; until
    cancelled, then flush what is queued (a few seconds at most). Without the packages,
    traces stay off, said in the root err; the mount serves on."""
    try:
        from opentelemetry import trace as trace_api
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import IdGenerator
    except ImportError as e:
        log.error("traces are off: %s", e)
        kernel.diag(f"--otlp: traces are off: {e} (pip install opentelemetry-sdk "
                    "opentelemetry-exporter-otlp-proto-http)")
        return

    class Ids(IdGenerator):
        """The ids of the span being built: hashes of its chain and what it is."""
        next = (1, 1)

        def generate_trace_id(self) -> int:
            return self.next[0]

        def generate_span_id(self) -> int:
            return self.next[1]

    ids = Ids()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "fs9", "fs9.mount": kernel.mount_path}),
        id_generator=ids, span_limits=SpanLimits(max_attribute_length=ATTRIBUTE_MAX))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=5),
        max_queue_size=4096, schedule_delay_millis=1000))
    spans = Spans(kernel, provider.get_tracer("fs9"), ids, trace_api)
    seq = kernel.log.last_seq
    log.info("exporting traces to %s", traces_url(endpoint))
    try:
        while True:
            await kernel.log.wait_after(seq)
            batch = kernel.log.events_after(seq, limit=BATCH)
            for event in batch:
                seq = event.seq
                try:
                    spans.follow(event)
                except Exception:  # a defect of ours costs that span, not the mount
                    kernel.log.bug("traces", event=event.seq)
            # a span waits for the batch processor's second anyway: following the log a few
            # times a second, a query each, rather than a query at every event, halves
            # what tracing costs a mail exchange (bench/ops.py)
            await trio.sleep(0 if len(batch) >= BATCH else FOLLOW_S)
    finally:
        with trio.move_on_after(5) as scope:
            scope.shield = True
            await trio.to_thread.run_sync(provider.shutdown, abandon_on_cancel=True)
