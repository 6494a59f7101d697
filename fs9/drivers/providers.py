"""How a model is reached: the scripted model in-process, real ones through llama-index.

Every provider answers `chat(messages, tools, max_tokens, temperature, emit)`:
messages and tools in OpenAI's shapes, `emit(text)` called with each piece of the
reply as it streams; it returns {content, tool_calls: [{id, name, arguments}],
finish_reason, tokens_in, tokens_out}. Failures are Fs9Error with an errno that
says what kind (ECONNREFUSED: unreachable, ETIMEDOUT, EIO: the server said no); a
ProviderFailure also says whether it is the provider's fault and worth a retry.
`probe()` says whether the model can be reached (None) or why not.

llama-index's clients are imported on a real model's first call, in a worker
thread (about 1.2 s); their async API then runs on trio itself (httpx speaks
trio), so a cancelled call (halt) ends at once and closes its connection.
"""
import errno
import json
import math
import os

import trio

from ..errors import Fs9Error
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

    async def chat(self, messages, tools, max_tokens, temperature, emit) -> dict:
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

    def _client(self):
        """The llama-index LLM (imported and built on first use, in a worker thread)."""
        if self._llm is None:
            if self.kind == "ollama":
                from llama_index.llms.ollama import Ollama
                self._llm = Ollama(model=self.model, base_url=self.base,
                                   request_timeout=self.timeout,
                                   context_window=self.context_window,
                                   headers={"Authorization": f"Bearer {self._key}"})
            else:
                from llama_index.llms.openai_like import OpenAILike
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

    async def chat(self, messages, tools, max_tokens, temperature, emit) -> dict:
        """Stream one reply (llama-index's async clients run on trio through httpx)."""
        llm = self._llm or await trio.to_thread.run_sync(self._client)
        kwargs: dict = {"tools": tools} if tools else {}
        if self.kind == "ollama":  # Ollama takes these per client, not per call
            options = {"num_predict": max_tokens}
            llm = llm.model_copy(update={"additional_kwargs": options,
                                         **({"temperature": temperature}
                                            if temperature is not None else {})})
        else:
            kwargs["max_tokens"] = max_tokens
            if temperature is not None:
                kwargs["temperature"] = temperature
        last = None
        try:
            with trio.fail_after(self.timeout or math.inf):
                stream = await llm.astream_chat([self._message(m) for m in messages], **kwargs)
                async for last in stream:
                    if last.delta:
                        emit(last.delta)
        except trio.TooSlowError:
            raise ProviderFailure(errno.ETIMEDOUT, f"model {self.model} at {self.base}: no reply "
                                            f"within timeout_s = {self.timeout}")
        except Exception as e:
            raise _failure(e, self) from e
        if last is None:
            raise ProviderFailure(errno.EIO, f"model {self.model} at {self.base}: an empty reply")
        calls = [{"id": c.tool_id if self.kind != "ollama" else f"call_{i + 1}",
                  "name": c.tool_name, "arguments": c.tool_kwargs if isinstance(c.tool_kwargs, dict) else {}}
                 for i, c in enumerate(llm.get_tool_calls_from_response(
                     last, error_on_no_tool_call=False))] if tools else []
        usage = (last.raw or {}).get("usage") or {} if self.kind == "ollama" else \
            last.additional_kwargs
        content = last.message.content or ""
        return {"content": content, "tool_calls": calls,
                "finish_reason": "tool_calls" if calls else "stop",
                "tokens_in": int(usage.get("prompt_tokens") or
                                 scripted.prompt_tokens(messages)),
                "tokens_out": int(usage.get("completion_tokens") or scripted.words(content))}

    def _message(self, m: dict):
        """An OpenAI-shaped message as llama-index's ChatMessage for this provider."""
        from llama_index.core.llms import ChatMessage
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
        return ChatMessage(role=m["role"], content=m.get("content") or "", additional_kwargs=extra)


class ProviderFailure(Fs9Error):
    """A failed call, with what the caller needs to decide what next: `fault` (the
    provider's, not the request's: it counts toward the model's circuit breaker) and
    `transient` (429, 502-504, a broken connection: worth retrying after a pause)."""

    def __init__(self, errno: int, text: str, *, fault: bool = True,
                 transient: bool = False) -> None:
        super().__init__(errno, text)
        self.fault, self.transient = fault, transient


TRANSIENT_STATUS = frozenset({408, 429, 502, 503, 504})


def _failure(e: Exception, provider: LlamaIndex) -> Fs9Error:
    """What a client's exception means, as an errno and a sentence."""
    where = f"model {provider.model} at {provider.base}"
    names = {c.__name__ for c in type(e).__mro__}
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
    if names & {"APIConnectionError", "ConnectError", "ConnectionError"}:
        return ProviderFailure(errno.ECONNREFUSED, f"{where} is unreachable: {e}")
    if names & {"HTTPError", "RemoteProtocolError"}:
        return ProviderFailure(errno.EIO, f"{where}: the connection broke: {e}",
                               transient=True)
    return ProviderFailure(errno.EIO, f"{where}: {e.__class__.__name__}: {e}")
