"""fs9 on a real model: the same server reached through fs9's models/ and directly over
HTTP, in the same run, calls interleaved.

    .venv/bin/python bench/realmodel.py           (about 2 minutes; make model-install first)
    .venv/bin/python bench/realmodel.py --quick   (smoke run, rough figures)
    .venv/bin/python bench/realmodel.py --strict  (exit 1 when a target is missed)

The server is SmolLM2-135M-Instruct under llama-cpp-python's server (scripts/model.sh
serve, 2 threads), on 127.0.0.1. fs9 is mounted for real (bench/foundation.py's
Fs9Mount) with [models.local] pointing at it (temperature 0, so both sides get the same
text). Figures:

1. streaming. The same request (one user message, max_tokens 64, temperature 0), one
   call at a time, fs9 and direct alternating:
     direct: httpx POST /v1/chat/completions with stream, the SSE events parsed as they
             come (a content delta is a token: llama.cpp sends one per event);
     fs9:    read models/local/clone, write the request, read models/local/N/reply
             (os.read as bytes arrive) to EOF.
   First token: from the start of the call to the first byte of text. Tokens/s: the
   direct call's token count over the time from the first to the last piece of text,
   for each (fs9 passes the same text on; the count is the server's).
2. a tool round trip: a request offering the tool `read` with tool_choice naming it
   (the server answers a call), the file it names read, a second request with the
   result; its answer's end. Direct: two HTTP calls (not streamed: this server cannot
   stream tool choice) and a read of the file on disk. fs9: the same two turns through
   models/local/N/ (fs9 streams or not as it learned) and the file read through the
   mount (vault/...). Wall time of the whole trip, and of the read alone.

Prints a table and writes bench/results/realmodel.json.
"""
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (REPO, Fs9Mount, cannot_run, finish, guard_signals, pct, row,  # noqa: E402
                        table, unmount_all)

RESULTS = Path(__file__).resolve().parent / "results" / "realmodel.json"
SCRIPT = REPO / "scripts" / "model.sh"
TEXT = "Tell me about the sea."
MAX_TOKENS = 64
ROUNDS, TRIPS, WARM = 12, 6, 2
WATCHDOG_S = 1200
TOOLS = [{"type": "function", "function": {
    "name": "read", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                   "required": ["path"]}}}]
FILE = "docs/fruit.md"
ASK = f"Read the file vault/{FILE}."


class Server:
    """scripts/model.sh serve on a free port, stopped by its pid."""

    def __init__(self, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([str(SCRIPT), "serve", str(port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(self.url + "/models", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the model server did not start: {log}")
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def direct_stream(client, url: str) -> tuple[str, float, float, int]:
    """(text, first-token s, last-token s, tokens) of one streamed call over HTTP."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": TEXT}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = last = 0.0
    text, n = "", 0
    with client.stream("POST", url + "/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            piece = (choices[0].get("delta") or {}).get("content") or ""
            if piece:
                last = time.perf_counter() - t0
                first = first or last
                text += piece
                n += 1
    return text, first, last, n


def fs9_stream(fs: Fs9Mount) -> tuple[str, float, float]:
    """(text, first-byte s, last-byte s) of one call through models/local/."""
    base = fs.path / "models/local"
    t0 = time.perf_counter()
    conv = base / (base / "clone").read_text().strip()
    fd = os.open(conv / "request", os.O_WRONLY)
    os.write(fd, TEXT.encode())
    os.close(fd)
    fd = os.open(conv / "reply", os.O_RDONLY)
    first = last = 0.0
    data = b""
    try:
        while piece := os.read(fd, 65536):
            last = time.perf_counter() - t0
            first = first or last
            data += piece
    finally:
        os.close(fd)
    return data.decode(), first, last


def figure_stream(fs: Fs9Mount, url: str) -> dict:
    import httpx
    out = {"direct_first": [], "fs9_first": [], "direct_tps": [], "fs9_tps": [],
           "tokens": []}
    with httpx.Client(timeout=120) as client:
        for i in range(WARM + ROUNDS):
            pair = [("direct", lambda: direct_stream(client, url)), ("fs9", lambda: fs9_stream(fs))]
            got = {}
            for kind, call in (pair if i % 2 == 0 else pair[::-1]):  # who goes first alternates
                got[kind] = call()
            text, d_first, d_last, n = got["direct"]
            f_text, f_first, f_last = got["fs9"]
            if f_text != text:
                raise RuntimeError(f"fs9 passed on {f_text!r}, the server said {text!r}")
            if i < WARM or n < 2:
                continue
            out["direct_first"].append(d_first * 1000)
            out["fs9_first"].append(f_first * 1000)
            out["direct_tps"].append((n - 1) / (d_last - d_first))
            out["fs9_tps"].append((n - 1) / (f_last - f_first))
            out["tokens"].append(n)
    return out


def direct_trip(client, url: str, vault: Path) -> tuple[float, float]:
    """(whole trip s, read s) done directly."""
    t0 = time.perf_counter()
    ask = [{"role": "user", "content": ASK}]
    r = client.post(url + "/chat/completions", json={
        "model": "smollm2", "messages": ask, "tools": TOOLS, "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "tool_choice": {"type": "function", "function": {"name": "read"}}}).json()
    call = r["choices"][0]["message"]["tool_calls"][0]
    t1 = time.perf_counter()
    with open(vault / FILE) as f:  # what the model named or not: the bench reads FILE
        content = f.read()
    t2 = time.perf_counter()
    client.post(url + "/chat/completions", json={
        "model": "smollm2", "temperature": 0, "max_tokens": MAX_TOKENS, "tools": TOOLS,
        "tool_choice": "none",
        # content " ", as fs9 sends it: this server refuses null (OpenAI's shape)
        "messages": ask + [{"role": "assistant", "content": " ", "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": call["id"], "content": content}]}
    ).raise_for_status()
    return time.perf_counter() - t0, t2 - t1


def fs9_trip(fs: Fs9Mount) -> tuple[float, float]:
    base = fs.path / "models/local"
    t0 = time.perf_counter()
    conv = base / (base / "clone").read_text().strip()
    (conv / "request").write_text(json.dumps({
        "messages": [{"role": "user", "content": ASK}], "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "read"}}}))
    (conv / "reply").read_bytes()
    call = json.loads((conv / "last").read_text())["tool_calls"][0]
    t1 = time.perf_counter()
    content = (fs.path / "vault" / FILE).read_text()
    t2 = time.perf_counter()
    (conv / "request").write_text(json.dumps({
        "messages": [{"role": "tool", "tool_call_id": call["id"], "content": content}],
        "tool_choice": "none"}))
    (conv / "reply").read_bytes()
    return time.perf_counter() - t0, t2 - t1


def figure_trip(fs: Fs9Mount, url: str) -> dict:
    import httpx
    out = {"direct": [], "fs9": [], "direct_read": [], "fs9_read": []}
    with httpx.Client(timeout=120) as client:
        for i in range(1 + TRIPS):
            for kind in (("direct", "fs9") if i % 2 == 0 else ("fs9", "direct")):
                whole, read = direct_trip(client, url, fs.vault) if kind == "direct" \
                    else fs9_trip(fs)
                if i:
                    out[kind].append(whole * 1000)
                    out[f"{kind}_read"].append(read * 1000)
    return out


def main() -> int:
    why = cannot_run("realmodel")
    if why or subprocess.run([str(SCRIPT), "installed"]).returncode != 0:
        print(why or "realmodel: the real model is not installed (make model-install)",
              file=sys.stderr)
        return 2
    global ROUNDS, TRIPS, WARM
    if "--quick" in sys.argv[1:]:
        ROUNDS, TRIPS, WARM = 3, 2, 1
    guard_signals(WATCHDOG_S)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fs9-realmodel-"))
    tmp.chmod(0o711)
    fs = Fs9Mount(tmp)
    server = None
    try:
        server = Server(tmp / "server.log")
        fs.state.mkdir(parents=True)
        (fs.vault / "docs").mkdir(parents=True)
        (fs.vault / FILE).write_text("The fruit of the day is pineapple.\n")
        (fs.state / "models.toml").write_text(
            f'[models.local]\nprovider = "openai"\napi_base = "{server.url}"\n'
            f'model = "smollm2"\nmax_tokens = {MAX_TOKENS}\ntemperature = 0\ntimeout_s = 120\n')
        fs.mount()
        signal.alarm(WATCHDOG_S)
        print("1/2 streaming through models/ vs direct HTTP ...", file=sys.stderr, flush=True)
        s = figure_stream(fs, server.url)
        print(f"2/2 a tool round trip ... ({time.monotonic() - started:.0f} s)",
              file=sys.stderr, flush=True)
        t = figure_trip(fs, server.url)
        signal.alarm(0)
    finally:
        signal.alarm(0)
        try:
            unmount_all(tmp, [fs], "realmodel")
        finally:
            if server is not None:
                server.stop()
    added = pct(s["fs9_first"], 50) - pct(s["direct_first"], 50)
    tps = statistics.median(s["fs9_tps"]) / statistics.median(s["direct_tps"])
    rows = [
        row("1. first token p50, through fs9 (vs direct HTTP)", pct(s["fs9_first"], 50),
            pct(s["direct_first"], 50), "ms", "<= +5 ms", added <= 5.0, fmt="{:.1f}"),
        row("   first token p90 (vs direct)", pct(s["fs9_first"], 90),
            pct(s["direct_first"], 90), "ms", fmt="{:.1f}"),
        row("   tokens/s, median (vs direct)", statistics.median(s["fs9_tps"]),
            statistics.median(s["direct_tps"]), "/s", ">= 0.95x", tps >= 0.95, fmt="{:.1f}"),
        row("2. tool round trip p50: call, read, answer (vs direct)", pct(t["fs9"], 50),
            pct(t["direct"], 50), "ms", fmt="{:.0f}"),
        row("   the file read alone, through the mount (vs disk)", pct(t["fs9_read"], 50),
            pct(t["direct_read"], 50), "ms", fmt="{:.3f}"),
    ]
    print(table(rows))
    elapsed = time.monotonic() - started
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus; {len(s['tokens'])} streamed calls "
          f"of each kind, {statistics.median(s['tokens']):.0f} tokens each, fs9 adds "
          f"{added:+.2f} ms to the first token at p50; {TRIPS} tool round trips each)")
    return finish(RESULTS, rows, {"stream": s, "trip": t}, elapsed)


if __name__ == "__main__":
    sys.exit(main())
