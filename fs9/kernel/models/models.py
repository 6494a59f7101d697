"""Models as devices: configured models, conversations with them, and who used what.

The kernel holds the models' configuration (credentials included: nothing of it is
ever served but names and labels), schedules the calls (kernel/models/scheduler.py),
enforces budgets and rates before a call is sent (kernel/models/budget.py), logs every
call (`model_call`, with its tokens: replay rebuilds the usage) and cancels calls
in flight at `halt`.

Configuration: STATE/models.toml, or the file named by $FS9_MODELS:

    [limits]                      # fs9 as a whole (kernel/models/budget.py)
    tokens_per_day = 1000000
    requests_per_minute = 600
    [models.local]
    provider = "openai"           # any OpenAI-compatible server (vLLM, llama.cpp, LM Studio,
    api_base = "http://127.0.0.1:8000/v1"   # Ollama's /v1); "ollama": Ollama's own API
    model = "qwen2.5-7b-instruct" # the server's name for it (default: the section's name)
    api_key_env = "LOCAL_KEY"     # or api_key = "..."; never shown in the namespace
    context_window = 8192
    max_tokens = 1024             # a call's default reply limit
    max_concurrent = 2            # calls in flight at once; more wait in the scheduler
    requests_per_minute = 60
    timeout_s = 60
    retries = 2                   # of a transient failure (429, 502-504, a broken
    retry_wait_s = 0.5            # connection) before the first token: exponential
                                  # backoff with jitter from retry_wait_s (tenacity)
    breaker_failures = 5          # the circuit breaker (kernel/models/breaker.py)
    breaker_window_s = 60
    breaker_cooldown_s = 30

A model `scripted` (drivers/scripted.py: deterministic, not a language model) is
always there unless the file defines that name.

A conversation (models/NAME/clone) belongs to whoever opened it: an agent (through
its view) or the operator. It lives while fs9 runs (`close` in its ctl ends it;
unused for IDLE_S it ends by itself).
"""
import errno
import json
import os
import time
import tomllib

import trio

from ...drivers import providers
from ...errors import Fs9Error
from .. import cmd
from . import budget, retry, tokens
from .breaker import Breaker
from . import breaker as breakers
from ..agents import breaker as agent_breakers
from .budget import Limits, Scope, Usage
from ..names import NAME_RE, OPERATOR, one_line
from . import request as requests
from .conversation import Conversation, Turn, assistant_message, compact, tokens_of
from .scheduler import Scheduler
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel import Kernel

IDLE_S = 3600.0
MAX_REQUEST = 4 << 20
MODEL_KEYS = {"provider", "model", "api_base", "api_key", "api_key_env", "context_window",
              "max_tokens", "max_concurrent", "requests_per_minute", "timeout_s", "script",
              "token_delay_s", "label", "retries", "retry_wait_s"} | breakers.KEYS
CONV_CMDS = (cmd.Cmd("close", "close", usage="close"), cmd.Cmd("reset", "reset", usage="reset"))


class Model:
    """One configured model: its settings, its scheduler, its usage."""

    def __init__(self, name: str, conf: dict, origin: str, usage_of) -> None:
        self.name = name
        self.conf = conf
        self.provider = providers.make(name, conf, origin)
        b = breakers.settings(conf, origin)
        self.breaker = Breaker(name, b["breaker_failures"], b["breaker_window_s"],
                               b["breaker_cooldown_s"])
        self.retries = int(providers.number(conf, "retries", 2, origin))
        self.retry_wait_s = providers.number(conf, "retry_wait_s", 0.5, origin)
        self.context_window = int(conf.get("context_window", 8192))
        self.max_tokens = int(conf.get("max_tokens", 1024))
        self.limits = Limits(requests_per_minute=int(conf.get("requests_per_minute", 0)))
        self.usage = Usage()
        self.scheduler = Scheduler(int(conf.get("max_concurrent", 4)),
                                   lambda who: usage_of(who, self.name))
        self.state, self.reason = "unknown", ""
        self.conversations: dict[str, "Conversation"] = {}

    def info(self) -> str:
        s = self.scheduler.statistics()
        lines = [f"name={self.name}", f"provider={self.conf.get('provider', 'scripted')}",
                 f"model={self.provider.model}", f"label={self.provider.label}",
                 f"state={self.state}"] + ([f"reason={self.reason}"] if self.reason else []) + [
                 f"context_window={self.context_window}", f"max_tokens={self.max_tokens}",
                 f"max_concurrent={s['slots']}", f"in_flight={s['busy']}",
                 f"waiting={s['waiting']}",
                 f"requests_per_minute={self.limits.requests_per_minute}",
                 f"calls={self.usage.calls}", f"tokens_in={self.usage.tokens_in}",
                 f"tokens_out={self.usage.tokens_out}", f"conversations={len(self.conversations)}",
                 f"retries={self.retries}"] + self.breaker.info(time.time())
        return "\n".join(lines) + "\n"


class Models:
    """The configured models and everything model use the kernel keeps."""

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.usage: dict[tuple, Usage] = {}  # ("agent", who) / ("task", id) / ("model", m, who)
        self.total = Usage()
        self.models: dict[str, Model] = {}
        self.limits = Limits()
        self.problem = ""  # what is wrong with the configuration, shown in models/usage
        self._next_id = 1
        self._nursery: trio.Nursery | None = None
        self.config_path = os.environ.get("FS9_MODELS") or \
            os.path.join(kernel.state_dir, "models.toml")
        self.load()

    def load(self) -> None:
        conf: dict = {}
        try:
            with open(self.config_path, "rb") as f:
                conf = tomllib.load(f)
        except FileNotFoundError:
            pass
        except (OSError, tomllib.TOMLDecodeError) as e:
            self.problem = f"{self.config_path}: {e}; only the scripted model is served"
        tables = conf.get("models", {}) if isinstance(conf.get("models", {}), dict) else {}
        tables.setdefault("scripted", {"provider": "scripted"})
        try:
            self.limits = Limits.of(conf.get("limits", {}), f"{self.config_path} [limits]")
        except Fs9Error as e:
            self.problem = e.text
        for name, table in tables.items():
            origin = f"{self.config_path} [models.{name}]"
            try:
                if not NAME_RE.fullmatch(name) or name == "usage":
                    raise Fs9Error(errno.EINVAL, f"{origin}: a model's name is letters, digits, "
                                                 "_ . - (and not usage)")
                if not isinstance(table, dict) or set(table) - MODEL_KEYS:
                    raise Fs9Error(errno.EINVAL, f"{origin}: unknown key(s) "
                                   f"{', '.join(sorted(set(table) - MODEL_KEYS))}")
                self.models[name] = Model(name, table, origin, self.recent)
            except Fs9Error as e:
                self.problem = (self.problem + "; " if self.problem else "") + e.text

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Probe the models (info says reachable or why not); end idle conversations."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.problem:
                self.kernel.log.append("model_config_error", reason=self.problem)
            for model in self.models.values():
                nursery.start_soon(self._probe, model)
            task_status.started()
            while True:
                await trio.sleep(60)
                now = time.monotonic()
                for model in self.models.values():
                    for conv in list(model.conversations.values()):
                        if conv.state not in ("queued", "running") and now - conv.used > IDLE_S:
                            self.close(conv, "idle")

    async def _probe(self, model: Model) -> None:
        why = await model.provider.probe()
        model.state, model.reason = ("reachable", "") if why is None else ("unreachable", why)
        if why is not None:
            self.kernel.log.append("model_unreachable", model=model.name, reason=why)

    # --- usage ---------------------------------------------------------------------

    def _usage(self, *key) -> Usage:
        u = self.usage.get(key)
        if u is None:
            u = self.usage[key] = Usage()
        return u

    def recent(self, who: str, model: str) -> int:
        """Tokens of model used by who in the last minute (the scheduler's fairness)."""
        u = self.usage.get(("model", model, who))
        return 0 if u is None else u.tokens_within(time.time(), budget.MINUTE_S)

    def appliers(self) -> dict:
        """The events model usage is rebuilt from (Kernel.apply)."""
        return {"model_call": self.on_model_call, "model_refused": self.on_model_refused,
                "model_error": self.on_model_error, "breaker_opened": self.on_breaker,
                "breaker_half_open": self.on_breaker, "breaker_closed": self.on_breaker}

    def on_model_call(self, e, agent, task) -> None:
        d = e.data
        who = e.agent or OPERATOR
        keys = [("agent", who), ("model", d["model"], who)] + ([("task", e.task)] if e.task else [])
        if d.get("for"):  # an agent working for another: the requester pays too
            keys.append(("agent", d["for"]))
        for u in [self._usage(*k) for k in keys] + [self.total]:
            u.add(e.ts, d["tokens_in"], d["tokens_out"])
        model = self.models.get(d["model"])
        if model is not None:
            model.usage.add(e.ts, d["tokens_in"], d["tokens_out"])

    def on_model_refused(self, e, agent, task) -> None:
        self._usage("agent", e.agent or OPERATOR).refused += 1
        self.total.refused += 1

    def on_model_error(self, e, agent, task) -> None:
        model = self.models.get(e.data.get("model"))
        if e.data.get("breaker") and model is not None:  # the provider's fault: it counts
            model.breaker.failed(e.ts)

    def on_breaker(self, e, agent, task) -> None:
        model = self.models.get(e.data.get("model"))
        if model is None:  # no longer configured
            return
        if e.kind == "breaker_opened":
            model.breaker.open(e.ts, e.data.get("reason", ""))
        elif e.kind == "breaker_half_open":
            model.breaker.half_open()
        else:
            model.breaker.close()

    def scopes(self, who: str, task, model: Model) -> list[Scope]:
        """What a call by who (during task) counts against."""
        agent = self.kernel.agents.get(who)
        limits = agent.budget if agent is not None else Limits()
        scopes = [Scope("fs9 (models.toml [limits])", self.limits, self.total),
                  Scope(f"model {model.name}", model.limits, model.usage),
                  Scope(f"agent {who}", limits, self._usage("agent", who))]
        if task is not None:
            scopes.append(Scope(f"task {task.id} of agent {who}", limits,
                                self._usage("task", task.id), per_task=True))
        requester = self._requester(who, task)
        if requester is not None:  # mailing work to an agent spends the sender's budget too
            scopes.append(Scope(f"agent {requester.name} (who asked {who} for this work)",
                                requester.budget, self._usage("agent", requester.name)))
        return scopes

    def _requester(self, who: str, task):
        """The agent who asked for the work task does for who (None: itself, the
        operator, or no task)."""
        name = task.reply_to if task is not None else ""
        return self.kernel.agents.get(name) if name and name != who else None

    def agent_usage(self, who: str) -> dict:
        u = self.usage.get(("agent", who)) or Usage()
        cut_off = [m.name for m in self.models.values()  # of those it has used
                   if m.breaker.state != "closed" and ("model", m.name, who) in self.usage]
        return {"model_calls": u.calls, "tokens_in": u.tokens_in, "tokens_out": u.tokens_out,
                "tokens_today": u.tokens_today(time.time()), "model_refused": u.refused,
                "breakers_open": ",".join(cut_off)}

    def usage_text(self) -> str:
        """models/usage: one line per (who, model), then the totals and limits."""
        lines = []
        for key, u in sorted(self.usage.items(), key=lambda kv: str(kv[0])):
            if key[0] == "model":
                lines.append(f"{key[2]} {key[1]} calls={u.calls} tokens_in={u.tokens_in} "
                             f"tokens_out={u.tokens_out} tokens_today={u.tokens_today(time.time())}\n")
        t, lim = self.total, self.limits
        lines.append(f"total calls={t.calls} tokens_in={t.tokens_in} tokens_out={t.tokens_out} "
                     f"tokens_today={t.tokens_today(time.time())} refused={t.refused} "
                     f"limit_tokens_per_day={lim.tokens_per_day} "
                     f"limit_requests_per_minute={lim.requests_per_minute}\n")
        if self.problem:
            lines.append(f"config_error {self.problem}\n")
        return "".join(lines)

    # --- conversations -------------------------------------------------------------

    def model(self, name: str) -> Model | None:
        return self.models.get(name)

    def clone(self, model: Model, owner: str | None) -> Conversation:
        conv = Conversation(str(self._next_id), model, owner)
        self._next_id += 1
        model.conversations[conv.id] = conv
        self.kernel.log.append("conversation_opened", agent=owner, model=model.name,
                               conv=conv.id, corr=conv.corr)
        return conv

    def visible(self, model: Model, who: str | None) -> list[str]:
        return [c.id for c in model.conversations.values() if who is None or c.owner == who]

    def conversation(self, model: Model, cid: str, who: str | None) -> Conversation | None:
        conv = model.conversations.get(cid)
        return conv if conv is not None and (who is None or conv.owner == who) else None

    def ctl(self, conv: Conversation, data: bytes) -> None:
        for p in cmd.parse(CONV_CMDS, data):
            if p.cmd.verb == "close":
                self.close(conv, "closed")
            else:
                if conv.state in ("queued", "running"):
                    raise Fs9Error(errno.EBUSY, "a call is in flight: reset after it ends")
                conv.reset()

    def close(self, conv: Conversation, why: str) -> None:
        if conv.turn.scope is not None:
            conv.turn.scope.cancel()
        conv.model.conversations.pop(conv.id, None)
        self.kernel.log.append("conversation_closed", agent=conv.owner, model=conv.model.name,
                               conv=conv.id, corr=conv.corr, reason=why)

    def halt(self) -> None:
        """The kill switch: every call in flight or waiting is cancelled."""
        for model in self.models.values():
            for conv in model.conversations.values():
                if conv.turn.scope is not None:
                    conv.turn.scope.cancel()

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
        """What can be refused while a request is still being written (data: its first
        write): fs9 halted, a call in flight, a budget the prompt alone exceeds, and
        every item of it once it is a whole JSON object (request.py)."""
        self._ready(conv, len(data))
        req = requests.complete(data)
        if req is not None:
            requests.check_turn(conv.messages, req["messages"])
        task = self._task_of(conv.owner)
        prompt = tokens_of(conv.messages) + tokens.count(data.decode(errors="replace"))
        self._admit(conv, task, prompt, 1)
        self._approved(conv, task, prompt + conv.model.max_tokens, use=False)

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
                task.corr if task else conv.corr, use)

    def request(self, conv: Conversation, data: bytes) -> None:
        """One turn: check it, admit it against the budgets, start the call. Returns
        once the call is queued; its reply streams into conv.turn."""
        self._ready(conv, len(data))
        req = requests.parse(data)
        requests.check_turn(conv.messages, req["messages"])
        if self._nursery is None:
            raise Fs9Error(errno.EAGAIN, "models are not served yet")
        task = self._task_of(conv.owner)
        messages = conv.messages + req["messages"]
        tools = req["tools"] if "tools" in req else conv.tools
        want = min(req.get("max_tokens") or conv.model.max_tokens, conv.model.max_tokens)
        scopes, max_tokens = self._admit(conv, task, tokens_of(messages), want)
        self._approved(conv, task, tokens_of(messages) + max_tokens, use=True)
        held = tokens_of(messages) + max_tokens
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
                                 req.get("temperature"), held)

    def _task_of(self, owner: str | None):
        agent = self.kernel.agents.get(owner) if owner else None
        return agent.current if agent is not None else None

    async def _call(self, conv, turn, task, scopes, max_tokens, temperature, held) -> None:
        try:
            await self._converse(conv, turn, task, scopes, max_tokens, temperature)
        finally:
            budget.release(scopes, held)

    async def _converse(self, conv, turn, task, scopes, max_tokens, temperature) -> None:
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
                    result = await retry.chat(model, conv, turn, max_tokens, temperature,
                                              lambda **f: self.kernel.log.append(
                                                  "model_retry", **f, **ids))
                conv.messages.append(assistant_message(result))
                for call in result["tool_calls"]:
                    turn.text.append(f"\ntool_call {call['id']} {call['name']} "
                                     f"{json.dumps(call['arguments'])}".encode())
                turn.result = result
                conv.tokens_in += result["tokens_in"]
                conv.tokens_out += result["tokens_out"]
                conv.state = "done"
                self.kernel.record("model_call", tokens_in=result["tokens_in"],
                                   tokens_out=result["tokens_out"],
                                   ms=round((time.monotonic() - t0) * 1000, 1),
                                   finish=result["finish_reason"], **ids)
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
