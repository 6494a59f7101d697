"""How a model is reached: the scripted model in-process, real ones through llama-index.

Every provider answers `chat(messages, tools, max_tokens, temperature, emit,
tool_choice)`: messages, tools and tool_choice in OpenAI's shapes, `emit(text)` called
with each piece of the reply as it streams; it returns {content, tool_calls: [{id,
name, arguments}], finish_reason, tokens_in, tokens_out} (tokens None when the server
did not say: the kernel counts them). Failures are Fs9Error with an errno that
says what kind (ECONNREFUSED: unreachable, ETIMEDOUT, EIO: the server said no); a
ProviderFailure also says whether it is the provider's fault and worth a retry.
`probe()` says whether the model can be reached (None) or why not.

llama-index's clients are imported on a real model's first call, in a worker
thread (about 1.2 s); their async API then runs on trio itself (httpx speaks
trio), so a cancelled call (halt) ends at once and closes its connection.
"""
import contextlib
import errno
import json
import math
import os
import re

import trio

from ..errors import Fs9Error
from .. import heavy
from . import scripted

PROVIDERS = ("scripted", "openai", "ollama")


def make(name: str, conf: dict, origin: str):
    kind = conf.get("provider", "scripted")
    if kind == "scripted":
        return Scripted(name, conf, origin)
    if kind in ("openai", "ollama"):
        return LlamaIndex(name, conf, origin)
    raise Fs9Error(errno.EINVAL, f"{origin}: unknown provider {kind!r} "
                                 f"(known: {', '.join(PROVIDERS)})")


def number(conf: dict, key: str, default, origin: str):
    value = conf.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise Fs9Error(errno.EINVAL, f"{origin}: {key} must be a number >= 0")
    return value


class Scripted:
    """drivers/scripted.py's rules, answered in-process, streamed word by word."""

    def __init__(self, name: str, conf: dict, origin: str) -> None:
        self.model = conf.get("model", name)
        self.label = conf.get("label", scripted.LABEL)
        self.delay = number(conf, "token_delay_s", 0, origin)
        self.rules = scripted.load_script(conf["script"]) if conf.get("script") else []

    async def probe(self) -> str | None:
        return None

    async def chat(self, messages, tools, max_tokens, temperature, emit,
                   tool_choice=None) -> dict:
        content, calls = scripted.answer(self.rules, messages, tools)
        out = content.split(" ")[:max(max_tokens, 1)]
        for i, word in enumerate(out):
            if self.delay:
                await trio.sleep(self.delay)
            emit(word if i == 0 else " " + word)
        await trio.lowlevel.checkpoint()
        content = " ".join(out)
        calls = [{"id": f"call_{i + 1}", **c} for i, c in enumerate(calls)]
        return {"content": content, "tool_calls": calls,
                "finish_reason": "tool_calls" if calls else "stop",
                "tokens_in": scripted.prompt_tokens(messages),
                "tokens_out": scripted.words(content) + scripted.words(json.dumps(calls) if calls else "")}


class LlamaIndex:
    """An OpenAI-compatible server (OpenAILike) or Ollama, through llama-index."""

    def __init__(self, name: str, conf: dict, origin: str) -> None:
        self.kind = conf["provider"]
        self.model = conf.get("model", name)
        self.label = conf.get("label", f"{self.kind}: {self.model}")
        default = "http://127.0.0.1:11434" if self.kind == "ollama" else ""
        self.base = conf.get("api_base", default)
        if not self.base:
            raise Fs9Error(errno.EINVAL, f"{origin}: api_base is required (the server's URL, "
                                         "for example http://127.0.0.1:8000/v1)")
        key = conf.get("api_key") or os.environ.get(conf.get("api_key_env", ""), "")
        self.timeout = number(conf, "timeout_s", 60, origin)
        self.context_window = int(number(conf, "context_window", 8192, origin))
        self._key = key or "none"  # OpenAI's client insists on one
        self._llm = None
        self._building = trio.Lock()
        # whether the server streams tool calls: models.toml's word, else learned (None:
        # not known yet); `learned(**fields)`, set by the kernel, hears what was learned
        self.stream_tools = conf.get("stream_tools")
        if self.stream_tools is not None and not isinstance(self.stream_tools, bool):
            raise Fs9Error(errno.EINVAL, f"{origin}: stream_tools must be true or false")
        self.learned = None

    def _client(self):
        """The llama-index LLM (imported and built on first use, in a worker thread)."""
        if self._llm is None:
            if self.kind == "ollama":
                Ollama = heavy.load("llama_index.llms.ollama", "Ollama")
                self._llm = Ollama(model=self.model, base_url=self.base,
                                   request_timeout=self.timeout,
                                   context_window=self.context_window,
                                   headers={"Authorization": f"Bearer {self._key}"})
            else:
                OpenAILike = heavy.load("llama_index.llms.openai_like", "OpenAILike")
                # max_retries=0: fs9 reports a failure at once (retries are the caller's);
                # include_usage: a streamed reply ends with its token counts
                self._llm = OpenAILike(model=self.model, api_base=self.base, api_key=self._key,
                                       is_chat_model=True, is_function_calling_model=True,
                                       context_window=self.context_window,
                                       timeout=self.timeout, max_retries=0,
                                       additional_kwargs={"stream_options":
                                                          {"include_usage": True}})
        return self._llm

    async def probe(self) -> str | None:
        import httpx
        url = self.base.rstrip("/") + ("/api/tags" if self.kind == "ollama" else "/models")
        try:
            async with httpx.AsyncClient(timeout=5) as client:  # httpx runs on trio
                r = await client.get(url, headers={"Authorization": f"Bearer {self._key}"})
        except Exception as e:
            return f"cannot reach {self.base}: {e.__class__.__name__}: {e}"
        if r.status_code >= 400 and r.status_code != 404:
            return f"{url} answered {r.status_code}"
        return None

    async def _built(self):
        """The client, built once in a worker thread (first calls at once wait for
        one build: two threads importing llama-index at once can break its import)."""
        async with self._building:
            if self._llm is None:
                await trio.to_thread.run_sync(self._client)
        return self._llm

    async def chat(self, messages, tools, max_tokens, temperature, emit,
                   tool_choice=None) -> dict:
        """One reply, streamed (llama-index's async clients run on trio through httpx).
        With tools, tool_choice goes explicitly ("auto" unless the request names one):
        servers differ on what its absence means. A server that cannot stream tool
        calls (it says so, or ends the stream empty) gets the same call once more,
        not streamed, and from then on for this model (`stream_tools`)."""
        llm = self._llm or await self._built()
        kwargs: dict = {"tools": tools} if tools else {}
        if self.kind == "ollama":  # Ollama takes these per client, not per call
            options = {"num_predict": max_tokens}
            llm = llm.model_copy(update={"additional_kwargs": options,
                                         **({"temperature": temperature}
                                            if temperature is not None else {})})
        else:
            kwargs["max_tokens"] = max_tokens
            if tools:
                kwargs["tool_choice"] = tool_choice or "auto"
            if temperature is not None:
                kwargs["temperature"] = temperature
        chat = [self._message(m) for m in messages]
        if tools and self.stream_tools is False:
            return await self._whole(llm, chat, kwargs, emit)
        try:
            pieced = StreamedCalls()
            last, finish, emitted = await self._stream(llm, chat, kwargs, emit, pieced)
        except ProviderFailure as e:
            # llama-cpp-python raises inside the stream: the reply breaks off before a
            # byte of it (or ends empty, below); others may say so in words
            if tools and self.kind != "ollama" and not pieced.pieces and not pieced.text and (
                    STREAMED_TOOLS_REFUSED.search(e.text) or _broke(_names(e.__cause__))):
                self._learn(f"a streamed call with tools failed: {e.text}")
                return await self._whole(llm, chat, kwargs, emit)
            raise
        calls = [] if not tools or last is None else \
            pieced.calls() if self.kind != "ollama" else self._calls(llm, last)
        if not emitted and not calls and finish is None:
            if tools and self.kind != "ollama":  # llama-cpp-python's way of refusing
                self._learn("the server ended a streamed call with tools without a reply")
                return await self._whole(llm, chat, kwargs, emit)
            raise ProviderFailure(errno.EIO, f"model {self.model} at {self.base}: the stream "
                                             "ended without a reply")
        if calls and self.stream_tools is None:
            self.stream_tools = True
        return self._result(last, calls, finish)

    async def _stream(self, llm, chat, kwargs, emit, pieced):
        """(the last chunk, the finish_reason seen, whether text came); the tool calls
        pieced together from the chunks."""
        last, finish, emitted = None, None, False
        with self._failures():
            stream = await llm.astream_chat(chat, **kwargs)
            async for last in stream:
                if last.delta:
                    emitted = pieced.text = True
                    emit(last.delta)
                finish = _finish(last.raw) or finish
                pieced.add(last.raw)
        return last, finish, emitted

    async def _whole(self, llm, chat, kwargs, emit) -> dict:
        """The call not streamed; its text then goes to emit at once. After a stream
        the server broke off, the pooled connection it leaves may be dead: one more try
        on a fresh one."""
        try:
            with self._failures():
                response = await llm.achat(chat, **kwargs)
        except ProviderFailure as e:
            if not _broke(_names(e.__cause__)):
                raise
            with self._failures():
                response = await llm.achat(chat, **kwargs)
        if response.message.content:
            emit(response.message.content)
        calls = self._calls(llm, response) if kwargs.get("tools") else []
        return self._result(response, calls, _finish(response.raw))

    @contextlib.contextmanager
    def _failures(self):
        """A client's failures, and no reply within timeout_s, as ProviderFailure."""
        try:
            with trio.fail_after(self.timeout or math.inf):
                yield
        except trio.TooSlowError:
            raise ProviderFailure(errno.ETIMEDOUT, f"model {self.model} at {self.base}: no "
                                  f"reply within timeout_s = {self.timeout}")
        except ProviderFailure:
            raise
        except Exception as e:
            raise _failure(e, self) from e

    def _learn(self, why: str) -> None:
        self.stream_tools = False
        if self.learned is not None:
            self.learned(stream_tools=False, reason=why)

    def _calls(self, llm, response) -> list[dict]:
        return [{"id": c.tool_id if self.kind != "ollama" and c.tool_id else f"call_{i + 1}",
                 "name": c.tool_name,
                 "arguments": c.tool_kwargs if isinstance(c.tool_kwargs, dict) else {}}
                for i, c in enumerate(llm.get_tool_calls_from_response(
                    response, error_on_no_tool_call=False))]

    def _result(self, response, calls, finish) -> dict:
        """The reply; tokens None where the server said nothing of them (the kernel
        then counts them itself)."""
        usage = (response.raw or {}).get("usage") or {} if self.kind == "ollama" else \
            response.additional_kwargs
        content = response.message.content or ""
        return {"content": content, "tool_calls": calls,
                "finish_reason": "tool_calls" if calls else (finish or "stop"),
                "tokens_in": usage.get("prompt_tokens") or None,
                "tokens_out": usage.get("completion_tokens") or None}

    def _message(self, m: dict):
        """An OpenAI-shaped message as llama-index's ChatMessage for this provider."""
        ChatMessage = heavy.load("llama_index.core.llms", "ChatMessage")
        extra = {}
        if m.get("tool_call_id"):
            extra["tool_call_id"] = m["tool_call_id"]
        if m.get("tool_calls"):
            if self.kind == "ollama":
                extra["tool_calls"] = [{"function": {"name": c["function"]["name"], "arguments":
                                                     json.loads(c["function"]["arguments"] or "{}")}}
                                       for c in m["tool_calls"]]
            else:
                extra["tool_calls"] = m["tool_calls"]
        content = m.get("content") or ""
        if m.get("tool_calls") and not content and self.kind != "ollama":
            # llama-index sends an empty one as null (OpenAI's shape), which
            # llama-cpp-python's server refuses (500: "Input should be a valid string")
            content = " "
        return ChatMessage(role=m["role"], content=content, additional_kwargs=extra)


class StreamedCalls:
    """Tool calls as an OpenAI-style stream sends them, pieced together by index.
    OpenAI sends a call's id and name in its first piece only; llama-cpp-python repeats
    them in every piece (llama-index then makes "readreadread..." of the name): so an
    id or name already known is a repeat, and only arguments are pieces."""

    def __init__(self) -> None:
        self.pieces: dict[int, list[str]] = {}  # index -> [id, name, arguments]
        self.text = False  # text came too (so the call cannot be made again)

    def add(self, raw) -> None:
        for choice in getattr(raw, "choices", None) or ():
            delta = getattr(choice, "delta", None)
            for d in getattr(delta, "tool_calls", None) or ():
                call = self.pieces.setdefault(d.index or 0, ["", "", ""])
                call[0] = call[0] or d.id or ""
                if d.function is not None:
                    call[1] = call[1] or d.function.name or ""
                    call[2] += d.function.arguments or ""

    def calls(self) -> list[dict]:
        out = []
        for i, (cid, name, arguments) in sorted(self.pieces.items()):
            try:
                args = json.loads(arguments or "{}")
            except ValueError:
                args = {}
            out.append({"id": cid or f"call_{i + 1}", "name": name,
                        "arguments": args if isinstance(args, dict) else {}})
        return [c for c in out if c["name"]]


class ProviderFailure(Fs9Error):
    """A failed call, with what the caller needs to decide what next: `fault` (the
    provider's, not the request's: it counts toward the model's circuit breaker) and
    `transient` (429, 502-504, a broken connection: worth retrying after a pause)."""

    def __init__(self, errno: int, text: str, *, fault: bool = True,
                 transient: bool = False) -> None:
        super().__init__(errno, text)
        self.fault, self.transient = fault, transient


TRANSIENT_STATUS = frozenset({408, 429, 502, 503, 504})
# what a server says when it cannot stream tool calls (llama-cpp-python: "Automatic
# streaming tool choice is not supported"; others word it their way)
STREAMED_TOOLS_REFUSED = re.compile(r"stream\w*.{0,40}(tool|function)|(tool|function).{0,40}"
                                    r"stream", re.I | re.S)


def _finish(raw) -> str | None:
    """A chunk's or a reply's finish_reason (OpenAI's shapes; Ollama's done_reason)."""
    if isinstance(raw, dict):
        return raw.get("done_reason") if raw.get("done") else None
    choices = getattr(raw, "choices", None) or ()
    return getattr(choices[0], "finish_reason", None) if choices else None


def _broke(names: set[str]) -> bool:
    """The server took the connection, then ended it without a whole reply (httpx's
    RemoteProtocolError or ReadError, which OpenAI's client calls a connection error):
    not unreachable (ConnectError: nothing listens)."""
    return bool(names & {"RemoteProtocolError", "ReadError"}) or (
        "APIConnectionError" in names and not names & {"ConnectError", "ConnectTimeout"})


def _names(e: BaseException) -> set[str]:
    """The class names of e and of the exceptions it was raised from."""
    names: set[str] = set()
    seen = 0
    while e is not None and seen < 8:
        names.update(c.__name__ for c in type(e).__mro__)
        e, seen = e.__cause__ or e.__context__, seen + 1
    return names


def _failure(e: Exception, provider: LlamaIndex) -> Fs9Error:
    """What a client's exception means, as an errno and a sentence."""
    where = f"model {provider.model} at {provider.base}"
    names = _names(e)
    status = getattr(e, "status_code", None)
    if status is not None:
        body = getattr(e, "body", None)
        text = getattr(e, "error", None) or \
            (body.get("message") if isinstance(body, dict) else None) or str(e)
        return ProviderFailure(errno.EIO, f"{where} answered {status}: {text}",
                               fault=status >= 500 or status in TRANSIENT_STATUS,
                               transient=status in TRANSIENT_STATUS)
    if names & {"APITimeoutError", "TimeoutException", "ReadTimeout"}:
        return ProviderFailure(errno.ETIMEDOUT, f"{where}: timed out")
    if _broke(names):
        return ProviderFailure(errno.EIO, f"{where}: the connection broke: {e}",
                               transient=True)
    if names & {"APIConnectionError", "ConnectError", "ConnectionError"}:
        return ProviderFailure(errno.ECONNREFUSED, f"{where} is unreachable: {e}")
    if names & {"HTTPError", "RemoteProtocolError"}:
        return ProviderFailure(errno.EIO, f"{where}: the connection broke: {e}",
                               transient=True)
    return ProviderFailure(errno.EIO, f"{where}: {e.__class__.__name__}: {e}")
