"""What a write to models/NAME/N/request may say, as one schema, checked item by item
before anything of it is kept.

A request is plain text (one user message) or a JSON object in OpenAI's chat shapes:

    {"messages": [MESSAGE...], "tools": [TOOL...], "max_tokens": N, "temperature": T,
     "tool_choice": "auto" | "none" | "required" | {"type": "function",
                                                   "function": {"name": NAME}}}

    MESSAGE  {"role": "system" | "user", "content": TEXT, "name": NAME}
             {"role": "assistant", "content": TEXT | null, "tool_calls": [CALL...]}
             {"role": "tool", "tool_call_id": ID, "content": TEXT}
    CALL     {"id": ID, "type": "function",
              "function": {"name": NAME, "arguments": TEXT of a JSON object}}
    TOOL     {"type": "function", "function": {"name": NAME, "description": TEXT,
                                               "parameters": JSON Schema, "strict": BOOL}}

Required: a message's role and content (an assistant's: content or tool_calls), a
result's tool_call_id, a call's id and function name, a tool's type and function
name; unknown keys are refused. The schema is pydantic's, strict (no coercion: "1" is
not 1): pydantic is already here as llama-index's own model layer. What strict types
cannot say, validators do: numbers in free-form JSON (`parameters`, `arguments`) are
finite and fit in 64 bits (JSON's NaN, Infinity and 1e999 reach a server as text it
refuses), nesting is bounded (the parser's limit), a tool name is offered once. What
depends on the conversation (a tool result answers a call the model made; a turn has
something to send) is `check_turn`.
"""
import errno
import json
import math
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints,
                      ValidationError, model_validator)

from ...errors import Fs9Error

MAX_TOOLS = 128  # OpenAI's own limit on tools offered to one call
MAX_TOKENS = (1 << 31) - 1
INT64 = 1 << 63
BAD_REQUEST = "bad request"
MALFORMED = "malformed JSON request"


def _plain_json(value: Any) -> Any:
    """A tool's free-form JSON (its parameters, a call's arguments): finite numbers
    that fit in 64 bits, since that is what every server can read back."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{v} is not a finite number")
        if isinstance(v, int) and not isinstance(v, bool) and not -INT64 <= v < INT64:
            raise ValueError("a number does not fit in 64 bits")
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return value


def _object_text(text: str) -> str:
    """A call's `arguments`: the text of a JSON object (what the model sent)."""
    try:
        value = json.loads(text or "{}")
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not JSON: {e}")
    if not isinstance(value, dict):
        raise ValueError("the text of a JSON object, like \"{}\"")
    _plain_json(value)
    return text


def _one_line(text: str) -> str:
    if not text.isprintable():
        raise ValueError("one line of printable text (no control characters)")
    return text


Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # OpenAI's rule
# ids are the model's (call_…, toolu_…): any printable line, bounded
Id = Annotated[str, StringConstraints(min_length=1, max_length=256), AfterValidator(_one_line)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_plain_json)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Function(_Strict):
    name: Name
    arguments: Annotated[str, AfterValidator(_object_text)] = "{}"


class ToolCall(_Strict):
    id: Id
    type: Literal["function"] = "function"
    function: Function


class System(_Strict):
    role: Literal["system"]
    content: str
    name: Name | None = None


class User(_Strict):
    role: Literal["user"]
    content: str
    name: Name | None = None


class Assistant(_Strict):
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None
    name: Name | None = None

    @model_validator(mode="after")
    def _says_something(self):
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message has content or tool_calls")
        return self


class ToolResult(_Strict):
    role: Literal["tool"]
    tool_call_id: Id
    content: str


Message = Annotated[Union[System, User, Assistant, ToolResult], Field(discriminator="role")]


class FunctionDef(_Strict):
    name: Name
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(_Strict):
    name: Name


class ChosenTool(_Strict):
    type: Literal["function"]
    function: ChosenFunction


class Request(_Strict):
    messages: list[Message] = []
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    # sent explicitly with tools ("auto" when not given): servers differ on its absence
    tool_choice: Literal["auto", "none", "required"] | ChosenTool | None = None

    @model_validator(mode="after")
    def _tools_once(self):
        names = [t.function.name for t in self.tools or ()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"tool {twice[0]!r} offered twice")
        return self


def parse(data: bytes) -> dict:
    """A request's bytes as plain data: {"messages": [...]} and, when given, "tools",
    "max_tokens", "temperature", "tool_choice". Fs9Error(EINVAL) naming the first bad
    item."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise Fs9Error(errno.EINVAL, "a request is UTF-8 text or JSON")
    if not text.lstrip().startswith("{"):
        if not text.strip():
            raise Fs9Error(errno.EINVAL, "empty request")
        return {"messages": [{"role": "user", "content": text}]}
    try:
        return Request.model_validate_json(text).model_dump(exclude_none=True)
    except ValidationError as e:
        raise Fs9Error(errno.EINVAL, words(e))


def complete(data: bytes) -> dict | None:
    """parse, for the first write of a request: None if more may come (JSON or UTF-8
    cut short: the parser ran out of input, and close(2) decides), else its words or
    the refusal. (Cut anywhere, valid JSON fails only with "EOF while parsing ...":
    an error anywhere else is one no later write can mend.)"""
    try:
        return parse(data)
    except Fs9Error as e:
        if e.text.startswith(f"{MALFORMED}: EOF while parsing") or e.text == "empty request":
            return None
        if e.text.startswith("a request is UTF-8"):
            try:
                data.decode()
            except UnicodeDecodeError as cut:
                if cut.reason == "unexpected end of data":
                    return None
        raise


def words(e: ValidationError) -> str:
    """A pydantic error as one line: where (messages[2].tool_calls[0].id) and why."""
    first = e.errors(include_url=False, include_input=False)[0]
    if first["type"] == "json_invalid":
        return f"{MALFORMED}: {first['msg'].removeprefix('Invalid JSON: ')}"
    loc = list(first["loc"])
    if loc[:1] == ["messages"] and len(loc) > 2:
        del loc[2]  # the role that picked the message's shape: messages[0].content
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    where = where.lstrip(".")
    return f"{BAD_REQUEST}: {where + ': ' if where else ''}{msg}{more}"


def check_turn(kept: list[dict], new: list[dict]) -> None:
    """What a turn needs of the conversation it joins: something to send, and each
    tool result answering a call the model made in it (a server refuses any other,
    and the messages a failed call leaves would fail every turn after it)."""
    if not kept and not new:
        raise Fs9Error(errno.EINVAL, f"{BAD_REQUEST}: no messages, and the conversation "
                                     "has none yet")
    calls = {c["id"] for m in kept if m.get("role") == "assistant"
             for c in m.get("tool_calls", ())}
    for i, m in enumerate(new):
        if m["role"] == "assistant":
            calls.update(c["id"] for c in m.get("tool_calls", ()))
        elif m["role"] == "tool" and m["tool_call_id"] not in calls:
            raise Fs9Error(errno.EINVAL, f"{BAD_REQUEST}: messages[{i}].tool_call_id: "
                                         f"{m['tool_call_id']!r} answers no tool call of "
                                         "this conversation")
