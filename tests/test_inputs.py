"""Every structure a caller writes is checked item by item before it is kept (issue 26,
item 2), on a real mount: model requests (their messages, tools and options), manifests
(spawn lines and agents/ definitions), mail headers and bodies, ctl arguments. Each
hostile input gets EINVAL (or the documented errno) with the reason in words, never EIO
and never a `bug` event (the `mount` fixture fails on one), and nothing accepted before
it is lost: the test checks the conversation, the agent or the mailbox afterwards."""
import errno
import json
import os

import pytest

from conftest import Events, Mount, fuse_unavailable

pytestmark = pytest.mark.skipif(bool(fuse_unavailable()),
                                reason=f"cannot mount FUSE: {fuse_unavailable()}")
TOOL = {"type": "function", "function": {
    "name": "read", "description": "read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}
SCRIPT = '[[rule]]\nmatch = "(?i)investigate (\\\\S+)"\ncall = "read"\nargs = { path = "{1}" }\n'


def put(m: Mount, rel: str, *chunks: bytes) -> tuple[int | None, int | None]:
    """Write chunks (one write(2) each) to rel and close it: (errno of the first write
    that failed, errno of close), None where it succeeded."""
    fd = os.open(m.path / rel, os.O_WRONLY)
    at_write = at_close = None
    try:
        for chunk in chunks:
            os.write(fd, chunk)
    except OSError as e:
        at_write = e.errno
    finally:
        try:
            os.close(fd)
        except OSError as e:
            at_close = e.errno
    return at_write, at_close


def refusal(ev: Events, what: str) -> str:
    """The reason of the next `refused` event."""
    seen = ev.until(lambda s: any(e["kind"] == "refused" for e in s), what=f"refusal of {what}")
    return next(e for e in seen if e["kind"] == "refused")["reason"]


def status(m: Mount, rel: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in m.read(rel).splitlines())


def turn(m: Mount, conv: str, request: str) -> str:
    m.write(f"{conv}/request", request)
    return m.read(f"{conv}/reply")


@pytest.fixture
def tooly(tmp_path):
    """A mount whose model `tooly` (scripted) asks for the tool `read` when the request
    offers it and the message says `investigate X`."""
    m = Mount(tmp_path)
    m.state.mkdir(parents=True)
    (tmp_path / "script.toml").write_text(SCRIPT)
    (m.state / "models.toml").write_text(
        f'[models.tooly]\nprovider = "scripted"\nscript = "{tmp_path / "script.toml"}"\n')
    m.mount()
    try:
        yield m
    finally:
        m.umount()
    assert not m.bugs(), m.bugs()


# --- the finding ---------------------------------------------------------------------

def test_a_malformed_tool_is_refused_at_write_and_reset_clears_tools(tooly):
    m = tooly
    ev = Events(m)
    conv = f"models/tooly/{m.read('models/tooly/clone').strip()}"
    # the finding, as a shell runs it: the write fails, with the reason
    r = m.sh(f"printf '{{\"tools\": [1]}}' > {conv}/request; echo printf=$?; "
             f"cat {conv}/reply; echo cat=$?")
    assert r.stdout == "printf=1\ncat=0\n", r  # (the reply: no EIO)
    assert "tools[0]: Input should be an object" in refusal(ev, "tools [1]")
    assert status(m, f"{conv}/status")["tools"] == "0"
    # the next valid request works; offered tools are used and kept for later turns
    assert turn(m, conv, "hello") == "(scripted model) you said: hello"
    reply = turn(m, conv, json.dumps({"messages": [{"role": "user", "content": "investigate a"}],
                                      "tools": [TOOL]}))
    assert "tool_call call_1 read" in reply
    m.write(f"{conv}/request", json.dumps(
        {"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "text"}]}))
    assert m.read(f"{conv}/reply") == "(scripted model) the tool said: text"
    assert "tool_call call_1 read" in turn(m, conv, "investigate b")  # tools kept
    assert status(m, f"{conv}/status")["tools"] == "1"
    # reset forgets messages, tools and the last turn
    m.write(f"{conv}/ctl", "reset\n")
    s = status(m, f"{conv}/status")
    assert (s["messages"], s["tools"], s["state"]) == ("0", "0", "idle")
    assert m.read(f"{conv}/history") == "" and m.read(f"{conv}/last") == ""
    assert turn(m, conv, "investigate c") == "(scripted model) you said: investigate c"
    ev.close()


def test_a_request_refused_at_close_keeps_nothing(mount, events):
    conv = f"models/scripted/{mount.read('models/scripted/clone').strip()}"
    assert turn(mount, conv, "first") == "(scripted model) you said: first"
    # JSON cut in two writes: the first is no whole object yet, so close(2) decides
    assert put(mount, f"{conv}/request", b'{"tools": [', b'1]}') == (None, errno.EINVAL)
    assert "tools[0]" in refusal(events, "a request in two writes")
    assert put(mount, f"{conv}/request", b'{"messages": [', b"}") == (None, errno.EINVAL)
    assert "malformed JSON request" in refusal(events, "JSON malformed in its second write")
    assert put(mount, f"{conv}/request", b"{not json") == (errno.EINVAL, errno.EINVAL)
    assert "malformed JSON request: key must be a string" in refusal(events, "{not json")
    s = status(mount, f"{conv}/status")
    assert (s["messages"], s["tools"], s["turns"]) == ("2", "0", "1")
    assert mount.read(f"{conv}/reply") == "(scripted model) you said: first"
    # a conversation with nothing to send
    fresh = f"models/scripted/{mount.read('models/scripted/clone').strip()}"
    assert put(mount, f"{fresh}/request", b"{}") == (errno.EINVAL, errno.EINVAL)
    assert "no messages" in refusal(events, "{}")
    assert turn(mount, fresh, "now") == "(scripted model) you said: now"


# --- model requests --------------------------------------------------------------------

def _tool(**function) -> dict:
    return {"type": "function", "function": {"name": "read", **function}}


def _call(**function) -> dict:
    return {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "read", **function}}]}


DEEP = {"type": "object"}
for _ in range(300):
    DEEP = {"items": DEEP}
USER = {"role": "user", "content": "x"}

REQUESTS = [  # (the request, words of the reason)
    # wrong types
    ({"tools": [1]}, "tools[0]: Input should be an object"),
    ({"tools": "read"}, "tools: Input should be a valid"),
    ({"messages": "hi"}, "messages: Input should be a valid array"),
    ({"messages": [USER, 5]}, "messages[1]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "boss", "content": "x"}]}, "does not match any of the expected tags"),
    ({"max_tokens": "5"}, "max_tokens: Input should be a valid integer"),
    ({"max_tokens": 5.0}, "max_tokens: Input should be a valid integer"),
    ({"max_tokens": True}, "max_tokens: Input should be a valid integer"),
    ({"temperature": "hot"}, "temperature: Input should be a valid number"),
    # nested wrong types
    ({"tools": [{"type": "function", "function": {"name": 5}}]}, "tools[0].function.name"),
    ({"tools": [_tool(parameters=[])]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": []}]}, "tools[0].function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "read"}}]}, "tools[0].type"),
    ({"messages": [_call(arguments="[1]")]}, "arguments: the text of a JSON object"),
    ({"messages": [_call(arguments='{"a": ')]}, "arguments: not JSON"),
    ({"messages": [_call(arguments={"path": "x"})]}, "arguments: Input should be a valid string"),
    ({"messages": [{"role": "assistant", "tool_calls": [5]}]}, "messages[0].tool_calls[0]"),
    # huge numbers, NaN and infinities
    ({"max_tokens": 10 ** 30}, "max_tokens: Input should be less than or equal to"),
    ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"temperature": 1e308}, "temperature: Input should be less than or equal to 2"),
    ('{"temperature": NaN}', "temperature: Input should be a finite number"),
    ('{"temperature": -Infinity}', "temperature: Input should be a finite number"),
    ('{"tools": [{"type": "function", "function": {"name": "read", "parameters": '
     '{"maximum": 1e999}}}]}', "parameters: inf is not a finite number"),
    ('{"tools": [{"type": "function", "function": {"name": "read", "parameters": '
     '{"enum": [NaN]}}}]}', "parameters: nan is not a finite number"),
    ({"tools": [_tool(parameters={"maximum": 2 ** 70})]}, "does not fit in 64 bits"),
    ({"messages": [_call(arguments='{"n": Infinity}')]}, "not a finite number"),
    ('{"max_tokens": 1' + "0" * 5000 + "}", "malformed JSON request"),
    # very long strings, control characters
    ({"tools": [_tool(name="r" * 65)]}, "tools[0].function.name: String should match"),
    ({"messages": [{"role": "tool", "tool_call_id": "c" * 300, "content": "x"}]},
     "tool_call_id: String should"),
    ({"messages": [{"role": "tool", "tool_call_id": "a\nb", "content": "x"}]},
     "tool_call_id: one line of printable text"),
    ({"messages": [{"role": "tool", "tool_call_id": "ab", "content": "x", "tool": 1}]},
     "messages[0].tool: Extra inputs are not permitted"),
    # unknown keys
    ({"stream": True}, "stream: Extra inputs are not permitted"),
    ({"messages": [{**USER, "images": []}]}, "messages[0].images: Extra inputs"),
    ({"tools": [_tool(returns="text")]}, "tools[0].function.returns: Extra inputs"),
    # empty and missing
    ({"messages": [{"role": "user"}]}, "messages[0].content: Field required"),
    ({"messages": [{}]}, "Unable to extract tag using discriminator 'role'"),
    ({"messages": [{"role": "assistant"}]}, "an assistant message has content or tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": []}]}, "tool_calls"),
    ({"tools": [{}]}, "tools[0].type: Field required"),
    ({"tools": [_tool(name="")]}, "tools[0].function.name: String should match"),
    ({"messages": [{"role": "tool", "tool_call_id": "", "content": "x"}]}, "tool_call_id"),
    # deep nesting, a tool offered twice, too many, a result that answers nothing
    ({"tools": [_tool(parameters=DEEP)]}, "malformed JSON request: recursion limit exceeded"),
    ({"tools": [TOOL, TOOL]}, "tool 'read' offered twice"),
    ({"tools": [_tool(name=f"t{i}") for i in range(129)]}, "tools: List should have at most 128"),
    ({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]},
     "'nope' answers no tool call of this conversation"),
]


def test_hostile_model_requests_are_refused_item_by_item(mount, events):
    conv = f"models/scripted/{mount.read('models/scripted/clone').strip()}"
    assert turn(mount, conv, "keep me") == "(scripted model) you said: keep me"
    before = mount.read(f"{conv}/history")
    for request, words in REQUESTS:
        data = (request if isinstance(request, str) else json.dumps(request)).encode()
        # a whole JSON object in one write(2): refused there, and close(2) says it again
        assert put(mount, f"{conv}/request", data) == (errno.EINVAL, errno.EINVAL), request
        reason = refusal(events, data[:80])
        assert words in reason, (request, reason)
        assert mount.read(f"{conv}/history") == before, request
    s = status(mount, f"{conv}/status")
    assert (s["state"], s["turns"], s["tools"]) == ("done", "1", "0")
    assert turn(mount, conv, "still here") == "(scripted model) you said: still here"
    assert len(mount.read(f"{conv}/history").splitlines()) == 4


# --- manifests ---------------------------------------------------------------------------

SPAWNS = [  # (words after `spawn bad cmd=cat unconfined=true`, words of the reason)
    ("subscribe=5", "subscribe must be a list of strings"),
    ("'subscribe=[\"ok\", 1]'", "subscribe must be a list of strings"),
    ("'subscribe=[\"a/b\"]'", "'a/b' is not a topic name"),
    ("priority=[1]", "priority = [1]"),
    ("'cmd=[\"cat\", 1]'", "cmd must be a non-empty list of strings"),
    ("'env={A=1}'", "env must be a table of strings"),
    ("'unveil={\"vault\"=1}'", "expected r, w or rw"),
    ("'pledge=[\"read\", \"inet\"]' 'net={connect=[1.5]}'", "[net] connect must be a list"),
    ("'budget={tokens_per_day=\"lots\"}'", "tokens_per_day must be a whole number"),
    ("max_restarts=" + "9" * 5000, "max_restarts: Exceeds the limit"),
    ("max_restarts=" + "9" * 30, "does not fit in 64 bits"),
    ("'budget={tokens_per_day=" + "9" * 30 + "}'", "does not fit in 64 bits"),
    ("'limits={memory_mb=" + "9" * 18 + "}'", "memory_mb must be a whole number from 16 to"),
    ("'limits={processes=5000000}'", "processes must be a whole number from 8 to 4194304"),
    ("timeout_s=nan", "nan is not a finite number"),
    ("within_s=inf", "inf is not a finite number"),
    ("'memory={max_bytes=-inf}'", "-inf is not a finite number"),
    ("'env={A=\"" + "x" * 70000 + "\"}'", "a string over 65536 bytes"),
    ("'sla=\"one\\ntwo\"'", "sla must be one line of text"),
    ("description=5", "description must be one line of text"),
    ("'provides=[\"a\\u0001b\"]'", "cannot be a file name"),
    ("'provides=[" + '"a",' * 1100 + "]'", "over 1024 entries"),
    ("'limits=" + "{a=" * 20 + "1" + "}" * 20 + "'", "nested too deeply"),
    ("cmd=''", "cmd must be a non-empty list"),
    ("'cmd=[]'", "cmd must be a non-empty list"),
    ("bogus=1", "unknown key(s) bogus"),
    ("=1", "expected KEY=VALUE"),
]
DEFINITIONS = [  # (agent.toml after `cmd = ["cat"]` and `unconfined = true`, reason)
    ("subscribe = 5", "subscribe must be a list of strings"),
    ("max_restarts = " + "9" * 5000, "malformed manifest"),
    ("max_restarts = 99999999999999999999", "does not fit in 64 bits"),
    ("timeout_s = nan", "nan is not a finite number"),
    ('description = """two\nlines"""', "description must be one line of text"),
    ('[env]\nA = "' + "x" * 70000 + '"', "a string over 65536 bytes"),
    ("[limits]\nprocesses = 99999999", "processes must be a whole number from 8"),
    ("[limits]\nmemory_mb = true", "memory_mb must be a whole number"),
    ("[net]\nconnect = [0]", "[net] connect must be a list of TCP ports"),
    ("[unveil]\nvault = 1", "expected r, w or rw"),
    ("spawns = [[1]]", "spawns must be a list of strings"),
    ("max_instances = 0", "max_instances must be an integer >= 1"),
    ("max_instances = true", "max_instances must be an integer >= 1"),
    ("sla = 1979-05-27", "date values are not allowed"),
]


def test_hostile_manifests_are_refused_and_nothing_is_lost(mount, events):
    mount.write("ctl", "spawn keep cmd=cat unconfined=true subscribe='[\"t\"]'\n")
    mount.write("agents/keep/in", "before\n")
    mount.wait_for(lambda: mount.status("keep")["done"] == "1", what="keep's first task")
    for words, reason in SPAWNS:
        line = f"spawn bad cmd=cat unconfined=true {words}\n".encode()
        assert put(mount, "ctl", line) == (errno.EINVAL, None), words[:80]
        said = refusal(events, words[:80])
        assert reason in said, (words[:80], said)
    mount.define("bad", "")
    assert put(mount, "ctl", b"spawn bad") == (errno.EINVAL, None)
    assert "cmd must be a non-empty list" in refusal(events, "an empty definition")
    for toml, reason in DEFINITIONS:
        mount.define("bad", f'cmd = ["cat"]\nunconfined = true\n{toml}\n')
        assert put(mount, "ctl", b"spawn bad") == (errno.EINVAL, None), toml[:80]
        said = refusal(events, toml[:80])
        assert reason in said, (toml[:80], said)
    mount.define("bad", 'driver = "llm"\nunconfined = true\nmax_steps = true\n')
    assert put(mount, "ctl", b"spawn bad") == (errno.EINVAL, None)
    assert "max_steps must be a whole number" in refusal(events, "max_steps = true")
    assert os.listdir(mount.path / "agents") == ["keep"]
    # what was there still works: its task, a new one, a publish its subscription takes
    mount.write("agents/keep/in", "after\n")
    mount.wait_for(lambda: mount.status("keep")["done"] == "2", what="keep's second task")
    mount.write("topics/t", "news\n")
    mount.wait_for(lambda: any("news" in mount.read(f"agents/keep/mail/{n}")
                               for n in os.listdir(mount.path / "agents/keep/mail")
                               if n[0].isdigit()), what="the event as mail")


# --- mail --------------------------------------------------------------------------------

MAIL = [  # (the message, errno, words of the reason)
    (b"x-a: \x01\n\nbody", errno.EINVAL, "bad value for x-a"),
    (b"x-a: 1\xc2\x85x-b: 2\n\nbody", errno.EINVAL, "bad value for x-a"),  # NEL
    ("x-a: one\u2028two\n\nbody".encode(), errno.EINVAL, "bad value for x-a"),
    (b"x-c: 1\nx-a b: 2\n\nbody", errno.EINVAL, "bad header name 'x-a b'"),
    ("x-c: 1\nx-\u00e9: 1\n\nbody".encode(), errno.EINVAL, "bad header name"),
    (b"x-" + b"a" * 70 + b": 1\n\nbody", errno.EINVAL, "bad header name"),
    (b"x-a: " + b"v" * 1000 + b"\n\nbody", errno.EINVAL, "is over 998 characters"),
    (b"x-a: \xff\n\nbody", errno.EINVAL, "not UTF-8"),
    (b"subject: hi\n\nbody", errno.EINVAL, "unknown header 'subject'"),
    (b"priority: urgent\n\nbody", errno.EINVAL, "bad priority 'urgent'"),
    (b"priority: 1\n\nbody", errno.EINVAL, "bad priority '1'"),
    (b"classification: secret\n\nbody", errno.EINVAL, "bad classification"),
    (b"type:\n\nbody", errno.EINVAL, "bad value for type"),
    (b"correlation-id: " + b"c" * 201 + b"\n\nbody", errno.EINVAL, "bad value for correlation-id"),
    (b"deadline: +1e308\n\nbody", errno.EINVAL, "bad deadline"),
    (b"deadline: +nan\n\nbody", errno.EINVAL, "bad deadline"),
    (b"deadline: +inf\n\nbody", errno.EINVAL, "bad deadline"),
    (b"deadline: 9999-12-31T23:59:59\n\nbody", errno.EINVAL, "bad deadline"),
    (b"deadline: 2026-01-01T00:00:00+99:00\n\nbody", errno.EINVAL, "bad deadline"),
    (b"to: keep\nto: keep\n\nbody", errno.EINVAL, "given twice"),
    (b"to: other\n\nbody", errno.EINVAL, "does not match this mailbox"),
    (b"x-a: 1\nfrom: me\n\nbody", errno.EPERM, "stamped by the kernel"),
    (b"x-task: 7\n\nbody", errno.EPERM, "stamped by the kernel"),
]


def test_hostile_mail_headers_are_refused_at_write(mount, events):
    mount.write("ctl", "spawn keep cmd=cat unconfined=true\n")
    mount.write("agents/keep/mail/new", "x-n: 1\n\nthe first\n")
    first = os.listdir(mount.path / "agents/keep/mail")
    for message, code, words in MAIL:
        assert put(mount, "agents/keep/mail/new", message) == (code, code), message[:60]
        said = refusal(events, message[:60])
        assert words in said, (message[:60], said)
    assert os.listdir(mount.path / "agents/keep/mail") == first
    # a header block a later write ends (bash's printf writes a line at a time): checked
    # at that write(2)
    assert put(mount, "agents/keep/mail/new", b"priority: urgent\n", b"\nbody") == \
        (errno.EINVAL, errno.EINVAL)
    assert "bad priority" in refusal(events, "headers in two writes")
    # bodies are the sender's bytes, delivered as written, at most 1 MiB with the headers
    body = bytes(range(256)) * 4
    assert put(mount, "agents/keep/mail/new", b"x-n: 2\n\n" + body) == (None, None)
    assert put(mount, "agents/keep/mail/new", b"x-n: 3\n\n" + b"b" * (1 << 20)) == \
        (None, errno.EFBIG)
    assert "over 1048576 bytes" in refusal(events, "a big body")
    names = [n for n in os.listdir(mount.path / "agents/keep/mail") if n[0].isdigit()]
    assert len(names) == 2
    with open(mount.path / "agents/keep/mail" / sorted(names)[-1], "rb") as f:
        assert f.read().endswith(b"\n\n" + body)
    assert mount.read(f"agents/keep/mail/{sorted(names)[0]}").endswith("the first\n")


# --- ctl arguments -----------------------------------------------------------------------

CTLS = [  # (file, the write, errno, words of the reason)
    ("agents/keep/ctl", b"stop\x1cstart", errno.EINVAL, "control character U+001C"),
    ("agents/keep/ctl", "stop\u2028start".encode(), errno.EINVAL, "control character U+2028"),
    ("agents/keep/ctl", b"run a\xc2\x85b", errno.EINVAL, "control character U+0085"),
    ("agents/keep/ctl", b"run a\x00b", errno.EINVAL, "control character U+0000"),
    ("agents/keep/ctl", b"priority \x00", errno.EINVAL, "control character U+0000"),
    ("agents/keep/ctl", b"priority " + b"n" * 100000, errno.EINVAL, "bad priority"),
    ("agents/keep/ctl", b"priority 1e999", errno.EINVAL, "bad priority '1e999'"),
    ("agents/keep/ctl", b"priority", errno.EINVAL, "bad # args to command 'priority'"),
    ("agents/keep/ctl", b"stop now", errno.EINVAL, "bad # args to command 'stop now'"),
    ("agents/keep/ctl", b"\n\n  \n", errno.EINVAL, "empty ctl write"),
    ("agents/keep/ctl", b"run x\nfrob\n", errno.EINVAL, "unknown control message 'frob'"),
    ("ctl", b"kill keep\x00", errno.EINVAL, "control character U+0000"),
    ("ctl", b"kill keep\x1ckill keep", errno.EINVAL, "control character U+001C"),
    ("ctl", b"kill " + b"x" * 5000, errno.ENOENT, "no such agent"),
    ("ctl", b"spawn " + b"x" * 100 + b" cmd=cat", errno.EINVAL, "bad agent name"),
    ("ctl", b"spawn a def=[1] cmd=cat", errno.EINVAL, "bad definition name"),
    ("ctl", b"spawn a cmd='unbalanced", errno.EINVAL, "cannot parse"),
    ("ctl", b"halt\xff", errno.EINVAL, "not UTF-8"),
    ("models/scripted/1/ctl", b"reset now", errno.EINVAL, "bad # args to command 'reset now'"),
    ("models/scripted/1/ctl", b"reset\x0bclose", errno.EINVAL, "control character U+000B"),
]


def test_hostile_ctl_arguments_are_refused_and_nothing_applies(mount, events):
    mount.write("ctl", "spawn keep cmd=cat unconfined=true\n")
    mount.write("agents/keep/ctl", "run kept\n")
    mount.wait_for(lambda: mount.status("keep")["done"] == "1", what="keep's task")
    assert mount.read("models/scripted/clone").strip() == "1"
    for rel, data, code, words in CTLS:
        assert put(mount, rel, data) == (code, None), data[:60]
        said = refusal(events, data[:60])
        assert words in said, (data[:60], said)
    s = mount.status("keep")
    assert (s["state"], s["done"], s["queued"], s["priority"]) == ("idle", "1", "0", "normal")
    assert os.listdir(mount.path / "agents") == ["keep"]
    assert os.path.isdir(mount.path / "models/scripted/1")
    task = os.listdir(mount.path / "agents/keep/tasks")[0]
    assert mount.read(f"agents/keep/tasks/{task}/out") == "kept\n"
    # steps: a JSON object is a step; anything else, however deep or odd, a note
    for line in (b"[" * 5000, b'{"a": NaN}', b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        assert put(mount, "agents/keep/steps", line + b"\n") == (None, None)
    seen = events.until(lambda s: sum(e["kind"] == "agent_step" for e in s) >= 3,
                        what="three steps")
    assert [e["step"]["kind"] for e in seen if e["kind"] == "agent_step"] == ["note"] * 3
