"""A model call, from the write of models/M/N/request to the reply's end: refused early
where it can be (fs9 halted, a call in flight, the circuit breaker, the budgets, an
approval), queued in the model's scheduler, streamed into the turn with retries
(retry.py), then accounted: a `model_call` event with its tokens (the server's counts,
or tokens.py's where the server gave none: llama-cpp-python streams no usage), or a
`model_error` that may open the breaker.

Calls is a part of models.Models (the configured models and their usage).
"""
import contextlib
import errno
import json
import time

import trio

from ...drivers import providers
from ...errors import Fs9Error
from ..agents import breaker as agent_breakers
from ..names import one_line
from . import budget, retry, tokens
from . import request as requests
from .conversation import Conversation, Turn, assistant_message, compact, tokens_of

MAX_REQUEST = 4 << 20


class Calls:
    """Models' call path (kernel, models, scopes, _requester come from Models)."""

    def _ready(self, conv: Conversation, size: int) -> None:
        """Refuse a request of size bytes that cannot be taken now, whatever it says."""
        if size > MAX_REQUEST:
            raise Fs9Error(errno.EFBIG, f"a request is at most {MAX_REQUEST} bytes")
        if self.kernel.halted:
            raise Fs9Error(errno.EBUSY, "fs9 is halted: no model calls until `resume`")
        if conv.state in ("queued", "running"):
            raise Fs9Error(errno.EBUSY, "a call is in flight in this conversation: read its "
                                        "reply first")
        try:
            conv.model.breaker.admit(time.time())
            # and the agent's own, open once its tasks kept failing (agents/breaker.py)
            agent_breakers.check_model_call(self.kernel.agents.get(conv.owner or ""))
        except Fs9Error as e:  # cut off: refused before anything is sent or reserved
            task = self._task_of(conv.owner)
            self.kernel.record("model_refused", agent=conv.owner, model=conv.model.name,
                               conv=conv.id, corr=task.corr if task else conv.corr,
                               task=task.id if task else None, reason=e.text)
            raise

    def precheck(self, conv: Conversation, data: bytes) -> None:
        with _refusals(conv):
            self._precheck(conv, data)

    def request(self, conv: Conversation, data: bytes) -> None:
        with _refusals(conv):
            self._request(conv, data)

    def _precheck(self, conv: Conversation, data: bytes) -> None:
        """What can be refused while a request is still being written (data: its first
        write): fs9 halted, a call in flight, a budget the prompt alone exceeds, and
        every item of it once it is a whole JSON object (request.py)."""
        self._ready(conv, len(data))
        req = requests.complete(data)
        if req is not None:
            requests.check_turn(conv.messages, req["messages"])
        task = self._task_of(conv.owner)
        prompt = _prompt(conv.messages, conv.tools) + tokens.count(data.decode(errors="replace"))
        self._admit(conv, task, prompt, 1)
        # the size a yes is asked for: the call's own once the request is whole (as
        # _request counts it, so that the yes covers it), else what is written so far
        self._approved(conv, task, prompt + conv.model.max_tokens if req is None else
                       _prompt(conv.messages + req["messages"], _tools(conv, req))
                       + _wanted(conv, req), use=False)

    def _admit(self, conv: Conversation, task, prompt: int, want: int) -> tuple[list, int]:
        """budget.admit for a call of conv: (its scopes, its max_tokens); a refusal is a
        `model_refused` event."""
        scopes = self.scopes(conv.who, task, conv.model)
        try:
            return scopes, budget.admit(scopes, prompt, want, time.time())
        except Fs9Error as e:
            self.kernel.record("model_refused", agent=conv.owner, model=conv.model.name,
                               conv=conv.id, corr=task.corr if task else conv.corr,
                               task=task.id if task else None, reason=e.text)
            raise

    def _approved(self, conv: Conversation, task, tokens: int, use: bool) -> None:
        """A call over the owner's `approval.model_tokens` needs the operator's yes
        (kernel/approvals.py): EAGAIN while it is asked for, EACCES once denied."""
        agent = self.kernel.agents.get(conv.owner) if conv.owner else None
        limit = agent.manifest.get("approval", {}).get("model_tokens") if agent else None
        if limit and tokens > limit:
            self.kernel.approvals.gate(
                agent, "model_tokens", conv.model.name, f"a call of model {conv.model.name} "
                f"for up to {tokens} tokens (over approval.model_tokens = {limit:g})",
                task.corr if task else conv.corr, use, size=tokens)

    def _request(self, conv: Conversation, data: bytes) -> None:
        """One turn: check it, admit it against the budgets, start the call. Returns
        once the call is queued; its reply streams into conv.turn."""
        self._ready(conv, len(data))
        req = requests.parse(data)
        requests.check_turn(conv.messages, req["messages"])
        if self._nursery is None:
            raise Fs9Error(errno.EAGAIN, "models are not served yet")
        task = self._task_of(conv.owner)
        messages = conv.messages + req["messages"]
        tools = _tools(conv, req)
        chosen = (req.get("tool_choice") or {}).get("function", {}).get("name") \
            if isinstance(req.get("tool_choice"), dict) else None
        if chosen is not None and chosen not in {t["function"]["name"] for t in tools or ()}:
            raise Fs9Error(errno.EINVAL, f"{requests.BAD_REQUEST}: tool_choice: {chosen!r} is "
                                         "not a tool this conversation offers")
        want = _wanted(conv, req)
        prompt = _prompt(messages, tools)
        scopes, max_tokens = self._admit(conv, task, prompt, want)
        self._approved(conv, task, prompt + max_tokens, use=True)
        held = prompt + max_tokens
        budget.reserve(scopes, held)  # released when the call ends, however it ends
        conv.messages, conv.tools = messages, tools
        conv.turn, conv.state, conv.used = Turn(), "queued", time.monotonic()
        breaker = conv.model.breaker
        if breaker.admit(time.time()) == "probe":  # this call tells whether the model is back
            breaker.probing = conv.turn
            if breaker.state != "half_open":
                self.kernel.record("breaker_half_open", model=conv.model.name,
                                   agent=conv.owner, conv=conv.id)
        conv.turns += 1
        self._nursery.start_soon(self._call, conv, conv.turn, task, scopes, max_tokens,
                                 {k: req[k] for k in ("temperature", "tool_choice") if k in req},
                                 held)

    def _task_of(self, owner: str | None):
        agent = self.kernel.agents.get(owner) if owner else None
        return agent.current if agent is not None else None

    async def _call(self, conv, turn, task, scopes, max_tokens, options, held) -> None:
        try:
            await self._converse(conv, turn, task, scopes, max_tokens, options)
        finally:
            budget.release(scopes, held)

    async def _converse(self, conv, turn, task, scopes, max_tokens, options) -> None:
        model, who = conv.model, conv.who
        corr = task.corr if task is not None else conv.corr
        ids = dict(agent=conv.owner, model=model.name, conv=conv.id, corr=corr,
                   task=task.id if task is not None else None)
        requester = self._requester(who, task)
        if requester is not None:
            ids["for"] = requester.name
        agent = self.kernel.agents.get(who)
        priority = agent.priority if agent is not None else "interactive"
        t0 = time.monotonic()
        with trio.CancelScope() as turn.scope:
            try:
                while (wait := budget.wait_s(scopes, time.time())) > 0:
                    self.kernel.log.append("model_throttled", wait_s=round(wait, 3), **ids)
                    await trio.sleep(wait)
                async with model.scheduler.slot(who, priority):
                    conv.state = "running"
                    for s in scopes:
                        s.usage.started(time.time())
                    await compact(conv, ids, max_tokens, self.kernel)
                    result = await retry.chat(model, conv, turn, max_tokens, options,
                                              lambda **f: self.kernel.log.append(
                                                  "model_retry", **f, **ids))
                conv.messages.append(assistant_message(result))
                for call in result["tool_calls"]:
                    turn.text.append(f"\ntool_call {call['id']} {call['name']} "
                                     f"{json.dumps(call['arguments'])}".encode())
                turn.result = result
                counted = _count_unreported(result, conv.messages[:-1])
                conv.tokens_in += result["tokens_in"]
                conv.tokens_out += result["tokens_out"]
                conv.state = "done"
                self.kernel.record("model_call", tokens_in=result["tokens_in"],
                                   tokens_out=result["tokens_out"],
                                   ms=round((time.monotonic() - t0) * 1000, 1),
                                   finish=result["finish_reason"],
                                   **({"counted": counted} if counted else {}), **ids)
                if model.breaker.state != "closed":  # the probe succeeded
                    self.kernel.record("breaker_closed", model=model.name, agent=conv.owner,
                                       conv=conv.id)
            except Fs9Error as e:
                self._failed(conv, turn, e, ids)
            except Exception as e:  # a provider's defect: this call fails, fs9 goes on
                self.kernel.log.bug("model call")
                self._failed(conv, turn, Fs9Error(errno.EIO, f"model call failed: {e!r}"), ids)
        if turn.scope.cancelled_caught:
            self._failed(conv, turn, Fs9Error(errno.ECANCELED, "the call was cancelled "
                                              "(halt, or the conversation closed)"), ids)
        turn.scope = None
        if model.breaker.probing is turn:  # a probe that neither closed nor reopened it
            model.breaker.probing = None  # (cancelled, or the request's fault): next call
        turn.text.end()
        conv.used = time.monotonic()

    def _failed(self, conv, turn, e: Fs9Error, ids: dict) -> None:
        turn.error, conv.state = e, "failed"
        turn.result = {"error": e.text, "errno": errno.errorcode.get(e.errno, str(e.errno))}
        fault = isinstance(e, providers.ProviderFailure) and e.fault
        self.kernel.record("model_error", reason=e.text, breaker=fault, **ids)  # (the
        # request's messages stay in the conversation: the next request sends them again)
        breaker = conv.model.breaker
        if fault and breaker.should_open(time.time()):
            self.kernel.record("breaker_opened", model=conv.model.name, agent=conv.owner,
                               conv=conv.id, failures=breaker.recent(time.time()),
                               reason=one_line(e.text))


@contextlib.contextmanager
def _refusals(conv: Conversation):
    """A refused request's reason, kept for the conversation's status: the program
    that wrote it gets an errno from write(2) and reads the words there."""
    conv.refused = ""
    try:
        yield
    except Fs9Error as e:
        conv.refused = one_line(e.text)
        raise


def _count_unreported(result: dict, messages: list[dict]) -> str:
    """Fill the token counts the server did not report (None) with tokens.py's count
    of what was sent and what came back; returns what counted them ("": the server)."""
    if result["tokens_in"] is not None and result["tokens_out"] is not None:
        return ""
    if result["tokens_in"] is None:
        result["tokens_in"] = tokens_of(messages)
    if result["tokens_out"] is None:
        result["tokens_out"] = tokens.count(result["content"]) + sum(
            tokens.count(c["name"] + json.dumps(c["arguments"])) for c in result["tool_calls"])
    return tokens.tokenizer()


def _wanted(conv: Conversation, req: dict) -> int:
    """The reply's limit a request asks for, within its model's."""
    return min(req.get("max_tokens") or conv.model.max_tokens, conv.model.max_tokens)


def _tools(conv: Conversation, req: dict) -> list | None:
    """The tools a call offers: the request's, else the conversation's."""
    return req["tools"] if "tools" in req else conv.tools


def _prompt(messages: list[dict], tools: list | None) -> int:
    """A call's prompt tokens: its messages and the definitions of the tools it offers
    (which the provider reads, and bills, as prompt too)."""
    return tokens_of(messages) + (tokens.count(json.dumps(tools)) if tools else 0)
