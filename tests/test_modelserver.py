"""The deterministic model server (tests/modelserver.py) driven by the real clients
fs9 uses: llama-index's OpenAILike (openai + httpx) and Ollama (ollama + httpx),
streaming and not, sync, under asyncio and under trio. No FUSE."""
import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import httpx
import ollama
import openai
import pytest
import trio
from llama_index.core.llms import ChatMessage
from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.llms.ollama import Ollama
from llama_index.llms.openai_like import OpenAILike

from conftest import wait_for
from modelserver import ModelServer, reply_for

TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]
CALLS = 'please add\nCALL add {"a": 1, "b": 2}\nCALL ls {"path": "/n/x"}'


@pytest.fixture
def server():
    with ModelServer() as s:
        yield s


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


def openai_llm(server: ModelServer, **kw) -> OpenAILike:
    args = dict(model="echo-1", api_base=server.url + "/v1", api_key=server.api_key or "none",
                is_chat_model=True, is_function_calling_model=True, context_window=4096,
                max_retries=0, timeout=5)
    return OpenAILike(**{**args, **kw})


def ollama_llm(server: ModelServer, **kw) -> Ollama:
    args = dict(model="echo-1", base_url=server.url, request_timeout=5)
    if server.api_key:
        args["headers"] = {"Authorization": f"Bearer {server.api_key}"}
    return Ollama(**{**args, **kw})


async def in_asyncio(make_coro):
    """Run an asyncio coroutine (made in the loop's thread) from trio. The LLM objects
    cache their async HTTP clients: one made under another event loop fails (Ollama:
    RuntimeError "Event loop is closed"; OpenAILike: APIConnectionError), so each
    asyncio.run gets LLMs of its own."""
    return await trio.to_thread.run_sync(lambda: asyncio.run(make_coro()))


async def collect(llm, messages, **kw) -> list:
    gen = await llm.astream_chat(messages, **kw)
    return [r async for r in gen]


def chats(server: ModelServer) -> list[dict]:
    return [body for path, body, _ in server.requests
            if path in ("/v1/chat/completions", "/api/chat")]


# --- the model's rules


def test_reply_rules():
    r = reply_for([{"role": "system", "content": "be brief"},
                   {"role": "user", "content": "hi there"}])
    assert (r.content, r.prompt_tokens, r.completion_tokens) == ("echo: hi there", 6, 3)
    r = reply_for([{"role": "tool", "content": "42"}])
    assert r.content == "tool said: 42"
    r = reply_for([{"role": "user", "content": [{"type": "text", "text": "a b"}]}], max_tokens=2)
    assert (r.content, r.finish_reason) == ("echo: a", "length")
    r = reply_for([{"role": "user", "content": CALLS}])
    assert [(c.id, c.name, c.args) for c in r.tool_calls] == [
        ("call_1", "add", {"a": 1, "b": 2}), ("call_2", "ls", {"path": "/n/x"})]
    assert (r.content, r.finish_reason) == ("", "tool_calls")
    assert r.completion_tokens == len(json.dumps([
        {"name": "add", "arguments": {"a": 1, "b": 2}},
        {"name": "ls", "arguments": {"path": "/n/x"}}]).split())
    r = reply_for([{"role": "user", "content": "x\nSLEEP 0.5\nFAIL 503 overloaded"}])
    assert (r.sleep_s, r.fail, r.fail_message) == (0.5, 503, "overloaded")
    r = reply_for([{"role": "system", "content": "SUMMARIZE the conversation"},
                   {"role": "user", "content": "one two three four five six seven eight nine"},
                   {"role": "assistant", "content": "short"},
                   {"role": "user", "content": "CALL ls {}"}])
    assert r.content == "summary: one two three four five six seven eight | short | CALL ls {}"
    assert not r.tool_calls


# --- OpenAI-compatible, through llama-index's OpenAILike


def test_openai_chat_text_usage_and_options(server):
    llm = openai_llm(server)
    r = llm.chat(user("hello there"))
    assert r.message.content == "echo: hello there"
    assert r.additional_kwargs == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert r.raw.usage.total_tokens == 6 and r.raw.choices[0].finish_reason == "stop"
    r = llm.chat(user("one two three four"), max_tokens=2, temperature=0.7, tools=TOOLS)
    assert r.message.content == "echo: one" and r.raw.choices[0].finish_reason == "length"
    body = chats(server)[-1]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("echo-1", 2, 0.7)
    assert body["tools"] == TOOLS and body["stream"] is False


def test_openai_chat_tool_calls(server):
    llm = openai_llm(server)
    r = llm.chat(user(CALLS), tools=TOOLS)
    assert r.raw.choices[0].finish_reason == "tool_calls"
    assert not r.message.content
    calls = r.message.additional_kwargs["tool_calls"]  # openai ChatCompletionMessageToolCall
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("call_1", "add", {"a": 1, "b": 2}), ("call_2", "ls", {"path": "/n/x"})]
    blocks = [b for b in r.message.blocks if isinstance(b, ToolCallBlock)]
    assert [(b.tool_call_id, b.tool_name, b.tool_kwargs) for b in blocks] == [
        ("call_1", "add", '{"a": 1, "b": 2}'), ("call_2", "ls", '{"path": "/n/x"}')]
    sel = llm.get_tool_calls_from_response(r)
    assert [(s.tool_id, s.tool_name, s.tool_kwargs) for s in sel] == [
        ("call_1", "add", {"a": 1, "b": 2}), ("call_2", "ls", {"path": "/n/x"})]
    assert r.additional_kwargs["completion_tokens"] == reply_for(
        [{"role": "user", "content": CALLS}]).completion_tokens
    # the tool's answer goes back with its call id
    history = user(CALLS) + [r.message, ChatMessage(role="tool", content="3",
                                                    additional_kwargs={"tool_call_id": "call_1"})]
    assert llm.chat(history).message.content == "tool said: 3"
    sent = chats(server)[-1]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_1" and sent[2]["tool_call_id"] == "call_1"


async def test_openai_astream_text_tools_and_usage(server):
    def llm():
        return openai_llm(server, additional_kwargs={"stream_options": {"include_usage": True}})
    out = await in_asyncio(lambda: collect(llm(), user("the quick  brown fox"), tools=TOOLS))
    assert [r.delta for r in out if r.delta] == ["echo: ", "the ", "quick  ", "brown ", "fox"]
    assert out[-1].message.content == "echo: the quick  brown fox"
    assert out[-1].additional_kwargs == {"prompt_tokens": 5, "completion_tokens": 5,
                                         "total_tokens": 5 + 5}
    assert out[-1].raw.choices == [] and out[-1].raw.usage.completion_tokens == 5
    assert chats(server)[-1]["tools"] == TOOLS

    out = await in_asyncio(lambda: collect(llm(), user(CALLS), tools=TOOLS))
    last = out[-1]
    calls = last.message.additional_kwargs["tool_calls"]  # accumulated ChoiceDeltaToolCall
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("call_1", "add", {"a": 1, "b": 2}), ("call_2", "ls", {"path": "/n/x"})]
    sel = llm().get_tool_calls_from_response(last)
    assert [(s.tool_id, s.tool_name, s.tool_kwargs) for s in sel] == [
        ("call_1", "add", {"a": 1, "b": 2}), ("call_2", "ls", {"path": "/n/x"})]
    assert all(not r.delta for r in out) and last.additional_kwargs["total_tokens"] > 0

    # without stream_options.include_usage (OpenAILike's default) no usage arrives
    out = await in_asyncio(lambda: collect(openai_llm(server), user("hi")))
    assert "stream_options" not in chats(server)[-1]
    assert all(r.additional_kwargs == {} for r in out)


def test_openai_sync_stream(server):
    llm = openai_llm(server)
    out = list(llm.stream_chat(user("a b c"), stream_options={"include_usage": True}))
    assert "".join(r.delta for r in out) == "echo: a b c"
    assert out[-1].additional_kwargs["completion_tokens"] == 4


# --- Ollama's API, through llama-index's Ollama


def test_ollama_chat_text_usage_tools_and_options(server):
    llm = ollama_llm(server)
    r = llm.chat(user("hello there"))
    assert r.message.content == "echo: hello there"
    assert r.raw["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert r.raw["done_reason"] == "stop" and r.raw["eval_count"] == 3
    assert r.additional_kwargs == {}
    # context_window unset: the client asks /api/show once
    assert [p for p, _, _ in server.requests] == ["/api/show", "/api/chat"]
    assert chats(server)[-1]["options"]["num_ctx"] == server.context_length

    r = llm.chat(user(CALLS), tools=TOOLS)
    blocks = [b for b in r.message.blocks if isinstance(b, ToolCallBlock)]
    assert [(b.tool_call_id, b.tool_name, b.tool_kwargs) for b in blocks] == [
        (None, "add", {"a": 1, "b": 2}), (None, "ls", {"path": "/n/x"})]
    sel = llm.get_tool_calls_from_response(r)
    assert [(s.tool_id, s.tool_name, s.tool_kwargs) for s in sel] == [
        ("add", "add", {"a": 1, "b": 2}), ("ls", "ls", {"path": "/n/x"})]
    assert chats(server)[-1]["tools"] == TOOLS
    history = user(CALLS) + [r.message, ChatMessage(role="tool", content="3")]
    assert llm.chat(history).message.content == "tool said: 3"

    # per call, Ollama's chat() drops max_tokens/temperature: they live on the instance
    llm.chat(user("a b c"), max_tokens=1, temperature=0.9)
    assert chats(server)[-1]["options"] == {"temperature": None, "num_ctx": server.context_length}
    short = ollama_llm(server, context_window=100, temperature=0.2,
                       additional_kwargs={"num_predict": 2})
    r = short.chat(user("one two three"))
    assert r.message.content == "echo: one" and r.raw["done_reason"] == "length"
    assert chats(server)[-1]["options"] == {"temperature": 0.2, "num_ctx": 100, "num_predict": 2}


async def test_ollama_astream_text_tools_and_usage(server):
    def llm():
        return ollama_llm(server, context_window=4096)
    out = await in_asyncio(lambda: collect(llm(), user("the quick brown fox"), tools=TOOLS))
    assert [r.delta for r in out if r.delta] == ["echo: ", "the ", "quick ", "brown ", "fox"]
    assert out[-1].message.content == "echo: the quick brown fox"
    assert out[-1].raw["usage"] == {"prompt_tokens": 5, "completion_tokens": 5,
                                    "total_tokens": 10}
    assert all("usage" not in r.raw for r in out[:-1])
    assert chats(server)[-1]["tools"] == TOOLS and chats(server)[-1]["stream"] is True

    out = await in_asyncio(lambda: collect(llm(), user(CALLS), tools=TOOLS))
    blocks = [b for b in out[-1].message.blocks if isinstance(b, ToolCallBlock)]
    assert [(b.tool_name, b.tool_kwargs) for b in blocks] == [
        ("add", {"a": 1, "b": 2}), ("ls", {"path": "/n/x"})]
    assert out[-1].raw["usage"]["completion_tokens"] > 0


# --- straight under trio: httpx runs on trio through anyio


async def test_trio_native_async_clients(server):
    for llm in (openai_llm(server), ollama_llm(server, context_window=4096)):
        assert (await llm.achat(user("hi"))).message.content == "echo: hi"
        out = await collect(llm, user(CALLS), tools=TOOLS)
        assert [s.tool_name for s in llm.get_tool_calls_from_response(out[-1])] == ["add", "ls"]
    # a trio cancel scope abandons a slow answer at once
    with trio.move_on_after(0.2) as scope:
        await openai_llm(server).achat(user("SLEEP 5"))
    assert scope.cancelled_caught


# --- failures


def test_api_key_enforced(server):
    server.api_key = "sekret"
    assert openai_llm(server).chat(user("x")).message.content == "echo: x"
    assert ollama_llm(server, context_window=100).chat(user("x")).message.content == "echo: x"
    assert all(h.get("authorization") == "Bearer sekret" for _, _, h in server.requests)
    with pytest.raises(openai.AuthenticationError) as e:
        openai_llm(server, api_key="wrong").chat(user("x"))
    assert e.value.status_code == 401 and e.value.body["message"].startswith("Incorrect API key")
    with pytest.raises(openai.AuthenticationError):
        list(openai_llm(server, api_key="wrong").stream_chat(user("x")))
    with pytest.raises(ollama.ResponseError) as e:
        Ollama(model="m", base_url=server.url, context_window=100).chat(user("x"))
    assert e.value.status_code == 401
    req = urllib.request.Request(server.url + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 401 and "error" in json.load(e.value)


@pytest.mark.parametrize("status, cls", [(400, openai.BadRequestError),
                                         (429, openai.RateLimitError),
                                         (500, openai.InternalServerError),
                                         (503, openai.InternalServerError)])
def test_fail_gives_clean_errors(server, status, cls):
    with pytest.raises(cls) as e:
        openai_llm(server).chat(user(f"x\nFAIL {status} nope"))
    assert e.value.status_code == status and e.value.body["message"] == "nope"
    with pytest.raises(cls):
        list(openai_llm(server).stream_chat(user(f"FAIL {status}")))
    llm = ollama_llm(server, context_window=100)
    for call in (lambda: llm.chat(user(f"FAIL {status} nope")),
                 lambda: list(llm.stream_chat(user(f"FAIL {status} nope")))):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert (e.value.status_code, e.value.error) == (status, "nope")


def test_sleep_makes_timeouts(server):
    t = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        openai_llm(server, timeout=0.3).chat(user("SLEEP 3"))
    with pytest.raises(openai.APITimeoutError):
        list(openai_llm(server, timeout=0.3).stream_chat(user("SLEEP 3")))
    llm = ollama_llm(server, context_window=100, request_timeout=0.3)
    with pytest.raises(httpx.ReadTimeout):
        llm.chat(user("SLEEP 3"))
    with pytest.raises(httpx.ReadTimeout):
        list(llm.stream_chat(user("SLEEP 3")))
    assert time.monotonic() - t < 10  # four 0.3 s timeouts, not four 3 s sleeps
    # SLEEP under the timeout only delays
    t = time.monotonic()
    assert openai_llm(server).chat(user("x\nSLEEP 0.3")).message.content == "echo: x\nSLEEP 0.3"
    assert time.monotonic() - t >= 0.3


def test_stop_and_start_again(server):
    oa, ol = openai_llm(server), ollama_llm(server, context_window=100)
    assert oa.chat(user("a")).message.content == "echo: a"
    assert ol.chat(user("a")).message.content == "echo: a"
    port = server.port
    server.stop()  # also cuts the clients' pooled keep-alive connections
    with pytest.raises(openai.APIConnectionError):
        oa.chat(user("b"))
    with pytest.raises(openai.APIConnectionError):
        list(oa.stream_chat(user("b")))
    with pytest.raises(ConnectionError):
        ol.chat(user("b"))
    with pytest.raises(httpx.ConnectError):  # the ollama client does not wrap it here
        list(ol.stream_chat(user("b")))
    server.start()
    assert server.port == port
    assert oa.chat(user("c")).message.content == "echo: c"
    assert "".join(r.delta for r in ol.stream_chat(user("c"))) == "echo: c"


def test_stop_mid_stream_and_mid_sleep(server):
    server.token_delay_s = 0.02
    long = " ".join(["w"] * 200)
    for llm in (openai_llm(server), ollama_llm(server, context_window=100)):
        got, stopper = [], threading.Thread(target=server.stop)
        with pytest.raises(httpx.RemoteProtocolError):  # raw httpx, not wrapped
            for r in llm.stream_chat(user(long)):
                got.append(r.delta)
                if "".join(got).split() and stopper.ident is None:
                    stopper.start()  # mid-stream: once the first word came
        stopper.join()
        assert 0 < len("".join(got).split()) < 100
        server.start()
    # mid-sleep: once the request is in flight (it sleeps 10 s)
    stopper = threading.Thread(target=lambda: wait_for(lambda: server.in_flight) and server.stop())
    stopper.start()
    t = time.monotonic()
    with pytest.raises(openai.APIConnectionError):
        openai_llm(server).chat(user("SLEEP 10"))
    assert time.monotonic() - t < 8  # the stop, not the 10 s sleep, ended it
    stopper.join()


# --- load


def test_in_flight_counts_concurrent_answers(server):
    llm = openai_llm(server, timeout=120)
    # each sleeps until released: all five are in flight together however slow the machine
    threads = [threading.Thread(target=llm.chat, args=(user("SLEEP 60"),)) for _ in range(5)]
    for th in threads:
        th.start()
    wait_for(lambda: server.in_flight == 5, what="five requests in flight")
    assert server.in_flight == 5
    server.release()
    for th in threads:
        th.join()
    # (a client has its answer a moment before the server's handler ends and counts it)
    wait_for(lambda: server.in_flight == 0, what="the five handlers ended")
    assert server.max_in_flight == 5
    server.reset_stats()
    assert (server.requests, server.max_in_flight) == ([], 0)
    llm.chat(user("x"))
    assert server.max_in_flight == 1


def test_delays():
    with ModelServer(token_delay_s=0.05, delay_s=0.1) as s:
        llm = openai_llm(s)
        t = time.monotonic()
        stamps = [time.monotonic() - t for r in llm.stream_chat(user("a b c d")) if r.delta]
        # the pieces' spacing as sent (as received, a late first piece shortens it)
        sent = s.streamed_at
        assert len(stamps) == 5 and stamps[0] >= 0.1 and sent[-1] - sent[0] >= 0.2


# --- the wire, raw


def post(url: str, body: dict) -> bytes:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return r.read()


def test_wire_formats(server):
    sse = post(server.url + "/v1/chat/completions", {
        "model": "x", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": 'CALL f {"k": "v w"}'}]}).decode()
    events = [e.removeprefix("data: ") for e in sse.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[1]["tool_calls"][0] == {"index": 0, "id": "call_1", "type": "function",
                                          "function": {"name": "f", "arguments": ""}}
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[2:-1])
    assert json.loads(args) == {"k": "v w"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 6

    lines = post(server.url + "/api/chat", {"model": "x", "messages": [
        {"role": "user", "content": "hi you"}]}).decode().splitlines()  # Ollama streams by default
    parts = [json.loads(x) for x in lines]
    assert [p["message"]["content"] for p in parts] == ["echo: ", "hi ", "you", ""]
    assert [p["done"] for p in parts] == [False, False, False, True]
    assert {"done_reason", "prompt_eval_count", "eval_count", "total_duration",
            "eval_duration"} <= parts[-1].keys()

    with urllib.request.urlopen(server.url + "/v1/models") as r:
        assert json.load(r)["data"][0]["object"] == "model"
    with urllib.request.urlopen(server.url + "/api/tags") as r:
        assert json.load(r)["models"][0]["name"]
    out = json.loads(post(server.url + "/v1/embeddings", {"model": "e", "input": ["a b", "c"]}))
    assert len(out["data"]) == 2 and len(out["data"][0]["embedding"]) > 0
    with pytest.raises(urllib.error.HTTPError) as e:
        post(server.url + "/v1/nothing", {})
    assert e.value.code == 404
