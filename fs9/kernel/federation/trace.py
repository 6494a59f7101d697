"""A correlation id's trace across OSs: each member's part travels to the OS that asked.

Each OS's log holds only its own events; `log/trace/ID` on a member shows its own and,
labelled with their OS, the parts its peers sent it, in order of their times. A part is
sent when this OS answers a peer's work_request with a `result` (Federation.forward):
a message from `federation@US` to `federation@PEER`, `x-trace: part`, whose body is one
JSON line per event: `member` (its OS), `seq`, `ts`, `kind`, and `agent` and `task` where set (no
event's data: they may hold what the peer may not read). What an OS's part holds of
others' parts travels on with it, so the first asker sees the whole chain; a part that
arrives after this OS answered is relayed to those it answered (its new lines only).

A part is a peer's word: taken only from a peer this OS sent a work request under that
id, MAX_PARTS under one id (MAX_PARTS_PEER of them from one peer, so one cannot crowd
out the others), MAX_HELD lines under one id in all (each part received is checked
against those held, on the loop: 64 parts of 2,000 lines once cost seconds of it), only
lines of the right shape (MAX_LINES a part), never lines of this OS itself (it has its
own), each line not of the sender's own OS marked `via` the sender (never the
`via` the line claims).
Recorded as `fed_trace` (origin, id, n; the lines in the blob), the receiver's record.
"""
import json
import math
import os
import re
import time

from ..bus import message
from ..names import NAME_RE
from ..records import _json

MAX_LINES = 2000  # of one part (each ~100 bytes: well under a message's 1 MiB)
MAX_PARTS = 64  # taken under one correlation id, from all peers (each read at each part)
MAX_PARTS_PEER = 16  # of them from one peer
MAX_HELD = 10_000  # lines held under one correlation id, all parts together
HEADER = "x-trace"
KIND_RE = re.compile(r"[a-z_]{1,40}")
OS_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Traces:
    def __init__(self, fed) -> None:
        self.fed, self.kernel = fed, fed.kernel

    # --- sending ---------------------------------------------------------------

    def ship(self, peer: str, corr: str, lines: list[dict] | None = None) -> None:
        """Queue our part of corr's trace (or these lines of it) for peer's federation."""
        lines = self._part(corr) if lines is None else lines
        if not lines:
            return
        me = self.fed.me
        msg = message.Message(to=f"federation@{peer}", body="".join(
            _json(line) + "\n" for line in lines[-MAX_LINES:]).encode(), headers={
            "id": os.urandom(8).hex(), "from": f"federation@{me}", "to": f"federation@{peer}",
            "date": message.format_time(time.time()), "type": "event", "priority": "low",
            "classification": "public", "correlation-id": corr, HEADER: "part"})
        self.kernel.record("fed_queued", corr=corr, blob=msg.render(), id=msg.id,
                           to=msg.to, os=peer, classification="public", type="event",
                           deadline=None, trace=True)

    def _part(self, corr: str) -> list[dict]:
        """Our events of corr and the lines others sent us of it, oldest first."""
        me, lines = self.fed.me, []
        for e in self.kernel.log.trace(corr):
            if e.kind == "fed_trace":
                lines.extend(self._lines(e))
            elif e.kind != "fed_queued" or not e.data.get("trace"):
                lines.append(_line(me, e))
        return sorted(lines, key=lambda line: line["ts"])

    def _lines(self, e) -> list[dict]:
        return [json.loads(line) for line in self.kernel.blob(e).decode().splitlines()]

    # --- receiving ---------------------------------------------------------------

    def receive(self, origin: str, msg_id: str, corr: str | None, body: bytes) -> str | None:
        """A part from origin's federation: recorded (None), or why it is refused."""
        requests = self.fed.requests.by_corr.get(corr or "", {})
        if not any(to.endswith(f"@{origin}") for to in requests):
            return f"a trace part of {corr!r}: no request of ours went to {origin} under it"
        parts = [e for e in self.kernel.log.trace(corr) if e.kind == "fed_trace"]
        if len(parts) >= MAX_PARTS:
            return f"{MAX_PARTS} trace parts of {corr!r} taken already"
        if sum(1 for e in parts if e.data.get("origin") == origin) >= MAX_PARTS_PEER:
            return f"{MAX_PARTS_PEER} trace parts of {corr!r} taken from {origin} already"
        room = MAX_HELD - sum(e.data.get("n", 0) for e in parts)
        if room <= 0:
            return f"{MAX_HELD} lines of the trace of {corr!r} held already"
        held = {(line["member"], line["seq"]) for e in parts for line in self._lines(e)}
        lines = []
        for raw in body.decode(errors="replace").splitlines()[:min(MAX_LINES, room)]:
            line = _checked(raw, origin)
            if line is not None and line["member"] != self.fed.me and \
                    (line["member"], line["seq"]) not in held:
                held.add((line["member"], line["seq"]))
                lines.append(line)
        self.kernel.record("fed_trace", corr=corr, origin=origin, id=msg_id, n=len(lines),
                           blob="".join(_json(line) + "\n" for line in lines).encode())
        for peer in self._answered(corr) - {origin}:  # (after we answered: passed on)
            if lines:
                self.ship(peer, corr, lines)
        return None

    def _answered(self, corr: str) -> set[str]:
        """The peers we sent our part of corr to."""
        return {e.data["os"] for e in self.kernel.log.trace(corr)
                if e.kind == "fed_queued" and e.data.get("trace")}

    # --- what log/trace/ID shows -------------------------------------------------

    def render(self, corr: str) -> str:
        """Our events of corr (each with `member`, our OS, once joined) and our peers'
        parts."""
        events = self.kernel.log.trace(corr)
        me = self.fed.me
        if not me:
            return "".join(e.json() + "\n" for e in events)
        rows = []
        for e in events:
            rows.append((e.ts, e.json()[:-1] + f',"member":{_json(me)}}}'))
            if e.kind == "fed_trace":
                rows.extend((line["ts"], _json(line)) for line in self._lines(e))
        return "".join(text + "\n" for _, text in sorted(rows, key=lambda r: r[0]))

    def appliers(self) -> dict:
        return {"fed_trace": self._on_trace}

    def _on_trace(self, e, agent, task):
        self.fed.inbox.seen.add(f"{e.data['origin']}/{e.data['id']}")


def _line(me: str, e) -> dict:
    line = {"member": me, "seq": e.seq, "ts": round(e.ts, 6), "kind": e.kind}
    if e.agent is not None:
        line["agent"] = e.agent
    if e.task is not None:
        line["task"] = e.task
    return line


def _checked(raw: str, origin: str) -> dict | None:
    """One line of a peer's part, if of the right shape: only its known keys kept."""
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(d, dict):
        return None
    osname, seq, ts, kind = d.get("member"), d.get("seq"), d.get("ts"), d.get("kind")
    if not (isinstance(osname, str) and OS_RE.fullmatch(osname) and isinstance(seq, int)
            and not isinstance(seq, bool) and 0 <= seq < 1 << 62
            and isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts)
            and isinstance(kind, str) and KIND_RE.fullmatch(kind)):
        return None
    line = {"member": osname, "seq": seq, "ts": float(ts), "kind": kind}
    agent, task = d.get("agent"), d.get("task")
    if isinstance(agent, str) and NAME_RE.fullmatch(agent):
        line["agent"] = agent
    if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < 1 << 62:
        line["task"] = task
    if osname != origin:  # the peer it came from, the one name this OS can vouch for (a
        line["via"] = origin  # `via` in the line is the sender's word: another's name)
    return line
