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
`log/trace/ID` is the file view of the same chain.

The spans are built and sent by a process of their own (`python -m fs9.kernel.traces`,
started and ended by `export`), which reads the log read-only beside the server: the
server never imports OpenTelemetry, and building and encoding spans (tens of us of
Python a span) never holds the server's interpreter lock while it answers FUSE. The
process ends with the server: it sees its parent change (not a parent-death signal,
which comes when the thread that forked it ends, and trio forks in a worker thread that
ends when idle). A defect of its own is a `bug` event the server logs for it. The SDK's batch processor sends through a bounded
queue (spans beyond it are dropped, never waited for).
"""
import collections
import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import traceback

import trio

from .records import _readable

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

    def __init__(self, log, models, tracer, ids, trace_api) -> None:
        """log: events_after(seq, limit); models: a model's name -> its table (a dict)."""
        self.log, self.models = log, models
        self.tracer, self.ids, self.api = tracer, ids, trace_api
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
            queued = self.log.events_after(e.task - 1, 1)
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
        conf = self.models(name)
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


# --- the exporting process -------------------------------------------------------------

BUG_TEXT_MAX = 4096  # characters of a traceback the process hands the server for its log
NO_SDK = 3  # the process's exit status when the OpenTelemetry packages are missing


class LogReader:
    """The event log, read-only, beside the server that writes it (WAL: readers and the
    writer do not wait for each other; no read holds a snapshot between queries)."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)

    def events_after(self, seq: int, limit: int = BATCH) -> list:
        rows = self.db.execute("SELECT seq, ts, kind, agent, task, corr, data FROM events"
                               " WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [_readable(*row) for row in rows]


class ModelTables:
    """A model's table in models.toml by name, read again when the file changes (only
    `provider` and `model` are used, for the GenAI attributes)."""

    def __init__(self, path: str) -> None:
        self.path, self.stamp, self.tables = path, None, {}

    def __call__(self, name: str) -> dict:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self.stamp:
            self.stamp, self.tables = stamp, {}
            try:
                with open(self.path, "rb") as f:
                    tables = tomllib.load(f).get("models", {})
                self.tables = tables if isinstance(tables, dict) else {}
            except (OSError, tomllib.TOMLDecodeError):
                pass
        table = self.tables.get(name)
        return table if isinstance(table, dict) else {}


def main(argv: list[str]) -> int:
    """python -m fs9.kernel.traces URL LOG SEQ MOUNT MODELS PARENT: export the chains of
    the log at LOG after event SEQ to the collector at URL until SIGTERM or the death of
    the server (pid PARENT); then flush what is queued (5 s at most)."""
    url, log_path, seq, mount, models_path, parent = argv
    seq, parent = int(seq), int(parent)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C to the server's group is its own
    if os.getppid() != parent:  # it died already (the loop below looks again each turn)
        return 0
    # Exporting is background work: on a busy machine the server and the agents go first
    # and spans wait (the log holds them), rather than the hot path sharing its cores.
    os.nice(10)
    try:
        from opentelemetry import trace as trace_api
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import IdGenerator
    except ImportError as e:
        print(f"traces are off: {e} (pip install opentelemetry-sdk "
              "opentelemetry-exporter-otlp-proto-http)", file=sys.stderr)
        return NO_SDK

    class Ids(IdGenerator):
        """The ids of the span being built: hashes of its chain and what it is."""
        next = (1, 1)

        def generate_trace_id(self) -> int:
            return self.next[0]

        def generate_span_id(self) -> int:
            return self.next[1]

    ids = Ids()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "fs9", "fs9.mount": mount}),
        id_generator=ids, span_limits=SpanLimits(max_attribute_length=ATTRIBUTE_MAX))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=url, timeout=5), max_queue_size=4096,
        schedule_delay_millis=1000))
    log_ = LogReader(log_path)
    spans = Spans(log_, ModelTables(models_path), provider.get_tracer("fs9"), ids, trace_api)
    while not stop and os.getppid() == parent:
        try:
            batch = log_.events_after(seq)
        except sqlite3.Error:  # (busy a moment: a checkpoint) read again at the next turn
            batch = []
        for event in batch:
            seq = event.seq
            try:
                spans.follow(event)
            except Exception:  # a defect of ours costs that span: the server logs a bug
                print(json.dumps({"event": seq, "traceback":
                                  traceback.format_exc()[-BUG_TEXT_MAX:]}), flush=True)
        if len(batch) < BATCH:
            time.sleep(FOLLOW_S)  # (a span waits for the batch processor's second anyway)
    provider.shutdown()  # sends what is queued; the exporter's timeout bounds it
    return 0


async def export(kernel, endpoint: str) -> None:
    """Run the exporting process for endpoint from the log's present end; until
    cancelled, then end it (its flush: 5 s at most). A process that stops is started
    again from where the log is then (its pending spans are lost: traces are a view,
    the log keeps everything); one that cannot load OpenTelemetry is said in the root
    err, and the mount serves on."""
    url, pause = traces_url(endpoint), 1.0
    log.info("exporting traces to %s", url)
    while True:
        # -P: the working directory (the operator's, maybe others' to write in) is not
        # put on the module path of this root process
        argv = [sys.executable, "-P", "-m", "fs9.kernel.traces", url, kernel.log.path,
                str(kernel.log.last_seq), kernel.mount_path, kernel.models.config_path,
                str(os.getpid())]
        proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE)
        try:
            async for line in _lines(proc.stdout):
                try:
                    bug = json.loads(line)
                    kernel.log.append("bug", handler="traces", event=int(bug["event"]),
                                      traceback=str(bug["traceback"])[:BUG_TEXT_MAX])
                except (ValueError, KeyError, TypeError):
                    log.error("traces: %r", line[:200])
            status = await proc.wait()
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    with trio.move_on_after(6):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
        if status == NO_SDK:
            kernel.diag("--otlp: traces are off: the OpenTelemetry packages are missing "
                        "(pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http)")
            return
        kernel.diag(f"--otlp: the traces' exporter stopped (status {status}); started again")
        await trio.sleep(pause)
        pause = min(pause * 2, 30)


async def _lines(stream):
    """The lines of a byte stream, each at most 64 KiB (a longer one is cut)."""
    buf = b""
    async for chunk in stream:
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line[:1 << 16]
        buf = buf[-(1 << 16):]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
