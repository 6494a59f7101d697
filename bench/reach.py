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
Prints a table and writes bench/results/reach.json.
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import Fs9Mount, cannot_run, finish, row, table, unmount_all  # noqa: E402

from fs9.client import Mount  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "reach.json"
ROUNDS, PER_ROUND, WARM = 5, 20, 5
TARGET_MS = 5.0


async def measure(mnt: Path, rounds: int, per_round: int) -> dict:
    view = Mount(str(mnt)).as_agent("bench")
    server = StdioServerParameters(command=sys.executable,
                                   args=["-m", "fs9", "mcp", str(mnt), "--as", "bench"])
    mcp_s, files_s = [], []
    async with Client(server, cache=None) as c:
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
    return {"mcp_s": mcp_s, "files_s": files_s}


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
            raw = anyio.run(measure, fs.path, 2 if quick else ROUNDS, 5 if quick else PER_ROUND)
        finally:
            unmount_all(tmp, [fs], "bench/reach.py")
    mcp_ms = statistics.median(raw["mcp_s"]) * 1000
    files_ms = statistics.median(raw["files_s"]) * 1000
    added = statistics.median(m - f for m, f in zip(raw["mcp_s"], raw["files_s"])) * 1000
    rows = [row("trivial task, p50 (ms)", mcp_ms, files_ms, "ms"),
            row("added by MCP, p50 (ms; vs the task)", added, files_ms, "ms", f"<= {TARGET_MS} ms",
                added <= TARGET_MS)]
    print(table(rows))
    return finish(RESULTS, rows, raw, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
