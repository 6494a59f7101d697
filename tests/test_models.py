"""models/: models as files, on a real mount. Real HTTP through llama-index to the
local model server (tests/modelserver.py), the scripted model, budgets, rates,
the scheduler, halt, compaction, privacy of conversations, usage across remounts."""
import errno
import json
import os
import subprocess
import time

import pytest

from conftest import Events, Mount, errno_of, fuse_unavailable, read_until
from modelserver import ModelServer

pytestmark = pytest.mark.skipif(bool(fuse_unavailable()),
                                reason=f"cannot mount FUSE: {fuse_unavailable()}")
KEY = "sk-test-do-not-show-9f3b"
TOOLS = [{"type": "function", "function": {
    "name": "read", "description": "read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]


@pytest.fixture
def server():
    s = ModelServer(api_key=KEY)
    yield s
    s.stop()


def configured(tmp_path, toml: str) -> Mount:
    m = Mount(tmp_path)
    m.state.mkdir(parents=True, exist_ok=True)
    (m.state / "models.toml").write_text(toml)
    return m.mount()


@pytest.fixture
def mounted_with(tmp_path):
    made = []

    def make(toml: str) -> Mount:
        made.append(configured(tmp_path, toml))
        return made[-1]
    yield make
    for m in made:
        m.umount()
        assert not m.bugs(), m.bugs()


def converse(m: Mount, model: str, request: str, base: str = "") -> tuple[str, str]:
    """Open a conversation, send one request, read the whole reply."""
    cid = m.read(f"{base}models/{model}/clone").strip()
    m.write(f"{base}models/{model}/{cid}/request", request)
    return cid, m.read(f"{base}models/{model}/{cid}/reply")


def info(m: Mount, model: str) -> dict:
    return dict(line.split("=", 1) for line in m.read(f"models/{model}/info").splitlines())



def test_the_scripted_model_through_files(mount):
    assert sorted(os.listdir(mount.path / "models")) == ["scripted", "usage"]
    assert "not a language model" in info(mount, "scripted")["label"]
    cid, reply = converse(mount, "scripted", "hello there\n")
    assert reply == "(scripted model) you said: hello there\n"
    assert sorted(os.listdir(mount.path / f"models/scripted/{cid}")) == \
        ["ctl", "history", "last", "reply", "request", "status"]
    last = json.loads(mount.read(f"models/scripted/{cid}/last"))
    assert last["content"] == reply and last["tool_calls"] == [] and last["tokens_in"] > 0
    # a second turn continues the conversation
    mount.write(f"models/scripted/{cid}/request", "and again")
    assert mount.read(f"models/scripted/{cid}/reply").endswith("you said: and again")
    history = [json.loads(line) for line in mount.read(f"models/scripted/{cid}/history").splitlines()]
    assert [h["role"] for h in history] == ["user", "assistant", "user", "assistant"]
    assert "operator scripted calls=2" in mount.read("models/usage")
    # bad requests fail the write, say why, and change nothing
    ev = Events(mount)  # (refused at close(2): a shell would not say so; a program does)
    assert errno_of(mount.write, f"models/scripted/{cid}/request", "{not json") == errno.EINVAL
    refused = ev.wait_kind("refused")
    assert "malformed JSON request" in json.dumps(refused)
    ev.close()
    assert len(mount.read(f"models/scripted/{cid}/history").splitlines()) == 4
    assert errno_of(mount.write, f"models/scripted/{cid}/request",
                    '{"messages": [{"role": "boss", "content": "x"}]}') == errno.EINVAL
    mount.write(f"models/scripted/{cid}/ctl", "close\n")
    assert not (mount.path / f"models/scripted/{cid}").exists()
    assert errno_of(mount.read, "models/nosuch/info") == errno.ENOENT


def test_an_openai_compatible_server_over_real_http(mounted_with, server):
    m = mounted_with(f'[models.local]\nprovider = "openai"\napi_base = "{server.url}/v1"\n'
                     f'model = "toy"\napi_key = "{KEY}"\ncontext_window = 4096\n')
    m.wait_for(lambda: info(m, "local")["state"] == "reachable", what="probe")
    cid, reply = converse(m, "local", "hi there")
    assert reply == "echo: hi there"
    last = json.loads(m.read(f"models/local/{cid}/last"))
    assert (last["tokens_in"], last["tokens_out"]) == (3, 3)  # the server's own counts
    # tools: the model asks for a call; the caller answers it; the model goes on
    m.write(f"models/local/{cid}/request", json.dumps(
        {"messages": [{"role": "user", "content": 'CALL read {"path": "vault/a.md"}'}],
         "tools": TOOLS}))
    assert "tool_call call_1 read" in m.read(f"models/local/{cid}/reply")
    last = json.loads(m.read(f"models/local/{cid}/last"))
    assert last["tool_calls"] == [{"id": "call_1", "name": "read",
                                   "arguments": {"path": "vault/a.md"}}]
    m.write(f"models/local/{cid}/request", json.dumps(
        {"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "the text"}]}))
    assert m.read(f"models/local/{cid}/reply") == "tool said: the text"
    sent = server.requests[-1][1]
    assert [x["role"] for x in sent["messages"]] == ["user", "assistant", "user", "assistant",
                                                      "tool"]
    assert sent["messages"][3]["tool_calls"][0]["function"]["name"] == "read"
    # the credential goes to the server and nowhere in the namespace
    assert all(h.get("authorization") == f"Bearer {KEY}" for p, _, h in server.requests
               if p.endswith("/chat/completions"))
    shown = "".join(m.read(p) for p in ("models/local/info", "models/usage",
                                        f"models/local/{cid}/status", f"models/local/{cid}/last",
                                        f"models/local/{cid}/history", "log/audit"))
    assert KEY not in shown and "toy" in shown


def test_ollama_over_real_http(mounted_with, server):
    m = mounted_with(f'[models.llama]\nprovider = "ollama"\napi_base = "{server.url}"\n'
                     f'model = "toy"\napi_key = "{KEY}"\n')
    cid, reply = converse(m, "llama", "hello ollama")
    assert reply == "echo: hello ollama"
    m.write(f"models/llama/{cid}/request", json.dumps(
        {"messages": [{"role": "user", "content": 'CALL read {"path": "x"}'}], "tools": TOOLS}))
    m.read(f"models/llama/{cid}/reply")
    last = json.loads(m.read(f"models/llama/{cid}/last"))
    assert [(c["name"], c["arguments"]) for c in last["tool_calls"]] == [("read", {"path": "x"})]
    assert any(p == "/api/chat" for p, _, _ in server.requests)


def test_an_unreachable_model_says_so_and_recovers(mounted_with, server):
    port = server.port
    server.stop()
    m = mounted_with(f'[models.local]\nprovider = "openai"\napi_base = "{server.url}/v1"\n'
                     f'api_key = "{KEY}"\n')
    m.wait_for(lambda: info(m, "local")["state"] == "unreachable", what="probe")
    assert f"cannot reach http://127.0.0.1:{port}/v1" in info(m, "local")["reason"]
    ev = Events(m)
    cid = m.read("models/local/clone").strip()
    m.write(f"models/local/{cid}/request", "anyone there?")
    r = m.sh(f"cat models/local/{cid}/reply")
    assert r.returncode == 1 and "Connection refused" in r.stderr
    status = m.read(f"models/local/{cid}/status")
    assert "state=failed" in status and "is unreachable" in status
    assert any(e["kind"] == "model_error" for e in ev.wait_kind("model_error"))
    ev.close()
    server.start()
    m.write(f"models/local/{cid}/request", "now?")  # the same conversation goes on
    assert m.read(f"models/local/{cid}/reply") == "echo: now?"


BUDGET_AGENT = """cmd = ["sh", "ask.sh"]
[unveil]
"models/scripted" = "rw"
[budget]
tokens_per_task = 60
"""
ASK = """set -e
m=$FS9_MNT/models/scripted
id=$(cat $m/clone)
for i in 1 2 3 4 5 6; do
  echo "question $i with a few more words in it" > $m/$id/request || { echo "refused at $i"; exit 0; }
  cat $m/$id/reply; echo
done
"""


def test_budgets_refuse_calls_before_they_are_sent(mount):
    mount.define("asker", BUDGET_AGENT, {"ask.sh": ASK})
    mount.write("ctl", "spawn asker\n")
    ev = Events(mount)
    mount.write("agents/asker/in", "go\n")
    out = mount.read("agents/asker/out")  # blocks until the task ends
    assert "refused at" in out and "you said: question 1" in out, out
    events = ev.wait_kind("model_refused")
    ev.close()
    refused = [e for e in events if e["kind"] == "model_refused"]
    assert refused and refused[0]["agent"] == "asker" and "tokens_per_task" in refused[0]["reason"]
    st = mount.status("asker")
    assert int(st["model_calls"]) >= 1 and int(st["tokens_in"]) > 0
    assert st["model_refused"] == "1" and st["budget_tokens_per_task"] == "60"
    assert int(st["tokens_in"]) + int(st["tokens_out"]) <= 60 + 20  # clamped replies
    assert "asker scripted calls=" in mount.read("models/usage")
    assert "over budget: task" in mount.read("agents/asker/err")  # the reason, in words


def test_conversations_are_their_openers(mount):
    for name in ("alice", "bob"):
        mount.define(name, 'cmd = ["cat"]\n[unveil]\n"models/scripted" = "rw"\n')
        mount.write("ctl", f"spawn {name}\n")
    cid, reply = converse(mount, "scripted", "secret plans", base="agents/alice/view/")
    assert "secret plans" in reply
    assert cid in os.listdir(mount.path / "agents/alice/view/models/scripted")
    assert cid not in os.listdir(mount.path / "agents/bob/view/models/scripted")
    assert errno_of(mount.read, f"agents/bob/view/models/scripted/{cid}/history") == errno.ENOENT
    assert cid in os.listdir(mount.path / "models/scripted")  # the operator sees all
    assert "owner=alice" in mount.read(f"models/scripted/{cid}/status")
    assert "alice scripted calls=1" in mount.read("models/usage")
    assert errno_of(os.stat, mount.path / "agents/bob/view/models/usage") == errno.ENOENT


def test_halt_cancels_calls_in_flight(mounted_with):
    m = mounted_with('[models.slow]\nprovider = "scripted"\ntoken_delay_s = 0.2\n')
    cid = m.read("models/slow/clone").strip()
    m.write(f"models/slow/{cid}/request", "word " * 100)  # 20 s of reply
    reader = subprocess.Popen(["cat", str(m.path / f"models/slow/{cid}/reply")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    m.wait_for(lambda: "state=running" in m.read(f"models/slow/{cid}/status"), what="running")
    head = read_until(reader.stdout, lambda out: out.count(b"word") >= 2,
                      what="a few words streamed").decode()
    t0 = time.monotonic()
    m.write("ctl", "halt\n")
    out, err = reader.communicate(timeout=30)
    out = head + out
    assert time.monotonic() - t0 < 15 and reader.returncode == 1  # (the reply: 20 s)
    assert "Operation canceled" in err and out.startswith("(scripted model)")
    assert errno_of(m.write, f"models/slow/{cid}/request", "more") == errno.EBUSY
    m.write("ctl", "resume\n")
    m.write(f"models/slow/{cid}/request", "short")
    assert m.read(f"models/slow/{cid}/reply").endswith("you said: short")


def test_rate_limits_make_calls_wait(mounted_with):
    m = mounted_with('[models.rated]\nprovider = "scripted"\nrequests_per_minute = 1\n')
    converse(m, "rated", "first")
    ev = Events(m)
    cid = m.read("models/rated/clone").strip()
    m.write(f"models/rated/{cid}/request", "second")  # accepted: it waits its turn
    throttled = [e for e in ev.wait_kind("model_throttled") if e["kind"] == "model_throttled"]
    ev.close()
    assert throttled and 55 < throttled[0]["wait_s"] <= 60
    assert "state=queued" in m.read(f"models/rated/{cid}/status")
    m.write(f"models/rated/{cid}/ctl", "close\n")  # ends the wait


def test_interactive_calls_go_first_when_the_model_is_busy(mounted_with):
    m = mounted_with('[models.one]\nprovider = "scripted"\ntoken_delay_s = 0.05\n'
                     'max_concurrent = 1\n')
    for name, prio in (("batch", "background"), ("chat", "interactive")):
        m.define(name, f'cmd = ["cat"]\npriority = "{prio}"\n[unveil]\n"models/one" = "rw"\n')
        m.write("ctl", f"spawn {name}\n")
    ev = Events(m)
    convs = []
    for i in range(4):  # the first holds the model for ~0.5 s; three wait
        cid = m.read("agents/batch/view/models/one/clone").strip()
        m.write(f"agents/batch/view/models/one/{cid}/request", "ten words " * 5)
        convs.append(cid)
    cid = m.read("agents/chat/view/models/one/clone").strip()
    m.write(f"agents/chat/view/models/one/{cid}/request", "quick")
    m.read(f"agents/chat/view/models/one/{cid}/reply")
    for c in convs:
        m.read(f"agents/batch/view/models/one/{c}/reply")
    calls = [e for e in ev.wait_kind("model_call", count=5) if e["kind"] == "model_call"]
    ev.close()
    order = [c["agent"] for c in calls]
    assert order[:2] == ["batch", "chat"], order  # chat overtook the three waiting


def test_a_long_conversation_is_compacted_not_failed(mounted_with):
    m = mounted_with('[models.small]\nprovider = "scripted"\ncontext_window = 300\n'
                     'max_tokens = 50\n')
    cid = m.read("models/small/clone").strip()
    ev = Events(m)
    for i in range(12):
        m.write(f"models/small/{cid}/request", f"turn {i}: " + "lorem ipsum dolor " * 8)
        assert f"turn {i}:" in m.read(f"models/small/{cid}/reply")
    compacted = [e for e in ev.wait_kind("conversation_compacted")
                 if e["kind"] == "conversation_compacted"]
    ev.close()
    assert compacted and compacted[0]["after_tokens"] < compacted[0]["before_tokens"]
    history = [json.loads(x) for x in m.read(f"models/small/{cid}/history").splitlines()]
    assert history[0]["content"].startswith("Summary of the earlier conversation: summary:")
    assert "turn 11:" in history[-2]["content"] and "compactions=" in \
        m.read(f"models/small/{cid}/status")


def test_usage_and_budgets_survive_a_remount(mounted_with, tmp_path):
    m = mounted_with('[limits]\ntokens_per_day = 42\n')  # two calls fit (tiktoken's counts)
    converse(m, "scripted", "one two three four five six seven eight")
    converse(m, "scripted", "one two three four five six seven eight")
    before = m.read("models/usage").splitlines()[-1]
    m.umount()
    m.mount()
    assert m.read("models/usage").splitlines()[-1] == before
    cid = m.read("models/scripted/clone").strip()
    assert errno_of(m.write, f"models/scripted/{cid}/request",
                    "one two three four five six seven eight nine ten") == errno.EDQUOT
    r = m.sh(f"echo 'one two three four five six seven eight nine ten' > models/scripted/{cid}/request")
    assert r.returncode != 0  # refused at write(2), so even a shell says so
