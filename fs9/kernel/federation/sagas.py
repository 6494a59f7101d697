"""Sagas: a multi-step workflow across OSs, coordinated by this OS (orchestration), with
compensation on failure.

The operator writes a saga's definition (TOML) to federation/sagas/new:
    id = "csv-4521"
    on_failure = "compensate"          # or "escalate": a person decides
    [[step]]
    name = "fix"
    to = "fixer@coding"                # AGENT@OS of a declared peer
    request = "fix the CSV export"     # the work_request's body
    compensate = "revert the fix"      # optional: what undoes it (to the same agent)
    retries = 2                        # attempts after the first (default 1)
    timeout_s = 60                     # per attempt (default 120)
    classification = "public"          # the requests' label (default public)
Each step is a cross-OS work_request (correlation id ID.STEP.ATTEMPT; compensation
ID.STEP.undo), its state read from requests.py (so answers are the peer's own, in
order). A step that fails or times out is retried with exponential backoff (1, 2, 4 s,
... at most 30 s); out of attempts, the saga is either compensated (each earlier step
that declares a compensation undone, in reverse; a step with none stands: partial
success is kept) or escalated: it waits for the operator, who is told by mail and
answers in federation/sagas/ID/ctl (`retry`, `compensate`, `abort`; `escalate` stops a
running saga for a person). Every decision is an event carrying the saga's id as its
correlation id (log/trace/ID):
  saga_started (saga; the definition in the blob)
  saga_step (saga, step, state; request: its correlation id, attempt, at, reason)
  saga_state (saga, state, reason)
A step is marked `sent` before its request is queued, so a crash between the two costs
a retry (after the timeout), never a request sent twice under one attempt.
"""
import errno
import time
import tomllib
from dataclasses import dataclass

from ...errors import Fs9Error
from .. import cmd
from ..bus import message
from ..names import NAME_RE, OPERATOR, one_line
from ..stream import Changes

MAX_SAGAS = 1000  # kept in memory; past it, a new one is EAGAIN until old ones end
MAX_STEPS = 32
MAX_TEXT = 64 << 10
BACKOFF_MAX_S = 30.0
ENDED = ("completed", "compensated", "aborted")
CMDS = (cmd.Cmd("retry", "retry"), cmd.Cmd("compensate", "compensate"),
        cmd.Cmd("escalate", "escalate"), cmd.Cmd("abort", "abort"))


@dataclass
class Step:
    name: str
    to: str
    request: str
    compensate: str
    retries: int
    timeout_s: float
    classification: str
    state: str = "pending"  # sent, retrying, done, failed, undoing, undone, undo_failed
    attempt: int = 0
    granted: int = 0  # attempts the operator added (`retry`)
    corr: str = ""
    at: float = 0.0  # when sent, or when the next attempt is due (retrying)
    reason: str = ""

    def line(self, n: int) -> str:
        return (f"{n} {self.name} to={self.to} state={self.state} attempt={self.attempt}/"
                f"{self.retries + self.granted + 1} corr={self.corr or '-'} reason={self.reason or '-'}")


class Saga:
    def __init__(self, sid: str, on_failure: str, steps: list[Step]) -> None:
        self.id, self.on_failure, self.steps = sid, on_failure, steps
        self.state, self.current, self.reason = "running", 0, ""

    def status(self) -> str:
        step = self.steps[self.current].name if self.current < len(self.steps) else "-"
        stand = [s.name for s in self.steps if s.state == "done"]
        return (f"id={self.id}\nstate={self.state}\nstep={step}\n"
                f"steps={len(self.steps)}\non_failure={self.on_failure}\n"
                f"standing={' '.join(stand) or '-'}\nreason={self.reason or '-'}\n")

    def steps_text(self) -> str:
        return "".join(s.line(n) + "\n" for n, s in enumerate(self.steps))


def parse(data: bytes) -> tuple[str, str, list[Step]]:
    """A saga's definition, checked item by item (EINVAL naming the item)."""
    def bad(what: str):
        return Fs9Error(errno.EINVAL, f"saga: {what}")
    try:
        d = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise bad(f"not TOML: {one_line(str(e))}")
    if set(d) - {"id", "on_failure", "step"}:
        raise bad(f"unknown keys {sorted(set(d) - {'id', 'on_failure', 'step'})}")
    sid = d.get("id")
    if not isinstance(sid, str) or not NAME_RE.fullmatch(sid) or len(sid) > 64 or sid == "new":
        raise bad("id: letters, digits, _ . - (at most 64; not `new`)")
    on_failure = d.get("on_failure", "compensate")
    if on_failure not in ("compensate", "escalate"):
        raise bad("on_failure: compensate or escalate")
    raw = d.get("step")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_STEPS:
        raise bad(f"1 to {MAX_STEPS} [[step]] tables")
    steps, keys = [], {"name", "to", "request", "compensate", "retries", "timeout_s",
                       "classification"}
    for n, s in enumerate(raw):
        if not isinstance(s, dict) or set(s) - keys:
            raise bad(f"step {n}: a table of {', '.join(sorted(keys))}")
        name, to = s.get("name", f"step{n}"), s.get("to")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise bad(f"step {n}: bad name")
        if not isinstance(to, str) or "@" not in to:
            raise bad(f"step {name}: to = AGENT@OS")
        for key in ("request", "compensate"):
            if not isinstance(s.get(key, ""), str) or len(s.get(key, "")) > MAX_TEXT:
                raise bad(f"step {name}: {key} is text of at most {MAX_TEXT} bytes")
        retries, timeout = s.get("retries", 1), s.get("timeout_s", 120)
        if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 10:
            raise bad(f"step {name}: retries 0 to 10")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) \
                or not 1 <= timeout <= 86400:
            raise bad(f"step {name}: timeout_s 1 to 86400")
        label = s.get("classification", "public")
        if label not in message.CLASSIFICATIONS:
            raise bad(f"step {name}: classification one of {message.CLASSIFICATIONS}")
        steps.append(Step(name, to, s.get("request", ""), s.get("compensate", ""), retries,
                          float(timeout), label))
    return sid, on_failure, steps


class Sagas:
    def __init__(self, fed, changes: Changes) -> None:
        self.fed, self.kernel = fed, fed.kernel
        self.sagas: dict[str, Saga] = {}
        self.changes = changes  # a saga or a request moved: the coordinator looks again

    # --- the operator's files --------------------------------------------------

    def start(self, data: bytes) -> None:
        sid, _, steps = parse(data)
        if sid in self.sagas:
            raise Fs9Error(errno.EEXIST, f"saga {sid} exists")
        if sum(1 for s in self.sagas.values() if s.state not in ENDED) >= MAX_SAGAS:
            raise Fs9Error(errno.EAGAIN, f"{MAX_SAGAS} sagas are running")
        for step in steps:
            self.fed.address(step.to)  # ENOENT/ENOTCONN now, not at the step
        self.kernel.record("saga_started", corr=sid, saga=sid, blob=data)

    def ctl(self, saga: Saga, data: bytes) -> None:
        for p in cmd.parse(CMDS, data):
            verb = p.cmd.method
            allowed = {"retry": ("escalated",), "compensate": ("escalated",),
                       "escalate": ("running",), "abort": ("running", "escalated")}[verb]
            if saga.state not in allowed:
                raise Fs9Error(errno.EINVAL, f"saga {saga.id} is {saga.state}: {verb} needs "
                                             f"it {' or '.join(allowed)}")
            if verb == "retry":
                step = saga.steps[saga.current]
                self._step(saga, saga.current, "retrying", reason="retried by the operator",
                           granted=step.attempt - step.retries, at=time.time())
                self._state(saga, "running", f"the operator retries {step.name}")
            else:
                self._state(saga, {"compensate": "compensating", "escalate": "escalated",
                                   "abort": "aborted"}[verb], f"the operator said {verb}")

    # --- the coordinator -------------------------------------------------------

    def advance(self, now: float) -> float:
        """Move every saga on as far as it can go now; the time of the next deadline."""
        wake = now + 60
        for saga in list(self.sagas.values()):
            if saga.state == "running":
                wake = min(wake, self._run(saga, now))
            elif saga.state == "compensating":
                wake = min(wake, self._undo(saga, now))
        return wake

    def _answer(self, step: Step, now: float) -> str:
        """The state of step's request: done, failed (reason in step), or "" (waiting)."""
        r = self.fed.requests.by_corr.get(step.corr, {}).get(step.to)
        state = r.state if r is not None else "queued"
        if state == "done":
            return "done"
        if state in ("failed", "cancelled", "rejected"):
            return f"{state}: {r.last}" if r.last else state
        if now >= step.at + step.timeout_s:
            return f"no answer in {step.timeout_s:g} s (request {state})"
        return ""

    def _run(self, saga: Saga, now: float) -> float:
        if saga.current >= len(saga.steps):
            self._state(saga, "completed", "")
            return now
        n, step = saga.current, saga.steps[saga.current]
        if step.state in ("pending", "retrying") and now >= step.at:
            return self._send(saga, n, step.request, f"{saga.id}.{n}.{step.attempt + 1}",
                              "sent", step.attempt + 1, now)
        if step.state != "sent":
            return step.at
        answer = self._answer(step, now)
        if answer == "done":
            self._step(saga, n, "done", reason="")  # (its applier moves the saga on)
            return now
        if not answer:
            return step.at + step.timeout_s
        return self._failed(saga, n, step, answer, now)

    def _failed(self, saga: Saga, n: int, step: Step, why: str, now: float) -> float:
        if step.attempt <= step.retries + step.granted:
            delay = min(2.0 ** (step.attempt - 1), BACKOFF_MAX_S)
            self._step(saga, n, "retrying", reason=f"{why}; again in {delay:g} s",
                       at=now + delay)
            return now + delay
        self._step(saga, n, "failed", reason=why)
        if saga.on_failure == "escalate":
            self._escalate(saga, f"step {step.name} failed: {why}")
        else:
            self._state(saga, "compensating", f"step {step.name} failed: {why}")
        return now

    def _undo(self, saga: Saga, now: float) -> float:
        """Compensate the done steps that declare how, last first; the others stand."""
        todo = [n for n in range(len(saga.steps) - 1, -1, -1)
                if saga.steps[n].compensate and saga.steps[n].state in ("done", "undoing")]
        if not todo:
            self._state(saga, "compensated", saga.reason)
            return now
        n = todo[0]
        step = saga.steps[n]
        if step.state == "done":
            return self._send(saga, n, step.compensate, f"{saga.id}.{n}.undo", "undoing",
                              step.attempt, now)
        answer = self._answer(step, now)
        if answer == "done":
            self._step(saga, n, "undone", reason="")
            return now
        if not answer:
            return step.at + step.timeout_s
        self._step(saga, n, "undo_failed", reason=answer)
        self._escalate(saga, f"compensating {step.name} failed: {answer}")
        return now

    def _send(self, saga: Saga, n: int, body: str, corr: str, state: str, attempt: int,
              now: float) -> float:
        step = saga.steps[n]
        self._step(saga, n, state, request=corr, attempt=attempt, at=now, reason="")
        data = (f"type: work_request\nclassification: {step.classification}\n"
                f"correlation-id: {corr}\ndeadline: +{step.timeout_s:g}\n\n{body}\n")
        try:
            self.fed.send(step.to, data.encode(), OPERATOR)
        except Fs9Error as e:  # (not joined now, the peer gone...): this attempt failed
            if state == "undoing":
                self._step(saga, n, "undo_failed", reason=e.text)
                self._escalate(saga, f"compensating {step.name} failed: {e.text}")
                return now
            return self._failed(saga, n, step, e.text, now)
        return now + step.timeout_s

    def _escalate(self, saga: Saga, why: str) -> None:
        """A person decides: the saga waits, and the operator's mail says so."""
        self._state(saga, "escalated", why)
        bus = self.kernel.bus
        bus.deliver(bus.compose(OPERATOR, "federation", (
            f"saga {saga.id} needs you: {why}\nfederation/sagas/{saga.id}/ctl: "
            "retry, compensate or abort\n").encode(), type="event",
            **{"correlation-id": saga.id}))

    def _step(self, saga: Saga, n: int, state: str, **fields) -> None:
        self.kernel.record("saga_step", corr=saga.id, saga=saga.id, step=n, state=state,
                           **{k: (one_line(v)[:500] if k == "reason" else v)
                              for k, v in fields.items()})

    def _state(self, saga: Saga, state: str, reason: str) -> None:
        self.kernel.record("saga_state", corr=saga.id, saga=saga.id, state=state,
                           reason=one_line(reason)[:500])

    # --- applying events -------------------------------------------------------

    def appliers(self) -> dict:
        return {"saga_started": self._on_started, "saga_step": self._on_step,
                "saga_state": self._on_state}

    def _on_started(self, e, agent, task):
        sid, on_failure, steps = parse(self.kernel.blob(e))
        self.sagas[sid] = Saga(sid, on_failure, steps)
        self.changes.bump()

    def _on_step(self, e, agent, task):
        d = e.data
        saga = self.sagas[d["saga"]]
        step = saga.steps[d["step"]]
        step.state = d["state"]
        for key in ("attempt", "granted", "at", "reason"):
            if key in d:
                setattr(step, key, d[key])
        step.corr = d.get("request", step.corr)  # the correlation id of the step's request
        if step.state == "done" and saga.state == "running":
            saga.current = d["step"] + 1
        self.changes.bump()

    def _on_state(self, e, agent, task):
        saga = self.sagas[e.data["saga"]]
        saga.state, saga.reason = e.data["state"], e.data["reason"]
        self.changes.bump()
