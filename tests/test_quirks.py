"""Real servers as they are: the llm driver against tests/modelserver.py with the quirks
of llama-cpp-python's server (no tool calls without tool_choice; "auto" cannot stream;
no usage in a stream), and every refusal of a model call reaching the task's err and
status as words and an errno. The real server itself: tests/test_realmodel.py."""
import errno
import json

import pytest

from conftest import Mount, fuse_unavailable
from fs9.drivers import confine
from modelserver import LLAMA_CPP_PYTHON, ModelServer

pytestmark = pytest.mark.skipif(bool(fuse_unavailable() or confine.unavailable()),
                                reason=f"needs FUSE and confinement: "
                                       f"{fuse_unavailable() or confine.unavailable()}")
READER = 'driver = "llm"\nmodel = "real"\n[unveil]\n"vault/docs" = "r"\n'


@pytest.fixture
def quirky(tmp_path):
    server = ModelServer(quirks=LLAMA_CPP_PYTHON)
    m = Mount(tmp_path)
    m.state.mkdir(parents=True)
    (m.state / "models.toml").write_text(
        f'[models.real]\nprovider = "openai"\napi_base = "{server.url}/v1"\n')
    (m.vault / "docs").mkdir(parents=True)
    (m.vault / "docs/a.md").write_text("apples are red\n")
    m.mount()
    yield m, server
    m.umount()
    server.stop()
    assert not m.bugs(), m.bugs()


def run(m: Mount, agent: str, text: str) -> tuple[str, str, dict]:
    """A task given to agent, once ended: its out, err and status."""
    before = m.status(agent)["latest"]
    m.write(f"agents/{agent}/in", text)

    def ended():
        task = m.status(agent)["latest"]
        if task and task != before:
            status = dict(line.split("=", 1) for line in
                          m.read(f"agents/{agent}/tasks/{task}/status").splitlines())
            return (task, status) if status["state"] in ("done", "failed") else None
    task, status = m.wait_for(ended, what=f"{agent}'s task")
    return (m.read(f"agents/{agent}/tasks/{task}/out"),
            m.read(f"agents/{agent}/tasks/{task}/err"), status)


def audit(m: Mount, kind: str) -> list[dict]:
    return [e for e in map(json.loads, m.read("log/audit").splitlines()) if e["kind"] == kind]


def chats(server: ModelServer) -> list[dict]:
    return [body for path, body, _ in server.requests if path == "/v1/chat/completions"]


def info(m: Mount) -> dict:
    return dict(line.split("=", 1) for line in m.read("models/real/info").splitlines())


def test_tools_work_on_a_server_that_cannot_stream_them(quirky):
    m, server = quirky
    m.define("reader", READER)
    m.write("ctl", "spawn reader\n")
    out, err, _ = run(m, "reader", 'CALL read {"path": "vault/docs/a.md"}\n')
    assert "tool said: <<<DATA from read vault/docs/a.md>>>" in out and "apples are red" in out, \
        (out, err)
    sent = chats(server)
    # tool_choice goes explicitly; the streamed try ended empty, the same call went whole
    assert [(b.get("stream"), b.get("tool_choice")) for b in sent[:2]] == \
        [(True, "auto"), (False, "auto")], sent[:2]
    learned = audit(m, "model_learned")
    assert len(learned) == 1 and learned[0]["model"] == "real" and \
        learned[0]["stream_tools"] is False
    assert info(m)["stream_tools"] == "no"
    # remembered: the next task's calls with tools go whole at once, no streamed try
    server.reset_stats()
    out, _, _ = run(m, "reader", "hello there\n")
    assert "echo: <<<DATA from the task>>>" in out
    assert [b.get("stream") for b in chats(server)] == [False]
    assert len(audit(m, "model_learned")) == 1
    # whole replies carry the server's usage: its counts stand
    calls = audit(m, "model_call")
    assert len(calls) == 3 and all(c["tokens_in"] > 20 and "counted" not in c for c in calls)


def test_what_a_server_learned_survives_a_remount(quirky):
    m, server = quirky
    m.define("reader", READER)
    m.write("ctl", "spawn reader\n")
    run(m, "reader", 'CALL read {"path": "vault/docs/a.md"}\n')
    m.umount()
    server.reset_stats()
    m.mount()
    assert info(m)["stream_tools"] == "no"
    out, _, _ = run(m, "reader", 'CALL read {"path": "vault/docs/a.md"}\n')
    assert "apples are red" in out
    assert all(b.get("stream") is False for b in chats(server)), chats(server)


def test_a_streamed_reply_without_usage_is_counted_by_the_tokenizer(quirky):
    m, server = quirky
    cid = m.read("models/real/clone").strip()
    m.write(f"models/real/{cid}/request", "one two three four five six")
    assert m.read(f"models/real/{cid}/reply") == "echo: one two three four five six"
    assert chats(server)[0]["stream"] is True and "tool_choice" not in chats(server)[0]
    last = json.loads(m.read(f"models/real/{cid}/last"))
    assert last["tokens_out"] == 8 and last["tokens_in"] > 6, last  # tiktoken's counts
    call = audit(m, "model_call")[-1]
    assert call["counted"] == "tiktoken cl100k_base" and call["tokens_out"] == 8
    assert info(m)["tokens_unreported"] == "tiktoken cl100k_base"
    # a request may name the tool: it goes as the request said
    tools = [{"type": "function", "function": {"name": "read", "parameters": {}}}]
    m.write(f"models/real/{cid}/request", json.dumps({
        "messages": [{"role": "user", "content": 'CALL read {"path": "x"}'}], "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "read"}}}))
    assert 'tool_call call_1 read {"path": "x"}' in m.read(f"models/real/{cid}/reply")
    assert chats(server)[-1]["tool_choice"] == {"type": "function", "function": {"name": "read"}}
    with pytest.raises(OSError) as e:  # and only a tool it offers
        m.write(f"models/real/{cid}/request", json.dumps({
            "messages": [], "tool_choice": {"type": "function", "function": {"name": "write"}}}))
    assert e.value.errno == errno.EINVAL
    assert "tool_choice: 'write' is not a tool" in m.read("err")


def test_every_refusal_reaches_the_tasks_err_and_status(quirky):
    m, server = quirky
    m.define("reader", READER)
    m.define("frugal", READER + "[budget]\ntokens_per_task = 10\n")
    for a in ("reader", "frugal"):
        m.write("ctl", f"spawn {a}\n")
    cases = [("reader", "FAIL 400 the prompt is too long for this model", errno.EIO,
              "answered 400: the prompt is too long for this model"),
             ("frugal", "hello", errno.EDQUOT, "over budget: task"),
             ("reader", "FAIL 503 overloaded", errno.EIO, "answered 503: overloaded")]
    for agent, text, err, words in cases:
        out, stderr, status = run(m, agent, text + "\n")
        name = errno.errorcode[err]
        assert words in stderr and f"({name})" in stderr, stderr
        assert status["state"] == "failed" and status["exit"] == str(err), status
        assert words in status["progress"] and name in status["progress"], status
