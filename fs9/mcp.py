"""`fs9 mcp MOUNTPOINT --as NAME`: a mounted fs9 served to one MCP client as agent NAME.

The server is a separate program, not part of the FUSE face: every tool is plain file
I/O (fs9/client.py) beneath `MOUNTPOINT/agents/NAME/view/`, the operator's window on
NAME's view. fs9 takes the view a request arrives through as the agent's identity, so
the confinement is fs9's own, not this layer's: what NAME's view hides is ENOENT here
as for NAME's programs, a missing pledge EACCES, mail is `from: NAME`, and each
refusal is in the event log as NAME's. Paths never follow a symlink (ELOOP): this
server runs as the operator and must not reach a host file through a link NAME planted.
Transports: stdio (desktop clients, editors) and streamable HTTP on 127.0.0.1.
"""
import errno
import functools
import json
import os
import queue
import sys
import threading
import time

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError

from . import __version__
from .client import Mount


def _refusal(e: OSError) -> ToolError:
    """The errno as a program of the agent would see it, and what it concerns."""
    name = errno.errorcode.get(e.errno, str(e.errno))
    where = f": {e.filename}" if e.filename else ""
    return ToolError(f"{name}: {os.strerror(e.errno) if e.errno else e.strerror}{where}")


class CallLog:
    """Each call as one of the agent's own steps in fs9's event log (a write of
    `agents/NAME/steps`: an `agent_step` event, of its running task if any), written by
    one thread in call order, after the client has its answer: the write and fs9's
    commit of it (a millisecond or more on a busy machine) are off the call's path.
    close() writes what is left before the server ends."""

    def __init__(self, mountpoint: str, agent: str) -> None:
        self.view, self.path = Mount(mountpoint).as_agent(agent), f"agents/{agent}/steps"
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._write, name="fs9-mcp-log", daemon=True)
        self.thread.start()

    def put(self, line: str) -> None:
        self.lines.put(line)

    def _write(self) -> None:
        while (line := self.lines.get()) is not None:
            try:
                self.view.write(self.path, line + "\n")
            except OSError as e:  # (a step rate past the agent's: EAGAIN) the call stands
                print(f"fs9 mcp: not logged in fs9: {e}", file=sys.stderr, flush=True)

    def close(self, timeout: float = 30) -> None:
        self.lines.put(None)
        self.thread.join(timeout)


def server(mountpoint: str, agent: str, calls: CallLog | None = None) -> MCPServer:
    """The MCP server acting as `agent` on the fs9 mounted at mountpoint; each call
    logged to `calls` (made here if not given: close it when the server ends)."""
    view = Mount(mountpoint).as_agent(agent)
    if not os.path.isdir(view.root):
        raise OSError(errno.ENOENT, f"no agent {agent} on the mount", mountpoint)
    calls = calls or CallLog(mountpoint, agent)
    app = MCPServer(name=f"fs9:{agent}", version=__version__,
                    instructions=f"fs9 as agent {agent}: its view of the mount, files and all. "
                                 "Paths are relative to the view (vault/..., agents/..., topics/...).")

    async def act(fn, *args):
        """fn(*args) in a worker thread (file I/O blocks); OSError as the agent's errno,
        and for a refusal fs9's reason in words (the agent's latest note)."""
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except TimeoutError as e:
            raise ToolError(f"timed out: {e}") from None
        except OSError as e:
            failed = e
        refusal = _refusal(failed)
        if failed.errno in (errno.EACCES, errno.EPERM):
            try:
                note = await anyio.to_thread.run_sync(view.last_note, agent)
            except OSError:
                note = ""
            if note:
                refusal = ToolError(f"{refusal} ({note})")
        raise refusal

    def tool(fn):
        """An MCP tool, each call a step in fs9's log as the agent's (`mcp_call`, with
        its call id: one id to find it by) and a line on stderr: the call id, the agent,
        the tool, its outcome (ok or the errno) and its time."""
        @functools.wraps(fn)
        async def call(*args, **kw):
            call_id, t, outcome = os.urandom(6).hex(), time.monotonic(), "ok"
            try:
                return await fn(*args, **kw)
            except ToolError as e:
                outcome = str(e).split(":", 1)[0]
                raise
            except BaseException:  # a defect of ours, or the call cancelled
                outcome = "error"
                raise
            finally:
                ms = round((time.monotonic() - t) * 1000, 1)
                print(f"fs9 mcp: call={call_id} agent={agent} tool={fn.__name__} "
                      f"outcome={outcome} ms={ms}", file=sys.stderr, flush=True)
                calls.put(json.dumps(dict(kind="mcp_call", call=call_id, tool=fn.__name__,
                                          outcome=outcome, ms=ms)))
        return app.tool()(call)

    @tool
    async def list_agents() -> list[str]:
        """The agents this agent knows of (`ls agents` in its view)."""
        return await act(view.agents)

    @tool
    async def registry(name: str) -> dict:
        """What agent NAME offers, as an A2A AgentCard (needs the discover pledge)."""
        return await act(view.card, name)

    @tool
    async def list_dir(path: str = "") -> list[str]:
        """The names in a folder of the view (`ls PATH`)."""
        return await act(view.listdir, path)

    @tool
    async def read_file(path: str) -> str:
        """A vault, status or ctl file of the view (`cat PATH`)."""
        return await act(view.read, path)

    @tool
    async def write_file(path: str, content: str) -> str:
        """Write a file of the view whole (`printf %s CONTENT > PATH`)."""
        await act(view.write, path, content)
        return f"wrote {len(content.encode())} bytes to {path}"

    @tool
    async def run_task(agent: str, input: str, ctx: Context, timeout_s: float = 60) -> dict:
        """Run one task on AGENT (`printf %s INPUT > agents/AGENT/in`), stream its output
        as it comes (`cat agents/AGENT/tasks/ID/out`: progress notifications, when the
        client asks for progress) and return it whole with the task's status."""
        meta = ctx.request_context.meta or {}
        streamed = meta.get("progress_token") is not None

        def run():  # one worker thread for the whole task: each hop costs ~0.1 ms
            task = view.run(agent, input)
            pieces, size = [], 0
            with task.out(timeout_s) as chunks:
                for chunk in chunks:
                    pieces.append(chunk)
                    size += len(chunk.encode())
                    if streamed:  # progress: the bytes so far; its message: the piece
                        anyio.from_thread.run(ctx.report_progress, size, None, chunk)
            out = "".join(pieces)
            status = task.status()
            return {"task": task.id, "state": status.get("state"), "exit": status.get("exit"),
                    "corr": status.get("corr"), "out": out}
        return await act(run)

    @tool
    async def send_mail(to: str, body: str, type: str = "event") -> str:
        """Send one message to agent TO (`agents/TO/mail/new`); a `work_request` to a
        task agent becomes a task whose result comes back as mail (read_mail)."""
        await act(lambda: view.send(to, body, type=type))
        return f"sent to {to}"

    @tool
    async def read_mail(ack: bool = False) -> list[dict]:
        """This agent's pending messages, in delivery order (`cat agents/NAME/mail/*`);
        ack removes them once read (`rm`)."""
        def read():
            messages = view.mail()
            for m in messages if ack else ():
                view.ack(m)
            return [{"name": m.name, "headers": m.headers, "body": m.body} for m in messages]
        return await act(read)

    @tool
    async def publish(topic: str, text: str) -> str:
        """Publish one event on a topic (`echo TEXT >> topics/TOPIC`)."""
        await act(view.publish, topic, text)
        return f"published on {topic}"

    @tool
    async def search(query: str) -> list[str]:
        """Ranked vault hits this agent may read (`cat search/QUERY`)."""
        return await act(view.search, query)

    @tool
    async def read_trace(corr: str) -> list[dict]:
        """Every event of one correlation id (`cat log/trace/CORR`), where the view shows it."""
        return await act(view.trace, corr)

    @app.resource("fs9://status", mime_type="text/plain")
    async def status() -> str:
        """This agent's status file (`agents/NAME/status`)."""
        return await act(view.read, f"agents/{agent}/status")

    @app.resource("fs9://view/{+path}", mime_type="text/plain")
    async def view_file(path: str) -> str:
        """A file of the view: a vault file, a status (`cat PATH`)."""
        try:
            return await anyio.to_thread.run_sync(view.read, path)
        except OSError as e:
            raise ResourceError(str(_refusal(e))) from None

    return app


def run(mountpoint: str, agent: str, http_port: int | None = None) -> int:
    """Serve until the client leaves (stdio) or the process is stopped (HTTP)."""
    calls = CallLog(mountpoint, agent)
    try:
        app = server(mountpoint, agent, calls)
    except OSError as e:
        print(f"fs9 mcp: {e.strerror}: {e.filename}", file=sys.stderr)
        return 1
    print(f"fs9 mcp: serving {mountpoint} as agent {agent}", file=sys.stderr)
    try:
        if http_port is None:
            app.run("stdio")
        else:
            app.run("streamable-http", host="127.0.0.1", port=http_port)
    finally:
        calls.close()  # the calls' steps not yet written
    return 0
