"""llm agents on a real language model, offline: SmolLM2-135M-Instruct under
llama-cpp-python's server (scripts/model.sh; `make model-install` installs it, and
without it these skip saying so). A real mount, real confined agents, temperature 0.
What is asserted is what fs9 did (the stream's timing, the tool call in the log, the
file read, the refusal, the time a halt took), never the wording of a 135M model."""
import errno
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import Mount, fuse_unavailable
from fs9.drivers import confine

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "model.sh"


def not_installed() -> str | None:
    if subprocess.run([str(SCRIPT), "installed"], capture_output=True).returncode != 0:
        return "the real model is not installed (make model-install: scripts/model.sh)"
    return None


pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.skipif(bool(fuse_unavailable() or confine.unavailable()),
                       reason=f"needs FUSE and confinement: "
                              f"{fuse_unavailable() or confine.unavailable()}"),
    pytest.mark.skipif(bool(NOT_INSTALLED := not_installed()), reason=str(NOT_INSTALLED)),
    pytest.mark.timeout(900),  # a busy machine slows this model tenfold
]
MAX_TOKENS = 40  # a reply: under a second at this machine's ~50 tokens/s


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Our own server (scripts/model.sh serve) on a free port, stopped by its pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("model") / "server.log", "wb")
    proc = subprocess.Popen([str(SCRIPT), "serve", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None, f"the model server ended: {log.name}"
            assert time.monotonic() < deadline, "the model server did not answer in 120 s"
            time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture
def real(tmp_path, server):
    m = Mount(tmp_path)
    m.state.mkdir(parents=True)
    entry = (f'provider = "openai"\napi_base = "{server}"\nmodel = "smollm2"\n'
             'context_window = 2048\ntimeout_s = 600\ntemperature = 0\n')
    (m.state / "models.toml").write_text(  # long: the same model, for a long reply
        f'[models.local]\n{entry}max_tokens = {MAX_TOKENS}\n'
        f'[models.long]\n{entry}max_tokens = 512\n')
    (m.vault / "docs").mkdir(parents=True)
    (m.vault / "docs/fruit.md").write_text("The fruit of the day is pineapple.\n")
    (m.vault / "secret").mkdir()
    (m.vault / "secret/keys.txt").write_text("hunter2\n")
    m.mount()
    yield m
    m.umount()
    assert not m.bugs(), m.bugs()


def agent(m: Mount, name: str, extra: str = "", model: str = "local") -> None:
    m.define(name, f'driver = "llm"\nmodel = "{model}"\ninstructions = "Answer briefly."\n'
             + extra)
    m.write("ctl", f"spawn {name}\n")


def events(m: Mount, kind: str, who: str | None = None) -> list[dict]:
    return [e for e in map(json.loads, m.read("log/audit").splitlines())
            if e["kind"] == kind and (who is None or e.get("agent") == who)]


def run(m: Mount, name: str, text: str) -> tuple[str, str, dict]:
    """A task given to name, once ended: its out, err and status."""
    before = m.status(name)["latest"]
    m.write(f"agents/{name}/in", text)

    def ended():
        task = m.status(name)["latest"]
        if task and task != before:
            status = dict(line.split("=", 1) for line in
                          m.read(f"agents/{name}/tasks/{task}/status").splitlines())
            return (task, status) if status["state"] in ("done", "failed") else None
    task, status = m.wait_for(ended, timeout=600, what=f"{name}'s task")
    return (m.read(f"agents/{name}/tasks/{task}/out"),
            m.read(f"agents/{name}/tasks/{task}/err"), status)


def test_a_reply_streams_to_cat_out_token_by_token(real):
    m = real
    agent(m, "talker", "tools = []\n")
    m.write("agents/talker/in", "Tell me about the sea.\n")
    cat = subprocess.Popen(["cat", str(m.path / "agents/talker/out")], stdout=subprocess.PIPE)
    arrivals = []  # (time, bytes) of each piece cat passed on
    while piece := os.read(cat.stdout.fileno(), 4096):
        arrivals.append((time.monotonic(), piece))
    cat.wait(10)
    text = b"".join(p for _, p in arrivals).decode()
    assert len(text.split()) >= 8, text
    # pieces, over the generation's time: not one write at the end
    assert len(arrivals) >= 8, arrivals
    assert arrivals[-1][0] - arrivals[0][0] > 0.3, arrivals
    call = events(m, "model_call", "talker")[-1]
    # llama-cpp-python streams no usage: counted by the tokenizer, and said so
    assert call["counted"] == "tiktoken cl100k_base" and call["tokens_out"] >= 8


def test_a_real_tool_call_goes_through_the_view_and_back(real):
    m = real
    m.define("reader", 'driver = "llm"\nmodel = "local"\ntools = ["read"]\nfirst_tool = "read"\n'
             'instructions = "The file to read is vault/docs/fruit.md."\nmax_steps = 3\n'
             '[unveil]\n"vault/docs" = "r"\n')
    m.write("ctl", "spawn reader\n")
    out, err, status = run(m, "reader", "vault/docs/fruit.md\n")
    steps = [e["step"] for e in events(m, "agent_step", "reader")]
    tools = [s for s in steps if s["kind"] == "tool"]
    # the model's call (a named tool_choice, streamed) ran as a file read in the view
    # (with this prompt, at temperature 0, this model names the file)
    assert tools and tools[0]["name"] == "read", steps
    assert tools[0]["args"] == {"path": "vault/docs/fruit.md"} and tools[0]["ok"] is True, tools
    # its result went back to the model, which answered (or called again) without error
    calls = events(m, "model_call", "reader")
    assert len(calls) >= 2 and calls[0]["finish"] == "tool_calls", calls
    assert not events(m, "model_error", "reader"), events(m, "model_error", "reader")
    assert status["state"] == "done" or "stopped after 3 steps" in err, (status, err)


def test_an_unveil_hides_what_the_model_asks_for(real):
    m = real
    agent(m, "snoop", 'tools = ["read"]\nfirst_tool = "read"\nmax_steps = 2\n'
          '[unveil]\n"vault/docs" = "r"\n')
    out, err, status = run(m, "snoop", "Read the file vault/secret/keys.txt.\n")
    tools = [e["step"] for e in events(m, "agent_step", "snoop") if e["step"]["kind"] == "tool"]
    assert tools, "the model made no tool call"
    for t in tools:  # whatever it asked for outside vault/docs, it did not get
        if not str(t["args"].get("path", "")).startswith("vault/docs"):
            assert t["ok"] is False and "ENOENT" in t["error"], t
    assert "hunter2" not in out
    if any("secret" in str(t["args"].get("path", "")) for t in tools):
        assert events(m, "unveil_denied", "snoop")


def test_a_budget_refuses_with_real_counts(real):
    m = real
    agent(m, "frugal", "tools = []\n[budget]\ntokens_per_day = 300\n")
    for _ in range(8):  # until its day's budget refuses a call
        out, err, status = run(m, "frugal", "Name a colour.\n")
        if status["state"] == "failed":
            break
    assert status["exit"] == str(errno.EDQUOT), (status, err)
    assert "over budget: agent frugal" in err and "(EDQUOT)" in err, err
    assert "over budget" in status["progress"], status
    refused = events(m, "model_refused", "frugal")
    assert refused and "tokens_per_day" in refused[-1]["reason"]
    # what it used is what the calls counted: the server's, or the tokenizer's
    calls = events(m, "model_call", "frugal")
    used = sum(c["tokens_in"] + c["tokens_out"] for c in calls)
    st = m.status("frugal")
    assert int(st["tokens_in"]) + int(st["tokens_out"]) == used and used <= 300 + 40


def test_halt_cancels_a_generation_under_way(real):
    m = real
    agent(m, "writer", "tools = []\n", model="long")
    m.write("agents/writer/in", "Write a long story about a lighthouse keeper.\n")
    task = m.wait_for(lambda: m.status("writer")["latest"], what="the task")
    out = m.path / f"agents/writer/tasks/{task}/out"
    fd = os.open(out, os.O_RDONLY)
    try:
        assert os.read(fd, 1)  # the reply is streaming
        halted_at = time.time()
        m.write("ctl", "halt\n")
        cancelled = m.wait_for(lambda: [e for e in events(m, "model_error", "writer")
                                        if "cancelled" in e["reason"]], what="the cancel")
        # cut short, not run to its end (a long story takes minutes on this model); the
        # bound is generous for a busy machine: the time itself is bench/realmodel.py's
        assert cancelled[0]["ts"] - halted_at < 15.0, cancelled
        # the task waits, interrupted, for `resume` (halt's way), its call cancelled
        m.wait_for(lambda: [e["kind"] for e in events(m, "task_requeued", "writer")]
                   == ["task_requeued"], what="the task re-queued, once")
    finally:
        os.close(fd)
    m.write("ctl", "resume\n")
