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
    temperature = 0               # a call's, when its request gives none
    stream_tools = false          # the server cannot stream tool calls (else learned:
                                  # docs/models.md)
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
unused for IDLE_S it ends by itself); an agent holds CONVERSATIONS_PER_AGENT at most.
"""
import errno
import os
import time
import tomllib
import urllib.parse

import trio

from ...drivers import providers
from ...errors import Fs9Error
from .. import cmd
from . import budget, tokens
from .breaker import Breaker
from . import breaker as breakers
from .budget import Limits, Scope, Usage
from ..names import NAME_RE, OPERATOR
from .calls import Calls
from .conversation import Conversation
from .scheduler import Scheduler
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel import Kernel

IDLE_S = 3600.0
CONVERSATIONS_PER_AGENT = 64  # open at once, over all models (clone: EDQUOT past it)
MODEL_KEYS = {"provider", "model", "api_base", "api_key", "api_key_env", "context_window",
              "max_tokens", "max_concurrent", "requests_per_minute", "timeout_s", "script",
              "token_delay_s", "label", "retries", "retry_wait_s",
              "stream_tools", "temperature"} | breakers.KEYS
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
        # a call's temperature when its request gives none (None: the client's default)
        self.temperature = providers.number(conf, "temperature", None, origin) \
            if "temperature" in conf else None
        if self.temperature is not None and self.temperature > 2:
            raise Fs9Error(errno.EINVAL, f"{origin}: temperature must be 0 to 2")
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
                 f"retries={self.retries}"] + self.breaker.info(time.time()) + self.where()
        return "\n".join(lines) + "\n"

    def where(self) -> list[str]:
        """Lines of info for a model over HTTP: where it is (the URL without any user
        or password in it), whether it streams tool calls (yes, no, unknown: not yet
        seen), and what counts tokens its server does not report."""
        base = getattr(self.provider, "base", "")
        if not base:
            return []
        try:
            url = urllib.parse.urlsplit(base)
            host = url.hostname or ""
            netloc = (f"[{host}]" if ":" in host else host) + (f":{url.port}" if url.port else "")
            shown = urllib.parse.urlunsplit((url.scheme, netloc, url.path, "", ""))
        except ValueError:  # (a port out of range: the calls say so)
            shown = "(not a URL)"
        streams = {True: "yes", False: "no", None: "unknown"}[self.provider.stream_tools]
        return [f"api_base={shown}", f"stream_tools={streams}",
                f"tokens_unreported={tokens.tokenizer()}"]


class Models(Calls):
    """The configured models and everything model use the kernel keeps."""

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.usage: dict[tuple, Usage] = {}  # ("agent", who) / ("task", id) / ("model", m, who)
        self.total = Usage()
        self.models: dict[str, Model] = {}
        self.limits = Limits()
        self.problem = ""  # what is wrong with the configuration, shown in models/usage
        self._next_id = 1
        self.open_by: dict[str, int] = {}  # agent -> its conversations open (all models)
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
                model = self.models[name] = Model(name, table, origin, self.recent)
                if hasattr(model.provider, "learned"):  # what a server turns out to do
                    model.provider.learned = lambda m=name, **f: self.kernel.record(
                        "model_learned", model=m, **f)
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
                "breaker_half_open": self.on_breaker, "breaker_closed": self.on_breaker,
                "model_learned": self.on_model_learned}

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

    def on_model_learned(self, e, agent, task) -> None:
        """What a server turned out not to do, kept across remounts (models.toml's own
        stream_tools, when it says, wins)."""
        model = self.models.get(e.data.get("model"))
        if model is not None and "stream_tools" not in model.conf and \
                hasattr(model.provider, "stream_tools"):
            model.provider.stream_tools = e.data.get("stream_tools")

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
        """A new conversation of owner's (None: the operator's, not counted). An agent
        holds at most CONVERSATIONS_PER_AGENT at once: each is fs9's memory until
        closed or IDLE_S unused, and a clone in a loop made them without end."""
        if owner is not None:
            if self.open_by.get(owner, 0) >= CONVERSATIONS_PER_AGENT:
                raise Fs9Error(errno.EDQUOT, f"agent {owner} has {CONVERSATIONS_PER_AGENT} "
                                             "conversations open: close one (`close` in "
                                             "its ctl) before opening another")
            self.open_by[owner] = self.open_by.get(owner, 0) + 1
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
        if conv.model.conversations.pop(conv.id, None) is not None and conv.owner is not None:
            left = self.open_by.pop(conv.owner) - 1
            if left:
                self.open_by[conv.owner] = left
        self.kernel.log.append("conversation_closed", agent=conv.owner, model=conv.model.name,
                               conv=conv.id, corr=conv.corr, reason=why)

    def owner_killed(self, owner: str) -> None:
        """Its conversations end with it: the name's next holder does not inherit them
        (they are found by their owner's name)."""
        for model in self.models.values():
            for conv in [c for c in model.conversations.values() if c.owner == owner]:
                self.close(conv, "owner killed")

    def halt(self) -> None:
        """The kill switch: every call in flight or waiting is cancelled."""
        for model in self.models.values():
            for conv in model.conversations.values():
                if conv.turn.scope is not None:
                    conv.turn.scope.cancel()
