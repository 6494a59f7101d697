"""fs9 models benchmark: a model call through models/ beside the same call made directly,
and the scheduler under contention; each figure beside a baseline measured in the same run.

    .venv/bin/python bench/models.py           (about 1 minute)
    .venv/bin/python bench/models.py --quick   (smoke run, rough figures)
    .venv/bin/python bench/models.py --strict  (exit 1 when a target is missed)

The model is tests/modelserver.py (deterministic, OpenAI-compatible, streaming) in a
process of its own, so the direct client and fs9 both reach it over local HTTP and
neither shares its interpreter (and GIL) with it. It serves two ports: a fast model
(answers at once) and a slow one (token_delay_s: one call streams for ~70 ms). fs9 is
mounted for real (bench/foundation.py's Fs9Mount) with STATE/models.toml naming both
(provider "openai": llama-index OpenAILike inside fs9), then:

1. a call's overhead. The same request text, sequential calls, three kinds
   interleaved block by block, round by round:
     direct: llama-index OpenAILike(model="toy", is_chat_model=True, max_retries=0,
             stream_options include_usage) in this process, stream_chat([user TEXT],
             max_tokens=1024 as fs9 sends), the stream consumed to its end;
     fs9, a fresh conversation per call: read models/fast/clone, write the request
             (open, write, close), read models/fast/N/reply to EOF;
     fs9, one conversation reset per call: write `reset` to models/fast/N/ctl, write
             the request, read the reply to EOF.
   A call's latency stops at the reply's EOF (the text is what a caller wants; fs9
   accounts the usage itself); reading `last` (the JSON result with token usage) is
   timed apart and shown as its own row. calls/s: calls in a block over the block's
   wall-clock time less the time spent reading `last`. For information, a fourth kind:
   the client fs9 itself runs (llama-index astream_chat on trio), in this process:
   it tells the async client's share of the overhead from the FUSE + kernel share.
   The conversations opened stay open (as a one-shot caller leaves them); the
   per-round p50s in the JSON show whether that drifts.
2. the scheduler. Agents bg1..bgN (priority background) each run BG_THREADS threads
   that loop calls on the slow model (max_concurrent = 1) through their views
   (agents/bgI/view/models/slow/...), so calls always wait; an agent `chat` (priority
   interactive) makes calls one at a time, with a random pause (0-100 ms, the same
   seeded sequence in every phase) between them as a caller that does something with
   a reply would. A chat call: write the request, read the reply to EOF (a `reset`
   before it, not timed). Phases, round by round:
     quiet:     no background load            -> the uncontended baseline
     loaded:    the background threads running -> the figure (target <= 2x quiet)
     no pauses: loaded, chat calls back to back (info: the worst case of a scheduler
                that does not preempt: each call waits for the whole call in flight)
     no priority: loaded, chat set to `priority background` (info: what the p50
                would be without the priority class; its slowest call shows the
                fairness rule's catch-up: chat used the model more than each bg
                agent in the last minute, so it waits until they have caught up)
     bg alone:  loaded, chat idle (BG_ALONE_S) -> the throughput baseline
   Background throughput: their calls that ended within a phase over its duration;
   the model's throughput beside it adds chat's calls (nothing lost to the switching).

Prints a table and writes bench/results/models.json. The mount is always unmounted and
the model server stopped at the end.
"""
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (PY, REPO, Fs9Mount, cannot_run, finish, guard_signals, pct, row,  # noqa: E402
                        read_to_eof, table, unmount_all)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "models.json"

TEXT = "hello there, how is the weather today?"
SLOW_TEXT = "please summarise the quarterly report for me"  # 8 reply chunks: 7 pauses
TOKEN_DELAY_S = 0.01  # the slow model: ~70 ms a call
MAX_TOKENS = 1024  # what fs9 sends by default (models.toml max_tokens)
CALL_ROUNDS, CALL_PER_BLOCK, CALL_WARM = 8, 40, 10
SCHED_ROUNDS, SCHED_K, BG_ALONE_S = 4, 10, 2.0
BG_AGENTS, BG_THREADS = 4, 2
PAUSE_MAX_S = 0.1
WATCHDOG_S = 120

SERVER = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
from modelserver import ModelServer
fast = ModelServer()
slow = ModelServer(token_delay_s=float(sys.argv[2]))
print(fast.port, slow.port, flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
'''


class Server:
    """tests/modelserver.py in a process of its own: a fast model and a slow one."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([PY, "-c", SERVER, str(REPO / "tests"), str(TOKEN_DELAY_S)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline().split()
        if len(line) != 2:
            raise RuntimeError("the model server did not start")
        self.fast, self.slow = (f"http://127.0.0.1:{int(p)}/v1" for p in line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- file helpers ------------------------------------------------------------------

def write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# --- part 1: a call's overhead ---------------------------------------------------------

def llama(api_base: str):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike
    llm = OpenAILike(model="toy", api_base=api_base, api_key="k", is_chat_model=True,
                     max_retries=0, additional_kwargs={"stream_options": {"include_usage": True}})
    return llm, [ChatMessage(role="user", content=TEXT)]


def direct_client(api_base: str):
    """The baseline: llama-index's sync streaming client, as a program would call it."""
    llm, messages = llama(api_base)

    def block(n: int) -> list[tuple[str, list[float]]]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            text = ""
            for r in llm.stream_chat(messages, max_tokens=MAX_TOKENS):
                text += r.delta or ""
            out.append((text, [(time.perf_counter_ns() - t0) / 1e6]))
        return out
    return block


def direct_async_client(api_base: str):
    """For information: the client fs9 runs (astream_chat on trio), in this process."""
    import trio
    llm, messages = llama(api_base)

    async def calls(n: int) -> list[tuple[str, list[float]]]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            text = ""
            async for r in await llm.astream_chat(messages, max_tokens=MAX_TOKENS):
                text += r.delta or ""
            out.append((text, [(time.perf_counter_ns() - t0) / 1e6]))
        return out
    return lambda n: trio.run(calls, n)


PARTS = ("call", "open", "request", "reply", "last")  # fs9 kinds: the call and its steps


def fs9_client(fs: Fs9Mount, model: str, fresh: bool):
    """fresh: read clone, write request, read reply (a new conversation a call);
    else write `reset` to the one conversation's ctl, then request and reply.
    Then `last` is read, timed apart (the last step)."""
    base = fs.path / "models" / model
    conv = None if fresh else base / read_to_eof(base / "clone").strip().decode()

    def call() -> tuple[str, list[float]]:
        nonlocal conv
        t0 = time.perf_counter_ns()
        if fresh:
            conv = base / read_to_eof(base / "clone").strip().decode()
        else:
            write(conv / "ctl", b"reset\n")
        t1 = time.perf_counter_ns()
        write(conv / "request", TEXT.encode())
        t2 = time.perf_counter_ns()
        text = read_to_eof(conv / "reply").decode()
        t3 = time.perf_counter_ns()
        last = json.loads(read_to_eof(conv / "last"))
        t4 = time.perf_counter_ns()
        if last.get("content") != text or not last.get("tokens_in"):
            raise RuntimeError(f"last {last!r} does not match the reply {text!r}")
        return text, [(t3 - t0) / 1e6, (t1 - t0) / 1e6, (t2 - t1) / 1e6, (t3 - t2) / 1e6,
                      (t4 - t3) / 1e6]
    return lambda n: [call() for _ in range(n)]


def figure_calls(fs: Fs9Mount, server: Server) -> dict:
    kinds = {"direct": direct_client(server.fast), "fresh": fs9_client(fs, "fast", True),
             "reset": fs9_client(fs, "fast", False),
             "direct_async": direct_async_client(server.fast)}
    want = "echo: " + TEXT
    for block in kinds.values():  # warm up: imports, connections, code paths
        for text, _ in block(CALL_WARM):
            if text != want:
                raise RuntimeError(f"a call answered {text!r}, expected {want!r}")
    samples = {k: [] for k in kinds}  # per call: [ms, ...steps]
    rates = {k: [] for k in kinds}  # calls/s of each block
    order = list(kinds)
    for i in range(CALL_ROUNDS):
        for k in order[i % len(order):] + order[:i % len(order)]:  # who goes first rotates
            t0 = time.perf_counter()
            got = kinds[k](CALL_PER_BLOCK)
            took = time.perf_counter() - t0
            for text, ms in got:
                if text != want:
                    raise RuntimeError(f"{k}: a call answered {text!r}")
            # calls/s of the loop as counted: reading `last` is not part of a call
            took -= sum(ms[4] for _, ms in got if len(ms) > 4) / 1000
            samples[k] += [ms for _, ms in got]
            rates[k].append(CALL_PER_BLOCK / took)
    out = {}
    for k, rows_ in samples.items():
        calls = [r[0] for r in rows_]
        out[k] = {"n": len(calls), "p50_ms": pct(calls, 50), "p90_ms": pct(calls, 90),
                  "p99_ms": pct(calls, 99), "per_s": statistics.median(rates[k]),
                  "block_per_s": rates[k],
                  "round_p50s_ms": [statistics.median(calls[j:j + CALL_PER_BLOCK])
                                    for j in range(0, len(calls), CALL_PER_BLOCK)]}
        if len(rows_[0]) > 1:
            out[k]["steps_p50_ms"] = {p: pct([r[j] for r in rows_], 50)
                                      for j, p in enumerate(PARTS)}
    out["conversations_open"] = int(dict(
        line.split("=", 1) for line in (fs.path / "models/fast/info").read_text().splitlines()
    )["conversations"])
    return out


# --- part 2: the scheduler under contention -----------------------------------------------

def define(fs: Fs9Mount, name: str, priority: str) -> None:
    folder = fs.agents / name
    folder.mkdir(exist_ok=True)
    (folder / "agent.toml").write_text(
        f'cmd = ["cat"]\npriority = "{priority}"\n[unveil]\n"models/slow" = "rw"\n')
    fs.ctl("ctl", f"spawn {name}\n")


class Conversation:
    """One conversation of an agent with the slow model, through the agent's view."""

    def __init__(self, fs: Fs9Mount, agent: str) -> None:
        base = fs.path / "agents" / agent / "view" / "models" / "slow"
        self.conv = base / read_to_eof(base / "clone").strip().decode()

    def call(self) -> float:
        write(self.conv / "ctl", b"reset\n")
        t0 = time.perf_counter_ns()
        write(self.conv / "request", SLOW_TEXT.encode())
        text = read_to_eof(self.conv / "reply").decode()
        t1 = time.perf_counter_ns()
        if text != "echo: " + SLOW_TEXT:
            raise RuntimeError(f"the slow model answered {text!r}")
        return (t1 - t0) / 1e6


class Background:
    """BG_AGENTS agents x BG_THREADS threads, each looping calls on its own conversation."""

    def __init__(self, fs: Fs9Mount) -> None:
        self.convs = [Conversation(fs, f"bg{a + 1}") for a in range(BG_AGENTS)
                      for _ in range(BG_THREADS)]
        self.ended: list[float] = []  # perf_counter of each call's end
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def _loop(self, conv: Conversation) -> None:
        try:
            while not self.stopping.is_set():
                conv.call()
                with self.lock:
                    self.ended.append(time.perf_counter())
        except Exception as e:
            self.errors.append(repr(e))

    def start(self) -> None:
        self.stopping.clear()
        self.threads = [threading.Thread(target=self._loop, args=(c,), daemon=True)
                        for c in self.convs]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(30)
        if self.errors:
            raise RuntimeError(f"background calls failed: {self.errors[:3]}")

    def rate(self, t0: float, t1: float) -> float:
        with self.lock:
            return sum(1 for t in self.ended if t0 <= t < t1) / (t1 - t0)

    def longest_gap_ms(self, t0: float, t1: float) -> float:
        """The longest time between two background calls' ends within [t0, t1)."""
        with self.lock:
            ends = [t0] + sorted(t for t in self.ended if t0 <= t < t1) + [t1]
        return max(b - a for a, b in zip(ends, ends[1:])) * 1000


def chat_phase(chat: Conversation, pauses: list[float] | None) -> tuple[list[float], float, float]:
    """SCHED_K chat calls; returns their ms and the phase's start and end (perf_counter)."""
    ms = []
    t0 = time.perf_counter()
    for i in range(SCHED_K):
        if pauses is not None:
            time.sleep(pauses[i])
        ms.append(chat.call())
    return ms, t0, time.perf_counter()


def figure_sched(fs: Fs9Mount) -> dict:
    for a in range(BG_AGENTS):
        define(fs, f"bg{a + 1}", "background")
    define(fs, "chat", "interactive")
    chat = Conversation(fs, "chat")
    bg = Background(fs)
    pauses = [random.Random(9 + i).uniform(0, PAUSE_MAX_S) for i in range(SCHED_K)]
    for _ in range(3):  # warm up: llama-index's first call in fs9, the connection
        chat.call()
    lat = {k: [] for k in ("quiet", "loaded", "no_pauses", "no_priority")}
    bg_rate = {k: [] for k in ("loaded", "no_pauses", "no_priority", "alone")}
    bg_gap = {k: [] for k in bg_rate}
    chat_rate = {k: [] for k in bg_rate if k != "alone"}
    for _ in range(SCHED_ROUNDS):
        ms, _, _ = chat_phase(chat, pauses)
        lat["quiet"] += ms
        bg.start()
        try:
            time.sleep(0.3)  # every background thread has a call in flight or waiting
            for phase, prio, p in (("loaded", "interactive", pauses),
                                   ("no_pauses", "interactive", None),
                                   ("no_priority", "background", pauses)):
                fs.ctl("agents/chat/ctl", f"priority {prio}\n")
                ms, t0, t1 = chat_phase(chat, p)
                lat[phase] += ms
                bg_rate[phase].append(bg.rate(t0, t1))
                chat_rate[phase].append(SCHED_K / (t1 - t0))
                bg_gap[phase].append(bg.longest_gap_ms(t0, t1))
            fs.ctl("agents/chat/ctl", "priority interactive\n")
            t0 = time.perf_counter()
            time.sleep(BG_ALONE_S)
            t1 = time.perf_counter()
            bg_rate["alone"].append(bg.rate(t0, t1))
            bg_gap["alone"].append(bg.longest_gap_ms(t0, t1))
        finally:
            bg.stop()
    usage = (fs.path / "models" / "usage").read_text()
    out = {"n": len(lat["quiet"]), "pauses_s": pauses, "usage": usage,
           "bg_calls": len(bg.ended)}
    for k, v in lat.items():
        out[k] = {"p50_ms": pct(v, 50), "p90_ms": pct(v, 90), "max_ms": max(v),
                  "round_p50s_ms": [statistics.median(v[j:j + SCHED_K])
                                    for j in range(0, len(v), SCHED_K)], "all_ms": v}
    for k, v in chat_rate.items():  # the model's throughput: background + chat
        out[f"total_{k}_per_s"] = statistics.median([a + b for a, b in zip(v, bg_rate[k])])
    for k, v in bg_rate.items():
        out[f"bg_{k}_per_s"] = statistics.median(v)
        out[f"bg_{k}_rounds_per_s"] = v
        out[f"bg_{k}_longest_gap_ms"] = bg_gap[k]
    return out


# --- report ---------------------------------------------------------------------------

def rows_of(c: dict, s: dict) -> list[dict]:
    d, f, r = c["direct"], c["fresh"], c["reset"]
    added = f["p50_ms"] - d["p50_ms"]
    q = s["quiet"]["p50_ms"]
    rows = [
        row("1. call p50, fresh conversation: clone+request+reply (vs direct)", f["p50_ms"],
            d["p50_ms"], "ms", "<= +2 ms", added <= 2.0),
        row("   call p90, fresh conversation (vs direct)", f["p90_ms"], d["p90_ms"], "ms"),
        row("   call p50, one conversation: reset+request+reply (vs direct)", r["p50_ms"],
            d["p50_ms"], "ms", "<= +2 ms", r["p50_ms"] - d["p50_ms"] <= 2.0),
        row("   call p90, one conversation (vs direct)", r["p90_ms"], d["p90_ms"], "ms"),
        row("   calls/s sequential, fresh conversation (vs direct)", f["per_s"], d["per_s"],
            "/s", fmt="{:.0f}"),
        row("   calls/s sequential, one conversation (vs direct)", r["per_s"], d["per_s"],
            "/s", fmt="{:.0f}"),
        row("   + read last (usage JSON), p50 (vs direct call)", f["steps_p50_ms"]["last"],
            d["p50_ms"], "ms"),
        row("   direct, astream_chat on trio as fs9 runs it (vs direct)",
            c["direct_async"]["p50_ms"], d["p50_ms"], "ms"),
        row("2. interactive call p50 under background load (vs quiet)", s["loaded"]["p50_ms"],
            q, "ms", "<= 2x", s["loaded"]["p50_ms"] <= 2 * q, fmt="{:.1f}"),
        row("   interactive call p90 under load (vs quiet p90)", s["loaded"]["p90_ms"],
            s["quiet"]["p90_ms"], "ms", fmt="{:.1f}"),
        row("   ... calls back to back, no pauses (vs quiet)", s["no_pauses"]["p50_ms"], q, "ms",
            fmt="{:.1f}"),
        row("   ... at priority background, no priority (vs quiet)", s["no_priority"]["p50_ms"],
            q, "ms", fmt="{:.1f}"),
        row("   ... at priority background, slowest call (vs quiet p50)",
            s["no_priority"]["max_ms"], q, "ms", fmt="{:.1f}"),
        row("   background calls/s beside interactive (vs bg alone)", s["bg_loaded_per_s"],
            s["bg_alone_per_s"], "/s", fmt="{:.1f}"),
        row("   model calls/s, background + interactive (vs bg alone)", s["total_loaded_per_s"],
            s["bg_alone_per_s"], "/s", fmt="{:.1f}"),
    ]
    return rows


def main() -> int:
    why = cannot_run("models")
    if why:
        print(why, file=sys.stderr)
        return 2
    guard_signals(WATCHDOG_S)
    global CALL_ROUNDS, SCHED_ROUNDS, BG_ALONE_S
    if "--quick" in sys.argv[1:]:
        CALL_ROUNDS, SCHED_ROUNDS, BG_ALONE_S = 2, 1, 0.5
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fs9-models-"))
    tmp.chmod(0o711)
    fs = Fs9Mount(tmp)
    fs.agents.chmod(0o755)
    server = None
    try:
        server = Server()
        fs.state.mkdir(parents=True)
        (fs.state / "models.toml").write_text(
            f'[models.fast]\nprovider = "openai"\napi_base = "{server.fast}"\nmodel = "toy"\n'
            f'api_key = "k"\nmax_concurrent = 1\n'
            f'[models.slow]\nprovider = "openai"\napi_base = "{server.slow}"\nmodel = "toy"\n'
            f'api_key = "k"\nmax_concurrent = 1\n')
        fs.mount()
        signal.alarm(WATCHDOG_S)
        print("1/2 a call through models/ vs direct ...", file=sys.stderr, flush=True)
        c = figure_calls(fs, server)
        signal.alarm(WATCHDOG_S)
        print(f"2/2 the scheduler under contention ... ({time.monotonic() - started:.0f} s)",
              file=sys.stderr, flush=True)
        s = figure_sched(fs)
        signal.alarm(0)
    finally:
        signal.alarm(0)
        try:
            unmount_all(tmp, [fs], "models")
        finally:
            if server is not None:
                server.stop()

    rows = rows_of(c, s)
    print(table(rows))
    elapsed = time.monotonic() - started
    print(f"(ran {elapsed:.0f} s on {os.cpu_count()} cpus; part 1: {c['direct']['n']} calls "
          f"of each kind in {CALL_ROUNDS} interleaved rounds, fs9 adds "
          f"{c['fresh']['p50_ms'] - c['direct']['p50_ms']:+.3f} ms (fresh) / "
          f"{c['reset']['p50_ms'] - c['direct']['p50_ms']:+.3f} ms (reset) at p50; steps p50 "
          f"(fresh): " + ", ".join(f"{k} {v:.2f}" for k, v in c["fresh"]["steps_p50_ms"].items())
          + f" ms; part 2: {s['n']} interactive calls a phase over {SCHED_ROUNDS} rounds, "
          f"{BG_AGENTS}x{BG_THREADS} background loops, slow model max_concurrent = 1)")
    return finish(RESULTS, rows, {"calls": c, "scheduler": s}, elapsed)


if __name__ == "__main__":
    sys.exit(main())
