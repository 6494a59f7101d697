"""Traces over OTLP/HTTP (fs9 mount --otlp): a real collector endpoint on loopback that
decodes what arrives with OpenTelemetry's own protobuf messages; a real mount exporting
a task, a work_request by mail and its result, and a model call; and a mount without
the option, which loads no OpenTelemetry code at all."""
import http.server
import json
import os
import signal
import threading
import time

import pytest

from conftest import Mount, fs9, fuse_unavailable, wait_for

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


def exporters(pid: int) -> list[int]:
    """The traces' exporting processes the server pid started."""
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"fs9.kernel.traces" in argv:
            out.append(int(d))
    return out


def otel_maps(pid: int) -> list[str]:
    # the exporter's native code (protobuf's) is mapped where traces are built, so the
    # maps can tell
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split()[-1] for line in f
                       if "/opentelemetry/" in line or "/google/_upb/" in line})


def test_no_opentelemetry_code_is_loaded_in_the_server(tmp_path, collector):
    """Traced or not, the server never loads OpenTelemetry: the traced one's exporting
    process does, and it ends with the server, also with a kill -9 of it."""
    traced = Mount(tmp_path / "traced")
    plain = Mount(tmp_path / "plain")
    try:
        traced.mount("--otlp", collector.url)
        plain.mount()
        wait_for(lambda: exporters(traced.pid), what="the traced server's exporter")
        [exporter] = exporters(traced.pid)
        wait_for(lambda: otel_maps(exporter), what="the exporter's code in its process")
        plain.sh("echo 'spawn upper' > ctl && echo 'run x' > agents/upper/ctl"
                 " && cat agents/upper/out", check=True)
        traced.sh("echo 'spawn upper' > ctl && echo 'run x' > agents/upper/ctl"
                  " && cat agents/upper/out", check=True)
        wait_for(lambda: collector.named("fs9.task upper"), what="the traced task's span")
        assert otel_maps(plain.pid) == [] and otel_maps(traced.pid) == []
        assert exporters(plain.pid) == []
        os.kill(traced.pid, 9)
        wait_for(lambda: not os.path.exists(f"/proc/{exporter}"), timeout=30,
                 what="the exporter ending with its server")
    finally:
        traced.umount()
        plain.umount()
    assert not plain.bugs()


def test_an_unreachable_collector_slows_nothing_and_loses_no_work(tmp_path):
    import socket
    with socket.socket() as s:  # a loopback port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    m = Mount(tmp_path).mount("--otlp", closed)
    try:
        [exporter] = wait_for(lambda: exporters(m.pid), what="the exporter")
        m.sh("echo 'spawn upper' > ctl", check=True)
        for i in range(3):
            r = m.sh(f"echo 'run word{i}' > agents/upper/ctl && cat agents/upper/out",
                     timeout=30, check=True)
            assert r.stdout == f"WORD{i}\n"
    finally:
        m.umount()  # within the fixture's bounds: the exporter's flush is given up on
    assert not m.alive()
    assert not os.path.exists(f"/proc/{exporter}"), "the exporter outlived its server"
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


def test_the_exporter_outlives_the_thread_that_started_it(tmp_path, collector):
    """The exporter's parent-death signal is armed against the thread that forked it,
    and trio forks in a worker thread, which ends after 10 s idle: the exporter must
    not end with it (its queued spans lost, the log's events meanwhile skipped)."""
    m = Mount(tmp_path).mount("--otlp", collector.url)
    try:
        [first] = wait_for(lambda: exporters(m.pid), what="the exporter")
        # (the first one's forker happens to live on, running a job of the server's for
        # good: a restarted one is forked by a thread that goes idle)
        os.kill(first, signal.SIGKILL)
        [exporter] = wait_for(lambda: [e for e in exporters(m.pid) if e != first] or None,
                              timeout=30, what="the exporter started again")

        def trio_threads() -> int:
            n = 0
            for t in os.listdir(f"/proc/{m.pid}/task"):
                try:
                    with open(f"/proc/{m.pid}/task/{t}/comm") as f:
                        n += f.read().startswith("Trio thread")
                except OSError:
                    pass
            return n
        # until trio's idle worker threads (the forker among them) have ended, and a
        # little after (the signal is at once); the exporter must live throughout
        deadline, idle_since = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            assert os.path.exists(f"/proc/{exporter}"), "the exporter ended with a thread"
            if trio_threads():
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > 3:
                break
            time.sleep(0.2)
        assert idle_since is not None, "trio's worker threads never went idle"
        assert exporters(m.pid) == [exporter]
    finally:
        m.umount()
    assert not m.bugs(), m.bugs()


def test_the_exporter_imports_nothing_from_the_servers_working_directory(tmp_path):
    """`python -m` puts the working directory first on the module path, and the exporter
    runs as root, started again whenever it stops: a module planted in the directory
    the operator mounted from (one others can write to) must not run in it."""
    work = tmp_path / "work"
    (work / "opentelemetry").mkdir(parents=True)
    canary = tmp_path / "canary"
    (work / "opentelemetry" / "__init__.py").write_text(
        f"open({str(canary)!r}, 'w').write('ran')\nraise ImportError('planted')\n")
    m = Mount(tmp_path)
    r = fs9("mount", str(m.path), "--state", str(m.state), "--agents", str(m.agents),
            "--vault", str(m.vault), "--background", "--otlp", "http://127.0.0.1:9",
            cwd=work)
    assert r.returncode == 0, r.stderr
    m.pid = int(dict(w.split("=") for w in m.read("ctl").split())["pid"])
    try:
        [exporter] = wait_for(lambda: exporters(m.pid), what="the exporter")

        def loaded():  # the real OpenTelemetry, or the planted module (which ends it)
            try:
                return canary.exists() or otel_maps(exporter)
            except OSError:
                return True
        wait_for(loaded, timeout=60, what="the exporter loading OpenTelemetry")
        assert not canary.exists(), "the exporter ran a module from the server's cwd"
    finally:
        m.umount()
