"""A deterministic language model on 127.0.0.1, for tests and benchmarks.

It speaks the OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models,
POST /v1/embeddings) and Ollama's own (POST /api/chat, /api/show, /api/embed,
GET /api/tags, /api/ps, /api/version), streaming or not, so fs9 exercises the
real HTTP client path of llama-index. Standard library only.

What it answers depends on the LAST message of the request (its text content):
  CALL name {json}   one line per call, anywhere in the message: the reply is
                     those tool calls (ids call_1, call_2, ...), finish_reason
                     tool_calls, empty content. Malformed JSON is passed through
                     verbatim as the OpenAI arguments string ({} for Ollama).
  SLEEP seconds      wait that long before answering (a slow model).
  FAIL status [msg]  answer with that HTTP status and an error JSON.
  otherwise          "echo: " + the content ("tool said: " + content for role tool).
A system message starting with SUMMARIZE makes the reply "summary: " + the first
8 words of each non-system message joined by " | " (it wins over CALL lines;
SLEEP and FAIL still apply). max_tokens / max_completion_tokens (OpenAI) or
options.num_predict (Ollama) cut the content to that many words, finish_reason
"length". Usage: prompt = words over all messages' contents + 1 per message;
completion = words of the content, or of json.dumps([{"name", "arguments"}, ...])
for tool calls.

Quirks of real servers, each on when named in `quirks` (LLAMA_CPP_PYTHON: all of
llama-cpp-python's server, 0.3.x, chat_format chatml-function-calling):
  tools_need_choice       tools without a tool_choice are not offered (as "none":
                          CALL lines are ignored, the reply is the echo)
  no_auto_stream_tools    tools with tool_choice "auto" (or "required") and stream:
                          the server fails inside the stream ("Automatic streaming
                          tool choice is not supported", on its console): the client
                          gets 200 and a stream that breaks off before its first event
  no_usage                a stream never carries usage (stream_options ignored);
                          a whole reply still does
  null_content_refused    an assistant message whose content is null (OpenAI's shape
                          for one that only calls tools) is a 500 naming it
  repeats_call_ids        each streamed piece of a tool call repeats its id and name
                          (OpenAI sends them in the first piece only)
Whatever the quirks, tool_choice "none" offers no tools and a named one only that.

`.requests` holds (path, JSON body or None, headers with lower-cased names) for
every request, `.streamed_at` the time (monotonic) each streamed content piece was
sent; `.in_flight` / `.max_in_flight` count chat and embedding requests being
answered. `stop()` closes every open connection (keep-alive ones and streams
mid-flight, sleeping requests are dropped unanswered); `start()` serves the same
port again. `release()` ends the SLEEPs under way: those requests are
answered at once (so a test can hold requests in flight as long as it needs).
"""
from __future__ import annotations

import errno
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CALL = re.compile(r"^[ \t]*CALL[ \t]+(\S+)[ \t]*(.*?)[ \t]*$", re.M)
SLEEP = re.compile(r"^[ \t]*SLEEP[ \t]+(\d+(?:\.\d*)?|\.\d+)[ \t]*$", re.M)
FAIL = re.compile(r"^[ \t]*FAIL[ \t]+(\d{3})[ \t]*(.*?)[ \t]*$", re.M)
CHUNK = re.compile(r"\s*\S+\s*")
EMBED_DIM = 64
QUIRKS = frozenset({"tools_need_choice", "no_auto_stream_tools", "no_usage",
                    "repeats_call_ids", "null_content_refused"})
LLAMA_CPP_PYTHON = QUIRKS


def text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of an OpenAI content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content
                       if isinstance(p, dict) and p.get("type", "text") == "text")
    return str(content)


def words(text: str) -> int:
    return len(text.split())


def chunks(text: str) -> list[str]:
    """The text cut into words, each with the whitespace around it: "".join() == text."""
    parts = CHUNK.findall(text)
    return parts if "".join(parts) == text else ([text] if text else [])


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # as the model wrote it: JSON, or not

    @property
    def parsed(self) -> Any:
        """The arguments as JSON values, or the text as written when it is not JSON."""
        try:
            return json.loads(self.arguments or "{}")
        except ValueError:
            return self.arguments

    @property
    def args(self) -> dict:
        """The arguments as Ollama sends them: an object ({} when they are not one)."""
        return self.parsed if isinstance(self.parsed, dict) else {}

    @property
    def openai_arguments(self) -> str:
        """The arguments as OpenAI sends them: a JSON string (verbatim when malformed)."""
        parsed = self.parsed
        return self.arguments if parsed is self.arguments else json.dumps(parsed)


@dataclass
class Reply:
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    sleep_s: float = 0.0
    fail: int | None = None
    fail_message: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def reply_for(messages: list[dict], max_tokens: int | None = None,
              offered: set[str] | None = None) -> Reply:
    """What the model answers to these messages (OpenAI or Ollama shaped); offered:
    the tools it may call (None: any)."""
    texts = [text_of(m.get("content")) for m in messages]
    last = messages[-1] if messages else {"role": "user", "content": ""}
    said = texts[-1] if texts else ""
    r = Reply(prompt_tokens=sum(words(t) for t in texts) + len(messages))
    if m := SLEEP.search(said):
        r.sleep_s = float(m.group(1))
    if m := FAIL.search(said):
        r.fail, r.fail_message = int(m.group(1)), m.group(2) or f"FAIL {m.group(1)}"
    summarize = any(m.get("role") == "system" and t.lstrip().startswith("SUMMARIZE")
                    for m, t in zip(messages, texts))
    calls = [(n, a) for n, a in CALL.findall(said) if offered is None or n in offered]
    if summarize:
        r.content = "summary: " + " | ".join(
            " ".join(t.split()[:8]) for m, t in zip(messages, texts) if m.get("role") != "system")
    elif calls:
        r.tool_calls = [ToolCall(f"call_{i}", name, args)
                        for i, (name, args) in enumerate(calls, 1)]
        r.finish_reason = "tool_calls"
        r.completion_tokens = words(json.dumps(
            [{"name": c.name, "arguments": c.parsed} for c in r.tool_calls]))
        return r
    else:
        r.content = ("tool said: " if last.get("role") == "tool" else "echo: ") + said
    if max_tokens is not None and max_tokens > 0 and words(r.content) > max_tokens:
        r.content = "".join(chunks(r.content)[:max_tokens]).rstrip()
        r.finish_reason = "length"
    r.completion_tokens = words(r.content)
    return r


def embed(text: str) -> list[float]:
    v = [0.0] * EMBED_DIM
    for w in re.findall(r"\w+", text.lower()):
        v[int(hashlib.md5(w.encode()).hexdigest(), 16) % EMBED_DIM] += 1.0
    return v


class _HTTP(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # clients that go away, connections stop() cuts: not news


class ModelServer:
    """A deterministic model on http://127.0.0.1:port (0: a free one), serving at once."""

    def __init__(self, port: int = 0, api_key: str | None = None, token_delay_s: float = 0.0,
                 delay_s: float = 0.0, context_length: int = 8192,
                 quirks: frozenset[str] = frozenset()) -> None:
        if set(quirks) - QUIRKS:
            raise ValueError(f"unknown quirks: {sorted(set(quirks) - QUIRKS)}")
        self.quirks = frozenset(quirks)
        self.port = port
        self.api_key = api_key
        self.token_delay_s = token_delay_s
        self.delay_s = delay_s
        self.context_length = context_length
        self.requests: list[tuple[str, Any, dict[str, str]]] = []
        self.streamed_at: list[float] = []  # when each streamed content piece was sent
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._life = threading.Lock()
        self._ids = 0
        self._wakeup = threading.Event()  # set: the pauses under way end (stop, release)
        self.http: _HTTP | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Serve (again, on the same port once it has one)."""
        with self._life:
            if self.http is not None:
                return
            deadline = time.monotonic() + 5
            while True:
                try:
                    http = _HTTP(("127.0.0.1", self.port), self._handler())
                    break
                except OSError as e:
                    if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            http.stopping = threading.Event()
            http.connections = set()
            self._wakeup = threading.Event()
            self.port = http.server_address[1]
            self.http = http
            threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True, name=f"modelserver:{self.port}").start()

    def stop(self) -> None:
        """Stop listening and cut every open connection: clients see the server gone."""
        with self._life:
            http, self.http = self.http, None
            if http is None:
                return
            http.stopping.set()
            self._wakeup.set()
            http.shutdown()
            http.server_close()
            for conn in list(http.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def release(self) -> None:
        """End every SLEEP (and delay) under way now: those requests are answered."""
        wakeup, self._wakeup = self._wakeup, threading.Event()
        wakeup.set()

    def reset_stats(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_in_flight = self.in_flight

    def __enter__(self) -> "ModelServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _next_id(self) -> int:
        with self._lock:
            self._ids += 1
            return self._ids

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                self.server.connections.add(self.connection)

            def finish(self):
                self.server.connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def log_message(self, *args):
                pass

            # --- plumbing

            def send_json(self, status: int, obj: Any) -> None:
                out = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def error(self, status: int, message: str) -> None:
                if self.path.startswith("/api/"):
                    self.send_json(status, {"error": message})
                else:
                    kind = {400: "invalid_request_error", 401: "invalid_request_error",
                            404: "not_found_error", 429: "rate_limit_exceeded"}.get(
                        status, "server_error")
                    self.send_json(status, {"error": {
                        "message": message, "type": kind, "param": None,
                        "code": "invalid_api_key" if status == 401 else str(status)}})

            def begin_stream(self, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

            def chunk(self, data: str) -> None:
                raw = data.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
                self.wfile.flush()

            def end_stream(self) -> None:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def pause(self, seconds: float) -> bool:
                """Wait; False when the server stopped meanwhile (drop the request)."""
                if seconds > 0:
                    server._wakeup.wait(seconds)  # ended early by stop() or release()
                    if self.server.stopping.is_set():
                        self.close_connection = True
                        return False
                return not self.server.stopping.is_set()

            # --- requests

            def do_GET(self):
                self.route(None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    server.requests.append((self.path, raw.decode(errors="replace"),
                                            self.headers_dict()))
                    return self.error(400, "body is not JSON")
                self.route(body)

            def headers_dict(self) -> dict[str, str]:
                return {k.lower(): v for k, v in self.headers.items()}

            def route(self, body: Any) -> None:
                path = self.path.split("?", 1)[0].rstrip("/") or "/"
                server.requests.append((path, body, self.headers_dict()))
                if server.api_key is not None and \
                        self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self.error(401, "Incorrect API key provided.")
                post = body is not None
                if post and path == "/v1/chat/completions":
                    return self.model_call(self.openai_chat, body)
                if post and path == "/api/chat":
                    return self.model_call(self.ollama_chat, body)
                if post and path in ("/v1/embeddings", "/api/embed"):
                    return self.model_call(self.embeddings, body)
                if post and path == "/api/show":
                    return self.send_json(200, self.show(body))
                if not post and path == "/v1/models":
                    return self.send_json(200, {"object": "list", "data": [
                        {"id": "echo", "object": "model", "created": 0, "owned_by": "fs9"}]})
                if not post and path in ("/api/tags", "/api/ps"):
                    return self.send_json(200, {"models": [self.model_entry("echo")]})
                if not post and path == "/api/version":
                    return self.send_json(200, {"version": "0.12.0"})
                if not post and path == "/":
                    out = b"Ollama is running"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    return self.wfile.write(out)
                self.error(404, f"no such endpoint: {self.command} {path}")

            def model_call(self, answer, body: dict) -> None:
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if self.pause(server.delay_s):
                        answer(body)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def reply(self, body: dict, max_tokens: Any,
                      offered: set[str] | None = None) -> Reply | None:
                """The reply, after its SLEEP; None when it was answered (FAIL) or dropped."""
                messages = body.get("messages")
                if not isinstance(messages, list):
                    self.error(400, "messages: a list is required")
                    return None
                try:
                    max_tokens = int(max_tokens) if max_tokens is not None else None
                except (TypeError, ValueError):
                    max_tokens = None
                r = reply_for(messages, max_tokens, offered)
                if not self.pause(r.sleep_s):
                    return None
                if r.fail is not None:
                    self.error(r.fail, r.fail_message)
                    return None
                return r

            # --- OpenAI

            def offered(self, body: dict) -> set[str] | None:
                """The tools a call may use: tool_choice as OpenAI reads it, or as the
                quirks do (None: any, as before tools were checked)."""
                choice = body.get("tool_choice")
                names = {t.get("function", {}).get("name") for t in body.get("tools") or ()
                         if isinstance(t, dict)}
                if choice == "none" or (choice is None and "tools_need_choice" in server.quirks):
                    return set()
                if isinstance(choice, dict):
                    return {(choice.get("function") or {}).get("name")} & names
                return None

            def openai_chat(self, body: dict) -> None:
                if "null_content_refused" in server.quirks and any(
                        isinstance(m, dict) and m.get("role") == "assistant" and
                        m.get("content") is None for m in body.get("messages") or ()):
                    return self.error(500, "validation error: messages: assistant content: "
                                           "Input should be a valid string")
                if body.get("stream") and body.get("tools") and \
                        body.get("tool_choice") in ("auto", "required") and \
                        "no_auto_stream_tools" in server.quirks:
                    self.begin_stream("text/event-stream")  # then the handler raises:
                    self.close_connection = True  # the chunked body is never ended
                    return
                r = self.reply(body, body.get("max_completion_tokens", body.get("max_tokens")),
                               self.offered(body))
                if r is None:
                    return
                model = body.get("model") or "echo"
                cid = f"chatcmpl-{server._next_id()}"
                created = int(time.time())
                usage = {"prompt_tokens": r.prompt_tokens,
                         "completion_tokens": r.completion_tokens,
                         "total_tokens": r.total_tokens}
                if not body.get("stream"):
                    message: dict[str, Any] = {"role": "assistant",
                                               "content": None if r.tool_calls else r.content}
                    if r.tool_calls:
                        message["tool_calls"] = [
                            {"id": c.id, "type": "function",
                             "function": {"name": c.name, "arguments": c.openai_arguments}}
                            for c in r.tool_calls]
                    return self.send_json(200, {
                        "id": cid, "object": "chat.completion", "created": created,
                        "model": model, "system_fingerprint": "fs9-echo",
                        "choices": [{"index": 0, "message": message, "logprobs": None,
                                     "finish_reason": r.finish_reason}],
                        "usage": usage})

                def event(delta: dict | None, finish: str | None = None, **extra) -> None:
                    obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
                           "model": model, "system_fingerprint": "fs9-echo",
                           "choices": [] if delta is None else [
                               {"index": 0, "delta": delta, "logprobs": None,
                                "finish_reason": finish}], **extra}
                    self.chunk(f"data: {json.dumps(obj)}\n\n")

                self.begin_stream("text/event-stream")
                event({"role": "assistant", "content": "" if not r.tool_calls else None})
                first = True
                for part in chunks(r.content):
                    if not first and not self.pause(server.token_delay_s):
                        return
                    first = False
                    event({"content": part})
                    server.streamed_at.append(time.monotonic())
                for i, c in enumerate(r.tool_calls):
                    if not self.pause(server.token_delay_s):
                        return
                    event({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                           "function": {"name": c.name, "arguments": ""}}]})
                    again = {"id": c.id, "type": "function"} \
                        if "repeats_call_ids" in server.quirks else {}
                    for frag in chunks(c.openai_arguments):
                        if not self.pause(server.token_delay_s):
                            return
                        event({"tool_calls": [{"index": i, **again, "function": {
                            **({"name": c.name} if again else {}), "arguments": frag}}]})
                event({}, r.finish_reason)
                if (body.get("stream_options") or {}).get("include_usage") and \
                        "no_usage" not in server.quirks:
                    event(None, usage=usage)
                self.chunk("data: [DONE]\n\n")
                self.end_stream()

            def embeddings(self, body: dict) -> None:
                texts = body.get("input")
                texts = [texts] if isinstance(texts, str) else list(texts or [])
                n = sum(words(str(t)) for t in texts)
                if self.path.startswith("/api/"):
                    return self.send_json(200, {
                        "model": body.get("model") or "echo",
                        "embeddings": [embed(str(t)) for t in texts],
                        "prompt_eval_count": n})
                self.send_json(200, {"object": "list", "model": body.get("model") or "echo",
                                     "data": [{"object": "embedding", "index": i,
                                               "embedding": embed(str(t))}
                                              for i, t in enumerate(texts)],
                                     "usage": {"prompt_tokens": n, "total_tokens": n}})

            # --- Ollama

            def model_entry(self, name: str) -> dict:
                return {"name": name, "model": name, "modified_at": "2025-01-01T00:00:00Z",
                        "size": 1, "digest": hashlib.sha256(name.encode()).hexdigest(),
                        "details": {"format": "gguf", "family": "echo", "families": ["echo"],
                                    "parameter_size": "0B", "quantization_level": "none"}}

            def show(self, body: dict) -> dict:
                return {"modelfile": "", "parameters": "", "template": "{{ .Prompt }}",
                        "details": self.model_entry(body.get("model") or "echo")["details"],
                        "model_info": {"general.architecture": "echo",
                                       "echo.context_length": server.context_length},
                        "capabilities": ["completion", "tools"],
                        "modified_at": "2025-01-01T00:00:00Z"}

            def ollama_chat(self, body: dict) -> None:
                options = body.get("options") or {}
                r = self.reply(body, options.get("num_predict"))
                if r is None:
                    return
                model = body.get("model") or "echo"
                started = time.monotonic_ns()

                def line(content: str, done: bool, tool_calls: list | None = None) -> dict:
                    message: dict[str, Any] = {"role": "assistant", "content": content}
                    if tool_calls:
                        message["tool_calls"] = tool_calls
                    obj: dict[str, Any] = {
                        "model": model,
                        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
                        "message": message, "done": done}
                    if done:
                        took = max(time.monotonic_ns() - started, 1)
                        obj.update(done_reason="length" if r.finish_reason == "length" else "stop",
                                   total_duration=took, load_duration=0,
                                   prompt_eval_count=r.prompt_tokens,
                                   prompt_eval_duration=took // 2,
                                   eval_count=r.completion_tokens, eval_duration=took // 2)
                    return obj

                calls = [{"function": {"name": c.name, "arguments": c.args}}
                         for c in r.tool_calls]
                if not body.get("stream", True):
                    return self.send_json(200, line(r.content, True, calls))
                self.begin_stream("application/x-ndjson")
                first = True
                for part in chunks(r.content):
                    if not first and not self.pause(server.token_delay_s):
                        return
                    first = False
                    self.chunk(json.dumps(line(part, False)) + "\n")
                    server.streamed_at.append(time.monotonic())
                if calls:
                    if not first and not self.pause(server.token_delay_s):
                        return
                    self.chunk(json.dumps(line("", False, calls)) + "\n")
                self.chunk(json.dumps(line("", True)) + "\n")
                self.end_stream()

        return Handler
