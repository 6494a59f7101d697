"""fs9 MCP benchmark: what `fs9 mcp` adds to running a trivial task.

    .venv/bin/python bench/reach.py           (about 30 s)
    .venv/bin/python bench/reach.py --quick   (smoke run, rough figures)

Needs root (the agent is confined). Mounts fs9 for real (bench/foundation.py's
Fs9Mount) with one `cmd = ["cat"]` agent, starts `fs9 mcp MNT --as bench` over stdio
with the MCP SDK's own client, and times:
- through MCP: a `run_task` tool call (the server writes `agents/bench/in` in the
  view, finds the task, reads its `out` to EOF) until the client has the result;
- through the files: the same, by this process with fs9.client on the same view.
Calls are paired (one each way, the order alternating) and the median of the pairs'
differences is what the MCP layer adds (target: at most 5 ms).
Where the added time goes: the tool's own time inside the server (its stderr line's
`ms=`: the same file operations as the files way, plus two thread hops), the rest being
the SDK's (JSON-RPC over the pipe, validation, the result) and the two processes taking
turns; one write of `agents/bench/steps` (the call's step in fs9's log, which the
server now writes after the answer, off the call's path); and the SDK's floor, a call
of the same client to a server of the same SDK whose tool does nothing.
Prints a table and writes bench/results/reach.json.
"""
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import Fs9Mount, cannot_run, finish, row, table, unmount_all  # noqa: E402

from fs9.client import Mount  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "reach.json"
ROUNDS, PER_ROUND, WARM = 5, 20, 5
TARGET_MS = 5.0


async def measure(mnt: Path, rounds: int, per_round: int, errlog) -> dict:
    view = Mount(str(mnt)).as_agent("bench")
    server = StdioServerParameters(command=sys.executable,
                                   args=["-m", "fs9", "mcp", str(mnt), "--as", "bench"])
    mcp_s, files_s, step_s = [], [], []
    async with Client(stdio_client(server, errlog=errlog), cache=None) as c:
        for _ in range(WARM):  # the sandbox starts on first use; the server warms up
            await c.call_tool("run_task", {"agent": "bench", "input": "warm\n"})
            view.run("bench", "warm\n").wait()
        for i in range(rounds * per_round):  # paired, the order alternating: load
            for way in (("mcp", "files") if i % 2 else ("files", "mcp")):  # hits both
                t = time.perf_counter()
                if way == "mcp":
                    r = await c.call_tool("run_task", {"agent": "bench", "input": "x\n"})
                    mcp_s.append(time.perf_counter() - t)
                    assert not r.is_error, r.content
                else:
                    assert view.run("bench", "x\n").wait() == "x\n"
                    files_s.append(time.perf_counter() - t)
        step = json.dumps({"kind": "mcp_call", "call": "0" * 12, "tool": "run_task",
                           "outcome": "ok", "ms": 1.0}) + "\n"
        for _ in range(rounds * per_round):  # what logging a call's step costs fs9
            t = time.perf_counter()
            view.write("agents/bench/steps", step)
            step_s.append(time.perf_counter() - t)
    return {"mcp_s": mcp_s, "files_s": files_s, "step_s": step_s}


# The SDK's floor: the same client and transport, a server of the same SDK whose tool
# does nothing but return a dict of run_task's shape (structured, as run_task's is)
NOOP_SERVER = """
from mcp.server.mcpserver import MCPServer
app = MCPServer(name="noop")
@app.tool()
async def run_task(agent: str, input: str, timeout_s: float = 60) -> dict:
    return {"task": 1, "state": "done", "exit": "0", "corr": "c", "out": input}
app.run("stdio")
"""


async def sdk_floor(calls: int) -> list[float]:
    server = StdioServerParameters(command=sys.executable, args=["-c", NOOP_SERVER])
    took = []
    async with Client(server, cache=None) as c:
        for i in range(WARM + calls):
            t = time.perf_counter()
            r = await c.call_tool("run_task", {"agent": "bench", "input": "x\n"})
            if i >= WARM:
                took.append(time.perf_counter() - t)
            assert not r.is_error, r.content
    return took


def tool_ms(errlog: Path) -> list[float]:
    """The run_task calls' own time inside the server, from its stderr lines."""
    return [float(m) for m in re.findall(r"tool=run_task outcome=ok ms=([0-9.]+)",
                                         errlog.read_text())]


def main() -> int:
    quick = "--quick" in sys.argv
    reason = cannot_run("bench/reach.py", root="confined agents")
    if reason:
        print(reason)
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fs9-bench-mcp-") as d:
        tmp = Path(d)
        tmp.chmod(0o711)  # the agent's uid walks to the mount point
        fs = Fs9Mount(tmp)
        (fs.agents / "bench").mkdir()
        (fs.agents / "bench/agent.toml").write_text('cmd = ["cat"]\n')
        try:
            fs.mount()
            fs.ctl("ctl", "spawn bench\n")
            with open(tmp / "mcp.log", "w") as errlog:
                raw = anyio.run(measure, fs.path, 2 if quick else ROUNDS,
                                5 if quick else PER_ROUND, errlog)
            raw["tool_ms"] = tool_ms(tmp / "mcp.log")[WARM:]
            raw["floor_s"] = anyio.run(sdk_floor, 10 if quick else ROUNDS * PER_ROUND)
        finally:
            unmount_all(tmp, [fs], "bench/reach.py")
    mcp_ms = statistics.median(raw["mcp_s"]) * 1000
    files_ms = statistics.median(raw["files_s"]) * 1000
    added = statistics.median(m - f for m, f in zip(raw["mcp_s"], raw["files_s"])) * 1000
    inside = statistics.median(raw["tool_ms"])
    step_ms = statistics.median(raw["step_s"]) * 1000
    floor_ms = statistics.median(raw["floor_s"]) * 1000
    rows = [row("trivial task, p50 (ms)", mcp_ms, files_ms, "ms"),
            row("added by MCP, p50 (ms; vs the task)", added, files_ms, "ms", f"<= {TARGET_MS} ms",
                added <= TARGET_MS),
            row("  the tool inside fs9 mcp, p50 (vs the files)", inside, files_ms, "ms"),
            row("  the SDK and transport, p50 (MCP - the tool)", mcp_ms - inside, files_ms, "ms"),
            row("  a call's step logged (now after the answer)", step_ms, files_ms, "ms"),
            row("the SDK's floor: a call of a tool doing nothing, p50", floor_ms, files_ms, "ms"),
            row("added by fs9 mcp beyond that floor, p50", added - floor_ms, files_ms, "ms")]
    print(table(rows))
    return finish(RESULTS, rows, raw, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
