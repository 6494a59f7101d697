"""`fs9 mcp`: a real mount served to the MCP SDK's own client over stdio, as one agent at
a time; two agents of different views. What a view hides is ENOENT through MCP too, a
missing pledge EACCES, a symlink to a host file is not followed; a task runs end to end,
its output streamed as progress, and mail makes a round trip. Every assertion is on what fs9 served or logged."""
import json
import socket
import subprocess
import sys

import pytest
import trio
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError

from conftest import wait_for
from fs9.drivers import confine

pytestmark = pytest.mark.skipif(confine.unavailable() is not None,
                                reason=f"cannot confine here: {confine.unavailable()}")

ALPHA = """
cmd = ["tr", "a-z", "A-Z"]
pledge = ["read", "send", "discover"]
[unveil]
"vault/pub" = "r"
"agents/beta/mail" = "w"
"topics/news" = "rw"
"""
BETA = """
cmd = ["cat"]
description = "says back what it is asked"
provides = ["echoing"]
[unveil]
"vault/secret" = "r"
"""
CANARY = "host-canary-5c1e"


@pytest.fixture
def two(mount, tmp_path):
    mount.define("alpha", ALPHA)
    mount.define("beta", BETA)
    (mount.vault / "pub").mkdir()
    (mount.vault / "pub/a.md").write_text("public apples\n")
    (mount.vault / "secret").mkdir()
    (mount.vault / "secret/s.md").write_text("secret plans\n")
    (tmp_path / "host.txt").write_text(CANARY)
    (mount.vault / "pub/link").symlink_to(tmp_path / "host.txt")  # planted to a host file
    mount.write("topics/news", "first\n")
    mount.sh("echo spawn alpha > ctl; echo spawn beta > ctl", check=True)
    return mount


def connect(mount, agent: str, errlog=sys.stderr) -> Client:
    """The SDK's client, starting `fs9 mcp` over stdio; the server's stderr to errlog."""
    return Client(stdio_client(StdioServerParameters(
        command=sys.executable, args=["-m", "fs9", "mcp", str(mount.path), "--as", agent]),
        errlog=errlog), cache=None, read_timeout_seconds=60)


def text(result) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


def refused(result, name: str) -> bool:
    """The call failed with errno `name`, as a program of the agent would see it."""
    return result.is_error and f": {name}: " in text(result)


def value(result):
    """What the tool returned: its structured result, else its JSON text."""
    if result.structured_content is not None:
        return result.structured_content["result"]
    return json.loads(text(result))


async def test_a_client_gets_exactly_its_agents_view(two):
    async with connect(two, "alpha") as c:
        tools = {t.name for t in (await c.list_tools()).tools}
        assert {"list_dir", "read_file", "write_file", "run_task", "send_mail", "read_mail",
                "publish", "search", "read_trace", "list_agents", "registry"} <= tools
        listing = await c.call_tool("list_dir", {"path": "vault"})
        assert value(listing) == ["pub"]
        ok = await c.call_tool("read_file", {"path": "vault/pub/a.md"})
        assert not ok.is_error and text(ok) == "public apples\n"
        hidden = await c.call_tool("read_file", {"path": "vault/secret/s.md"})
        assert refused(hidden, "ENOENT") and "secret plans" not in text(hidden)
        escape = await c.call_tool("read_file", {"path": "../../../vault/secret/s.md"})
        assert refused(escape, "EINVAL") and "secret plans" not in text(escape)
        link = await c.call_tool("read_file", {"path": "vault/pub/link"})
        assert refused(link, "ELOOP") and CANARY not in text(link)
        readonly = await c.call_tool("write_file", {"path": "vault/pub/a.md", "content": "x"})
        assert refused(readonly, "EACCES")
        unpledged = await c.call_tool("publish", {"topic": "news", "text": "hi"})
        assert refused(unpledged, "EACCES") and "did not pledge 'publish'" in text(unpledged)
        res = await c.read_resource("fs9://view/vault/pub/a.md")
        assert res.contents[0].text == "public apples\n"
        with pytest.raises(MCPError, match="ENOENT"):
            await c.read_resource("fs9://view/vault/secret/s.md")
        status = await c.read_resource("fs9://status")
        assert "name=alpha" in status.contents[0].text
        card = await c.call_tool("registry", {"name": "beta"})
        assert value(card)["skills"][0]["id"] == "echoing"
    assert (two.vault / "pub/a.md").read_text() == "public apples\n"  # nothing changed
    audit = [json.loads(line) for line in two.read("log/audit").splitlines()]
    assert any(e["kind"] == "unveil_denied" and e.get("agent") == "alpha"
               and e.get("path") == "vault/secret" for e in audit)
    refusals = [e.get("reason", "") for e in audit if e["kind"] == "refused" and e.get("agent") == "alpha"]
    assert any("publish" in r for r in refusals), refusals  # the missing pledge, named
    assert "hi\n" not in two.read("log/audit")


async def test_the_other_agent_sees_its_own_view(two, tmp_path):
    log = open(tmp_path / "mcp.log", "w+")
    async with connect(two, "beta", log) as c:
        assert value(await c.call_tool("list_dir", {"path": "vault"})) == ["secret"]
        assert text(await c.call_tool("read_file", {"path": "vault/secret/s.md"})) == "secret plans\n"
        pub = await c.call_tool("read_file", {"path": "vault/pub/a.md"})
        assert refused(pub, "ENOENT")
        nodiscover = await c.call_tool("registry", {"name": "alpha"})
        assert refused(nodiscover, "ENOENT")
    logged = (tmp_path / "mcp.log").read_text()  # the server's stderr: a line per call
    log.close()
    assert "agent=beta tool=read_file outcome=ENOENT" in logged
    assert "agent=beta tool=list_dir outcome=ok" in logged
    # and in fs9's own log, as beta's steps, each with the call id of its stderr line
    import sqlite3
    db = sqlite3.connect(f"file:{two.state / 'log.sqlite'}?mode=ro", uri=True)
    try:
        steps = [json.loads(d)["step"] for (d,) in db.execute(
            "SELECT data FROM events WHERE kind='agent_step' AND agent='beta'")]
    finally:
        db.close()
    calls = [(s["tool"], s["outcome"]) for s in steps if s.get("kind") == "mcp_call"]
    assert calls[:2] == [("list_dir", "ok"), ("read_file", "ok")], steps
    assert ("read_file", "ENOENT") in calls
    assert all(f"call={s['call']} " in logged for s in steps if s.get("kind") == "mcp_call")


async def test_a_task_runs_end_to_end_and_mail_comes_back(two):
    streamed = []

    async def progress(done, total, message):  # the output, streamed as it came
        streamed.append((done, message))

    async with connect(two, "alpha") as c:
        run = await c.call_tool("run_task", {"agent": "alpha", "input": "hello orchard\n"},
                                progress_callback=progress)
        assert not run.is_error, text(run)
        result = value(run)
        assert result["out"] == "HELLO ORCHARD\n" and result["state"] == "done"
        assert streamed and "".join(m for _, m in streamed) == result["out"], streamed
        assert streamed[-1][0] == len(result["out"].encode())  # progress: the bytes so far
        assert two.read(f"agents/alpha/tasks/{result['task']}/input") == "hello orchard\n"
        sent = await c.call_tool("send_mail", {"to": "beta", "body": "ping 7",
                                               "type": "work_request"})
        assert not sent.is_error, text(sent)
        for _ in range(600):  # up to 30 s on a loaded machine
            mail = value(await c.call_tool("read_mail", {"ack": True}))
            if mail:
                break
            await trio.sleep(0.05)
        assert mail and mail[0]["body"] == "ping 7"
        assert mail[0]["headers"]["from"] == "beta" and mail[0]["headers"]["type"] == "result"
    assert [n for n in (two.path / "agents/alpha/mail").iterdir() if n.name[0].isdigit()] == []


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_streamable_http_on_localhost_keeps_the_view(two):
    with socket.socket() as s:  # a free port (the kernel's choice), handed to the server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "fs9", "mcp", str(two.path), "--as", "beta",
                               "--http", str(port)], stderr=subprocess.PIPE)
    try:
        await trio.to_thread.run_sync(lambda: wait_for(lambda: listening(port) or server.poll() is not None,
                                                       what="fs9 mcp listening"))
        assert server.poll() is None, server.stderr.read().decode()
        streamed = []

        async def progress(done, total, message):
            streamed.append(message)

        async with Client(f"http://127.0.0.1:{port}/mcp", cache=None) as c:
            assert "run_task" in {t.name for t in (await c.list_tools()).tools}
            assert text(await c.call_tool("read_file", {"path": "vault/secret/s.md"})) == "secret plans\n"
            assert refused(await c.call_tool("read_file", {"path": "vault/pub/a.md"}), "ENOENT")
            run = await c.call_tool("run_task", {"agent": "beta", "input": "over http\n"},
                                    progress_callback=progress)
            assert not run.is_error, text(run)
            result = value(run)
            assert result["out"] == "over http\n" and result["state"] == "done"
            assert "".join(streamed) == "over http\n"
        assert two.read(f"agents/beta/tasks/{result['task']}/input") == "over http\n"
    finally:
        server.terminate()
        server.wait(30)
