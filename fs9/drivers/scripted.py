"""The scripted model: deterministic replies from a script. Not a language model.

It is the offline default of `make run`, the examples and the tests: fs9 runs with
no model server and no weights, and every run answers the same. It is labelled as
what it is wherever it shows (`models/scripted/info`, its replies by default).

A script is TOML, rules tried in order against the conversation's last message;
the first that matches answers:

    [[rule]]
    match = "(?i)bug report: (.*)"   # a regex, searched in the last message's content
    role = "user"                    # optional: only when the last message has this role
    reply = "Triaged: {1}"           # text; {0}, {1}... are the match and its groups
    [[rule]]
    match = "(?i)investigate (\\S+)"
    call = "read"                    # or: a tool call (needs the request to offer it)
    args = { path = "vault/code/{1}" }

With no script, or no rule matching, it echoes. A request whose system message
starts with SUMMARIZE (fs9 compacting a conversation) gets a deterministic summary:
the first words of each message. Token counts are estimates (words), as a local
test server's.
"""
import errno
import json
import re
import tomllib

from ..errors import Fs9Error

LABEL = "scripted: deterministic replies from a script, not a language model"


def load_script(path: str) -> list[dict]:
    """The rules of a script file, checked (EINVAL naming the rule)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise Fs9Error(errno.ENOENT, f"model script {path}: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        raise Fs9Error(errno.EINVAL, f"model script {path}: {e}")
    rules = raw.get("rule", [])
    for i, rule in enumerate(rules):
        where = f"model script {path}, rule {i + 1}"
        if set(rule) - {"match", "role", "reply", "call", "args"}:
            raise Fs9Error(errno.EINVAL, f"{where}: unknown keys {sorted(set(rule) - {'match', 'role', 'reply', 'call', 'args'})}")
        if ("reply" in rule) == ("call" in rule):
            raise Fs9Error(errno.EINVAL, f"{where}: needs exactly one of reply, call")
        try:
            rule["regex"] = re.compile(rule.get("match", ""), re.S)
        except re.error as e:
            raise Fs9Error(errno.EINVAL, f"{where}: bad match: {e}")
    return rules


def words(text: str) -> int:
    return len(text.split())


def prompt_tokens(messages: list[dict]) -> int:
    return sum(words(_text(m)) + 1 for m in messages)


def _text(message: dict) -> str:
    content = message.get("content") or ""
    return content if isinstance(content, str) else json.dumps(content)


def _fill(template, groups: tuple):
    if isinstance(template, str):
        try:
            return template.format(*groups)
        except (IndexError, KeyError, ValueError):
            return template
    if isinstance(template, dict):
        return {k: _fill(v, groups) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, groups) for v in template]
    return template


def answer(rules: list[dict], messages: list[dict], tools: list[dict]) -> tuple[str, list]:
    """(content, tool calls) for a conversation; deterministic."""
    if messages and messages[0].get("role") == "system" and \
            _text(messages[0]).startswith("SUMMARIZE"):
        return "summary: " + " | ".join(" ".join(_text(m).split()[:8])
                                        for m in messages[1:]), []
    last = messages[-1] if messages else {"role": "user", "content": ""}
    text = _text(last)
    offered = {(t.get("function") or t).get("name") for t in tools}
    for rule in rules:
        if rule.get("role") and rule["role"] != last.get("role"):
            continue
        m = rule["regex"].search(text)
        if m is None:
            continue
        groups = (m.group(0),) + m.groups()
        if "reply" in rule:
            return _fill(rule["reply"], groups), []
        if rule["call"] not in offered:
            continue  # a call the request cannot take: try the next rule
        return "", [{"name": rule["call"], "arguments": _fill(rule.get("args", {}), groups)}]
    if last.get("role") == "tool":
        return f"(scripted model) the tool said: {text}", []
    return f"(scripted model) you said: {text}", []
