"""Traces over OTLP/HTTP (fs9 mount --otlp): a real collector endpoint on loopback that
decodes what arrives with OpenTelemetry's own protobuf messages; a real mount exporting
a task, a work_request by mail and its result, and a model call; and a mount without
the option, which loads no OpenTelemetry code at all."""
import http.server
import json
import os
import threading

import pytest

from conftest import Mount, fuse_unavailable, wait_for

pytestmark = pytest.mark.skipif(bool(fuse_unavailable()),
                                reason=f"cannot mount FUSE: {fuse_unavailable()}")
otlp = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2",
                           reason="opentelemetry-exporter-otlp-proto-http is not installed")


class Collector:
    """An OTLP/HTTP traces receiver on 127.0.0.1: every span it was sent, decoded."""

    def __init__(self) -> None:
        self.spans: list = []
        self.paths: list[str] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = otlp.ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.paths.append(self.path)
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        collector.spans.extend(ss.spans)
                answer = otlp.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def named(self, prefix: str) -> list:
        return [s for s in list(self.spans) if s.name.startswith(prefix)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        field = v.WhichOneof("value")
        out[kv.key] = [x.string_value for x in v.array_value.values] \
            if field == "array_value" else getattr(v, field)
    return out


def headers(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.split("\n\n", 1)[0].splitlines())


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.stop()


def test_tasks_mail_and_model_calls_arrive_as_spans_one_trace_a_chain(tmp_path, collector):
    m = Mount(tmp_path).mount("--otlp", collector.url)
    try:
        m.sh("echo 'spawn upper' > ctl", check=True)
        # a task of its own (a chain of one), then a work_request by mail and its result
        m.sh("echo 'run quiet please' > agents/upper/ctl && cat agents/upper/out", check=True)
        r = m.sh("printf 'type: work_request\\n\\nshout this\\n' > agents/upper/mail/new"
                 " && timeout 30 cat mail/next", check=True)
        result = headers(r.stdout)
        corr = result["correlation-id"]
        m.sh(f"rm mail/{result['id']}", check=True)  # acknowledged: the result's span ends
        cid = m.read("models/scripted/clone").strip()
        m.write(f"models/scripted/{cid}/request", "hello model\n")
        assert m.read(f"models/scripted/{cid}/reply").endswith("hello model\n")
        wait_for(lambda: len(collector.named("fs9.task upper")) >= 2
                 and len(collector.named("fs9.mail")) >= 2 and collector.named("chat "),
                 what="the spans of two tasks, two messages and a model call")
        logged = [json.loads(line) for line in m.read(f"log/trace/{corr}").splitlines()]
    finally:
        m.umount()
    assert set(collector.paths) == {"/v1/traces"}
    # the work_request's chain: request mail -> task -> result mail, one trace
    request = [s for s in collector.named("fs9.mail work_request")
               if attrs(s)["fs9.correlation_id"] == corr]
    (req,) = request
    (task,) = [s for s in collector.named("fs9.task upper")
               if attrs(s)["fs9.correlation_id"] == corr]
    (res,) = [s for s in collector.named("fs9.mail result")
              if attrs(s)["fs9.correlation_id"] == corr]
    assert req.trace_id == task.trace_id == res.trace_id
    assert req.parent_span_id == b""  # the operator's request starts the chain
    assert task.parent_span_id == req.span_id and res.parent_span_id == task.span_id
    assert attrs(res)["fs9.mail.to"] == "operator" and attrs(res)["fs9.mail.from"] == "upper"
    assert "started" in [ev.name for ev in task.events]
    assert task.start_time_unix_nano <= task.end_time_unix_nano
    # the other task is its own chain: another trace
    (own,) = [s for s in collector.named("fs9.task upper")
              if attrs(s)["fs9.correlation_id"] != corr]
    assert own.trace_id != task.trace_id and own.parent_span_id == b""
    # the model call, after the GenAI semantic conventions, a client span
    (chat,) = collector.named("chat ")
    a = attrs(chat)
    assert chat.name == "chat scripted" and chat.kind == chat.SPAN_KIND_CLIENT
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"]
    assert a["gen_ai.system"] and a["gen_ai.usage.input_tokens"] > 0
    assert a["gen_ai.usage.output_tokens"] > 0 and a["gen_ai.conversation.id"] == cid
    assert chat.trace_id not in (task.trace_id, own.trace_id)
    # log/trace/ID is the file view of the same chain: the same task, the same messages
    assert {e["task"] for e in logged if e["kind"] == "task_done"} == {attrs(task)["fs9.task"]}
    assert {e["id"] for e in logged if e["kind"] == "mail_sent"} == \
        {attrs(req)["fs9.mail.id"], attrs(res)["fs9.mail.id"]}
    assert not m.bugs(), m.bugs()


def test_without_otlp_no_opentelemetry_code_is_loaded(tmp_path, collector):
    traced = Mount(tmp_path / "traced")
    plain = Mount(tmp_path / "plain")
    try:
        traced.mount("--otlp", collector.url)
        plain.mount()
        # the exporter's native code (protobuf's) is mapped where traces are exported,
        # so the maps can tell; where they are not, nothing of it is there
        def otel_maps(pid: int) -> list[str]:
            with open(f"/proc/{pid}/maps") as f:
                return sorted({line.split()[-1] for line in f
                               if "opentelemetry" in line or "/google/_upb/" in line})
        wait_for(lambda: otel_maps(traced.pid), what="the exporter's code in the traced server")
        assert otel_maps(plain.pid) == []
        plain.sh("echo 'spawn upper' > ctl && echo 'run x' > agents/upper/ctl"
                 " && cat agents/upper/out", check=True)
        assert otel_maps(plain.pid) == []
    finally:
        traced.umount()
        plain.umount()
    assert not traced.bugs() and not plain.bugs()


def test_an_unreachable_collector_slows_nothing_and_loses_no_work(tmp_path):
    import socket
    with socket.socket() as s:  # a loopback port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    m = Mount(tmp_path).mount("--otlp", closed)
    try:
        m.sh("echo 'spawn upper' > ctl", check=True)
        for i in range(3):
            r = m.sh(f"echo 'run word{i}' > agents/upper/ctl && cat agents/upper/out",
                     timeout=30, check=True)
            assert r.stdout == f"WORD{i}\n"
    finally:
        m.umount()  # within the fixture's bounds: the exporter's flush is given up on
    assert not m.alive()
    assert not m.bugs(), m.bugs()


THINKER = """set -e
m=$FS9_MNT/models/scripted
id=$(cat $m/clone)
echo "think about it" > $m/$id/request
cat $m/$id/reply
echo '{"kind": "tool_call", "name": "read"}' > $FS9_MNT/agents/$FS9_AGENT/steps
"""


def test_an_agents_model_calls_and_steps_belong_to_its_task(tmp_path, collector):
    m = Mount(tmp_path)
    m.define("thinker", 'cmd = ["sh", "think.sh"]\n[unveil]\n"models/scripted" = "rw"\n',
             {"think.sh": THINKER})
    m.mount("--otlp", collector.url)
    try:
        m.sh("echo 'spawn thinker' > ctl", check=True)
        m.write("agents/thinker/in", "go\n")
        assert "think about it" in m.read("agents/thinker/out")  # (blocks until it ends)
        wait_for(lambda: collector.named("fs9.task thinker") and collector.named("chat "),
                 what="the task's span and its model call's")
    finally:
        m.umount()
    (task,) = collector.named("fs9.task thinker")
    (chat,) = collector.named("chat scripted")
    assert chat.trace_id == task.trace_id and chat.parent_span_id == task.span_id
    assert attrs(chat)["fs9.agent"] == "thinker"
    assert task.start_time_unix_nano <= chat.start_time_unix_nano <= chat.end_time_unix_nano \
        <= task.end_time_unix_nano
    assert [ev.name for ev in task.events] == ["started", "step tool_call"]
    assert not m.bugs(), m.bugs()
