"""Conversations with a model (models/NAME/N/): the messages, the turn in flight and its
streaming reply, and L1 memory (`compact`: older messages summarized by the model
before the context window overflows). What a write to `request` may say is
request.py.
"""
import json
import os
import time
from typing import TYPE_CHECKING

import trio

from ...errors import Fs9Error
from ..names import OPERATOR, one_line
from ..stream import Stream
from . import tokens

if TYPE_CHECKING:
    from ..kernel import Kernel
    from .models import Model

KEEP_MESSAGES = 6  # compaction keeps the newest messages as they are
SUMMARIZE = ("SUMMARIZE the conversation below in a few sentences. Keep facts, names, "
             "numbers, decisions and open questions.")


class Turn:
    """One request and its reply: the reply streams into `text`; `error` if it failed."""

    def __init__(self) -> None:
        self.text = Stream()
        self.error: Fs9Error | None = None
        self.result: dict = {}
        self.scope: trio.CancelScope | None = None


class Conversation:
    def __init__(self, cid: str, model: "Model", owner: str | None) -> None:
        self.id, self.model, self.owner = cid, model, owner
        self.corr = os.urandom(8).hex()
        self.messages: list[dict] = []
        self.tools: list[dict] = []
        self.turn = Turn()
        self.turn.text.end()
        self.turns = 0
        self.state = "idle"  # idle | queued | running | done | failed
        self.tokens_in = self.tokens_out = 0
        self.compactions = 0
        self.used = time.monotonic()
        self.refused = ""  # why the latest request was refused (its writer reads status)

    @property
    def who(self) -> str:
        return self.owner or OPERATOR

    def reset(self) -> None:
        """`reset`: forget everything a turn would send again (messages, tools) and the
        last turn (its reply, result, error): the conversation is as new. Its counters
        (turns, tokens) stay: they are what it has cost."""
        self.messages, self.tools = [], []
        self.turn = Turn()
        self.turn.text.end()
        self.state = "idle"

    def status(self) -> str:
        lines = [f"id={self.id}", f"model={self.model.name}", f"owner={self.who}",
                 f"state={self.state}", f"turns={self.turns}", f"messages={len(self.messages)}",
                 f"tools={len(self.tools)}",
                 f"tokens_in={self.tokens_in}", f"tokens_out={self.tokens_out}",
                 f"compactions={self.compactions}", f"corr={self.corr}"]
        if self.turn.error is not None:
            lines.append(f"error={one_line(self.turn.error.text)}")
        if self.refused:
            lines.append(f"refused={self.refused}")
        return "\n".join(lines) + "\n"

    def last(self) -> str:
        return json.dumps(self.turn.result) + "\n" if self.turn.result else ""

    def history(self) -> str:
        return "".join(json.dumps(m) + "\n" for m in self.messages)


def tokens_of(messages: list[dict]) -> int:
    return sum(tokens.count(json.dumps(m)) for m in messages)


async def compact(conv: Conversation, ids: dict, max_tokens: int, kernel: "Kernel") -> None:
    """L1 memory: before the conversation overflows the context window, the older
    messages become the model's summary of them (the newest KEEP_MESSAGES stay);
    a message too long on its own is cut in the middle. Never fails for length."""
    window = conv.model.context_window
    before = tokens_of(conv.messages)
    if before + max_tokens <= window:
        return
    head = [m for m in conv.messages[:1] if m.get("role") == "system"]
    body = conv.messages[len(head):]
    keep = body[-KEEP_MESSAGES:]
    while keep and keep[0].get("role") == "tool":  # a tool result needs its call
        keep = keep[1:]
    old = body[:len(body) - len(keep)]
    if old:
        text = "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in old)
        room = max(window // 2, 1) * 4
        result = await conv.model.provider.chat(
            [{"role": "system", "content": SUMMARIZE},
             {"role": "user", "content": text[-room:]}], [], max(64, window // 8), 0,
            lambda _: None)
        kernel.record("model_call", tokens_in=result["tokens_in"],
                           tokens_out=result["tokens_out"], ms=0, finish="compaction", **ids)
        head = head + [{"role": "system", "content": "Summary of the earlier conversation: "
                        + result["content"]}]
    conv.messages = head + keep
    limit = max(256, (window - max_tokens) * 4 // max(len(conv.messages), 1))
    for m in conv.messages:  # still too long: cut the longest in the middle
        content = m.get("content")
        if isinstance(content, str) and len(content) > limit and \
                tokens_of(conv.messages) + max_tokens > window:
            m["content"] = content[:limit // 2] + "\n[... cut to fit the context window ...]\n" \
                + content[-limit // 2:]
    conv.compactions += 1
    kernel.log.append("conversation_compacted", before_tokens=before,
                           after_tokens=tokens_of(conv.messages), dropped=len(old), **ids)


def assistant_message(result: dict) -> dict:
    msg = {"role": "assistant", "content": result["content"]}
    if result["tool_calls"]:
        msg["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["name"],
                                           "arguments": json.dumps(c["arguments"])}}
                             for c in result["tool_calls"]]
    return msg
