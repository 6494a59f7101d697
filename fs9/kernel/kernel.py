"""The kernel: agents and tasks, rebuilt from and changed only through the event log.

Every change is `record(kind, ...)`: check that the state can take it (`refusal`:
the lifecycles of agents and tasks, lifecycle.py), append the event (committed), then
`apply` it to the in-memory state. Mounting again replays the same events through the same
`apply` (replay.py; from the latest snapshot: snapshot.py), so the state after a crash
is the state that was acknowledged. An event
replay cannot apply (logged by a past defect, or damaged) is set aside and reported
(log.py's set-aside store, `replay_set_aside` events, the root `err`), never fatal.
Tasks that were running when the daemon died are marked interrupted, then
re-queued (restart permanent/transient) or failed (temporary, daemon runs).
"""
import collections
import errno
import gc
import logging
import os
import re
import zlib
import trio

from ..drivers import confine, uidslots
from ..errors import NO_AGENT, Fs9Error
from . import event_retention, replay, retention, snapshot, traces
from .agents.breaker import AgentBreakers, check_new
from .approvals import Approvals
from .agents import endings, escapes, pool, spawn, starts, uidreserve
from .agents import sandbox as sandboxes
from .agents.agent import Agent
from .agents.ondemand import MAX_AWAKE, Wakes
from .agents.memory import Memory
from .bus import message
from .bus.bus import Bus
from .federation import link
from .federation.federation import Federation
from .cluster.cluster import Cluster
from .lifecycle import Lifecycles
from .rootctl import RootCtl
from .appliers import event_table
from .log import EventLog
from .metrics import Metrics
from .names import one_line
from .rate import Burst, Rates
from .models.models import Models
from .stream import Stream
from .task import Task
from .vault import beneath, search, watch

MAX_INPUT = 16 << 20  # bytes of one task's input
# Tasks queued for one agent: work an agent hands it (`in`, work_request mail) waits for
# room past MAX_QUEUED (EDQUOT), the operator's and the rest's up to twice as many, so a
# flood of work costs a bounded memory (a queued task is held until it runs).
MAX_QUEUED = 10_000
REFUSALS_PER_S = 50  # an agent's refusals logged one by one per second (then counted)
log = logging.getLogger("fs9.kernel")


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a (nested) exception group."""
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


class Kernel(Lifecycles, RootCtl):
    """The kernel's state (agents, tasks, the log, the event table) and its services;
    the lifecycles of agents and tasks, recorded and applied, are lifecycle.py's."""

    def __init__(self, state_dir: str, agents_dir: str, mount_path: str = "",
                 vault_dir: str = "", audit: bool = True, durability: str = "process",
                 otlp: str = "", max_agents: int = spawn.MAX_AGENTS, cluster: str = "",
                 node: str = "", full_replay: bool = False,
                 snapshot_every: int = snapshot.SNAPSHOT_EVERY,
                 max_awake: int = MAX_AWAKE, sandbox_pool: int = 0) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.max_agents = max_agents  # live agents at once (agents/spawn.py: check_room)
        self.agents_dir = os.path.abspath(agents_dir)
        self.vault_dir = vault_dir and os.path.realpath(vault_dir)
        self.mount_path = mount_path
        self.audit = audit  # witness agents' refused syscalls through kernel audit
        self.otlp = otlp  # an OpenTelemetry collector to export traces to (traces.py), or ""
        self.mounted = trio.Event()  # the face serves mount_path: sandboxes can bind views
        self.forkserver = confine.ForkServer()  # forks each confined agent's sandbox
        # sandboxes starting at once, room kept for the operator's (agents/starts.py)
        self.sandbox_starts = starts.Starts(starts.PER_CPU * (os.cpu_count() or 1))
        self.empty_groups = endings.EmptyGroups()  # ended agents' control groups go in bulk
        self.wakes = Wakes(self, max_awake)  # on-demand agents awake, those waiting for room
        self.spawns = 0  # spawn events so far
        self.instance = f"{zlib.crc32(self.state_dir.encode()):08x}"  # names its cgroups
        self.scratch_dir = ""  # agents' scratch folders (agents/sandbox.py), once made
        self.log = EventLog(self.state_dir, mount_path, durability)
        self.notes = bytearray()  # the root err: the operator's refused commands (diag)
        # this instance's uid range on the host, claimed for the life of the process
        self.uid_slot, self._uid_claim = uidslots.claim_uid_slot(self.state_dir)
        self.uid_offset = -1  # of the latest spawn's uid in the range
        self.agents: dict[str, Agent] = {}
        # live agents per spawning agent and per definition's folder, kept at spawn and
        # kill: a spawn's room is counted in O(1), not by a walk of every agent
        self.spawned_by: collections.Counter = collections.Counter()
        self.of_home: collections.Counter = collections.Counter()
        self.uids: dict[int, Agent] = {}  # each live agent by its uid
        # uids of killed agents whose loops are still ending: no longer in `uids`, maybe
        # without a process yet, but a sandbox may still start as one (its start was
        # under way at the kill) and its end kills that uid's processes and removes the
        # control group named by it. A spawn gets none of them (agents/sandbox.py).
        self.uids_ending: set[int] = set()
        self.uid_reserve = uidreserve.UidReserve()  # free uids vetted ahead of spawns
        self.sandbox_pool = pool.SandboxPool(sandbox_pool)  # sandboxes made ahead of spawns
        self.uids_pooled: set[int] = set()  # uids set aside for them: no spawn's else
        self.owners: dict[tuple[str, ...], str] = {}  # owned vault subtree -> its agent
        self.owned_depth = 0  # names in the longest claim ever made: owner_of looks no deeper
        self.tasks: dict[int, Task] = {}  # in memory: live ones, the latest finished
        self.orphans: collections.deque[Task] = collections.deque()  # killed agents' finished
        self.plan = snapshot.Plan()  # the events a replay must apply (snapshot.py)
        self.full_replay = full_replay  # a mount replays from event 1, snapshot or not
        self.snapshot_seq = 0  # of the snapshot this mount started from (0: none)
        self.snapshot_every = snapshot_every  # events between snapshots while serving
        self.tally: collections.Counter = collections.Counter()  # tasks by state
        self.halted = False
        self.bus = Bus(self)
        self.rates = Rates()  # per-agent rate limits (rate.py)
        self._refusals = Burst(REFUSALS_PER_S)  # an agent's refusals, counted per second
        # names of agents killed while mounted, in order, until the face has dropped its
        # cached entries of them (face/ops.py takes them: it never grows past a burst)
        self.killed: collections.deque[str] = collections.deque()
        # agent -> the vault subtrees its sandbox binds read-only from disk, where fs9
        # cannot filter reads by label (labels.check_claim); kept until every process of
        # that sandbox has ended (Agent.serve), a killed agent's too
        self.native_reads: dict[Agent, tuple[tuple[str, ...], ...]] = {}
        self._nursery: trio.Nursery | None = None
        self._replaying = False
        self._fresh_blob: tuple[int, bytes | None] = (0, None)
        # every vault file fs9 touches, for anyone, is reached beneath this fd (beneath.py)
        self.vault_root = beneath.VaultRoot(self.vault_dir) if self.vault_dir else None
        self.search = search.Search(self.vault_root, self.state_dir, self.log) \
            if self.vault_dir else None
        self.vault_changes = watch.OwnChanges(self.log, self.search)
        self.models = Models(self)
        self.memory = Memory(self)
        self.approvals = Approvals(self)  # approvals/ (approvals.py)
        self.metrics = Metrics(self)  # the root `metrics` (metrics.py)
        self.federation = Federation(self)  # off until joined (federation/ctl)
        self.breakers = AgentBreakers(self)  # the agents' circuit breakers' events
        # one fs9 over several machines (kernel/cluster/): `cluster` NATS URLs, this node
        self.cluster = Cluster(self, cluster, node or re.sub(
            r"[^A-Za-z0-9_-]", "-", os.uname().nodename)[:64]) if cluster else None
        self.retired = event_retention.Retired(self)  # events cut by retention, so far
        self.handlers = event_table(self, self.bus, self.models, self.memory, self.federation,
                                    self.approvals, self.breakers, self.retired)

    # --- lifetime --------------------------------------------------------------

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Replay the log, recover interrupted tasks, run every agent; until cancelled."""
        # The replayed state lives as long as the mount: keep the cyclic collector from
        # walking it again and again while it grows (ten thousand agents: a third of the
        # replay) and after (a million tasks cost seconds-long pauses).
        gc.disable()
        try:
            self._replay()
            self._recover()
        finally:
            gc.enable()
        gc.collect()
        gc.freeze()
        try:
            await self._serve(task_status)
        finally:  # the agents' loops have ended (their groups with them): their folders
            # go, and any a killed server of this state left, sandbox or not this time
            endings.remove_scratch_roots(sandboxes.scratch_prefix(self))

    async def _serve(self, task_status) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if not self.audit:
                self.log.append("audit_unavailable", reason="fs9 mount --no-kernel-audit: "
                                "refused syscalls of confined agents are enforced, not logged")
            elif self.mount_path and confine.unavailable() is None and escapes.start_audit(self):
                nursery.start_soon(self._service, self._witness_denials)
            if self.mount_path and confine.unavailable() is None:  # sandboxes fork from it
                nursery.start_soon(self.forkserver.serve)
                nursery.start_soon(self.sandbox_pool.keep, self)
            for agent in self.agents.values():
                if agent.on_demand:
                    agent.wake()  # (one with no work sleeps on)
                else:
                    self.start_loop(agent)
            nursery.start_soon(self.uid_reserve.keep, self)
            nursery.start_soon(self.log.keep_checkpointed)
            nursery.start_soon(snapshot.keep, self, self.snapshot_seq)
            nursery.start_soon(self._service, retention.keep, self)
            nursery.start_soon(self.log.keep_deferred)
            nursery.start_soon(self.log.sync.keep_synced, self.log)
            nursery.start_soon(self._service, self.bus.keep_deadlines)
            nursery.start_soon(self._service, self.approvals.serve)
            nursery.start_soon(self._service, link.serve, self.federation)
            await nursery.start(self._service, self.models.serve)
            nursery.start_soon(self._service, self._prune_memory)
            if self.otlp:
                nursery.start_soon(self._service, traces.export, self, self.otlp)
            if self.cluster is not None:
                nursery.start_soon(self._service, self.cluster.serve)
            if self.search is not None:
                await nursery.start(self._service, self.search.serve)
                await nursery.start(self._service, watch.watch, self)
            task_status.started()
            await trio.sleep_forever()

    async def _service(self, serve, *args, task_status=None) -> None:
        """Run a background service. One whose event the log refuses (a full disk, a
        failed fsync: Fs9Error) stops, said in the root err and the server's log; the
        mount stays up. (`task_status`: given when the service is started with start.)"""
        try:
            await (serve(*args) if task_status is None else serve(*args, task_status=task_status))
        except* Fs9Error as group:  # (from a service's own nursery it comes in a group)
            e = _first(group)
            what = getattr(serve, "__qualname__", str(serve))
            log.error("%s stopped until the next mount: %s", what, e)
            self.diag(f"{what} stopped until the next mount: {e.text}")

    def start_loop(self, agent: Agent) -> None:
        """Run agent's loop (marked as running from now: one loop an agent at most)."""
        if self._nursery is not None and not agent.serving:
            agent.serving = True
            self._nursery.start_soon(self._serve_agent, agent, name=f"agent {agent.name}")

    async def _serve_agent(self, agent: Agent) -> None:
        """Run one agent's loop; a defect in it fails that agent, not the whole kernel."""
        try:
            await agent.serve()
        except Exception:
            agent.serving = False
            self.wakes.ended(agent)
            self.log.bug(f"agent {agent.name}", agent=agent.name)
            if self.agents.get(agent.name) is agent:
                try:
                    self.record("agent_failed", agent=agent.name,
                                reason="internal error (see the bug event); start retries")
                except Fs9Error as e:  # the log takes no writes (a full disk): the agent
                    log.error("agent %s stopped: %s", agent.name, e)  # stays stopped here
        else:  # an on-demand agent fell asleep: work that came while it closed wakes it
            agent.serving = False
            self.wakes.ended(agent)
            agent.wake()

    async def _prune_memory(self) -> None:
        """Agents' notes past their max_age_days go (memory.py), checked hourly."""
        while True:
            for agent in list(self.agents.values()):
                self.memory.prune(agent)
            await trio.sleep(3600)

    async def _witness_denials(self) -> None:
        """Log what the kernel's audit says confined agents were denied; a defect here
        costs the witness, never the mount."""
        try:
            await escapes.watch_denials(self)
        except Exception:
            self.log.bug("watch_denials")
            self.log.append("audit_unavailable", reason="the audit witness failed (see bug)")

    def _replay(self) -> None:
        replay.replay(self)

    def _recover(self) -> None:
        replay.recover(self)

    # --- services for the face ----------------------------------------------------

    def agent(self, name: str, by: str | None = None) -> Agent:
        """Agent NAME, as `by` (an agent; None: the operator) may name it: ENOENT if
        there is none, and the very same answer where by may not know of it."""
        agent = self.agents.get(name)
        if agent is None or (by is not None and not self.knows(by, name)):
            raise Fs9Error(errno.ENOENT, f"{NO_AGENT}: {name}")
        return agent

    def owner_of(self, path: tuple[str, ...]) -> str | None:
        """The agent owning vault path (claims never overlap); None: only the operator
        may change it."""
        # a lookup per depth, not a walk of agents; no deeper than a claim goes (a path
        # 1,200 folders deep made 1,200 tuples of up to 1,200 names a lookup)
        for n in range(1, min(len(path), self.owned_depth) + 1):
            owner = self.owners.get(path[:n])
            if owner is not None:
                return owner
        return None

    def guarded(self, fn, *args, agent: str | None = None, file: str = "ctl"):
        """Run a request; a refusal is logged (and shown in the agent's err) and re-raised."""
        try:
            return fn(*args)
        except Fs9Error as e:
            self.refused(e, agent=agent, file=file)
            raise

    def refused(self, e: Fs9Error, *, agent: str | None = None, file: str = "ctl") -> None:
        """Say why a request was refused: an event, and a line in the agent's err. An
        agent's refusals past REFUSALS_PER_S in one second are counted, not logged one by
        one: the next one logged says how many (`coalesced`), so a loop of refused calls
        cannot flood the log. The reason is one line (a name in it may hold anything)."""
        extra = {} if agent is None else self._refusals.admit(
            agent, int(trio.current_time()) if self._nursery is not None else 0)
        if extra is None:
            return
        reason = one_line(e.text)
        if agent in self.agents:
            self.agents[agent].diag(reason)
        elif agent is None:
            self.diag(reason)
        try:
            self.log.append("refused", agent=agent, file=file,
                            errno=errno.errorcode.get(e.errno, str(e.errno)), reason=reason,
                            **extra)
        except Fs9Error:
            pass  # the log takes no writes now (why: the root err); the refusal stands

    NOTES_MAX = 64 << 10

    def diag(self, text: str) -> None:
        """A line for the root `err` (the operator's refused commands); oldest go first."""
        self.notes += f"fs9: {text}\n".encode()
        if len(self.notes) > self.NOTES_MAX:
            del self.notes[:self.notes.index(b"\n", len(self.notes) - self.NOTES_MAX) + 1]

    def submit(self, agent: Agent, data: bytes | None, *, corr: str | None = None,
               reply_to: str = "", request: str = "", asker: str | None = None) -> Task:
        """Queue a task with input `data` (None: a daemon run). Returns once logged.
        A task made from a work_request carries its correlation id, the requester to
        send the result to (reply_to), the request's message id, and which holder of
        reply_to's name asked (asker: as the sender's node stamped it when it sent the
        work; None: the name's holder now; Replies.asked)."""
        if data is not None and len(data) > MAX_INPUT:
            raise Fs9Error(errno.EFBIG, f"task input over {MAX_INPUT} bytes")
        if agent.killed:  # `in` opened before the kill
            raise Fs9Error(errno.ENOENT, f"{NO_AGENT}: {agent.name} (killed)")
        if agent.daemon and data is not None:
            raise Fs9Error(errno.EINVAL, f"{agent.name} is a {agent.manifest['mode']} agent "
                                         "and takes no tasks")
        if data is not None and not request:  # (mail checked it before it was sent)
            check_new(agent)  # its circuit breaker (agents/breaker.py)
        if data is not None:
            self.check_queue(agent, operator=True)
        tid = self.log.next_seq
        extra = dict(reply_to=reply_to, request=request) if reply_to else {}
        if reply_to and (asker := self.bus.stamp(reply_to) if asker is None else asker):
            extra["asker"] = asker
        self.record("task_queued", agent=agent.name, task=tid, corr=corr or message.new_id(),
                    blob=data or b"", daemon=data is None, **extra)
        return self.tasks[tid]

    def check_queue(self, agent: Agent, operator: bool) -> None:
        """Fs9Error(EDQUOT) if agent's queue has no room for one more task handed it by
        the operator (or the kernel) or, operator False, by an agent (MAX_QUEUED)."""
        room = MAX_QUEUED * (2 if operator else 1)
        if len(agent.queue) >= room:
            raise Fs9Error(errno.EDQUOT, f"{agent.name} has {len(agent.queue)} tasks queued: "
                                         "new work waits until it has run some")

    def task_input(self, task: Task) -> bytes:
        return self.log.blob(task.id)  # a task's id is the seq of its task_queued event

    def stream(self, task: Task, fd: int) -> Stream:
        """The task's stdout (1) or stderr (2) stream, loaded from the log if need be."""
        attr = "out" if fd == 1 else "err"
        if getattr(task, attr) is None:
            setattr(task, attr, Stream(self.log.chunks(task.id, task.attempt, fd),
                                       ended=task.state != "running"))
        return getattr(task, attr)

    def emit(self, task: Task, fd: int, data: bytes) -> None:
        self.log.add_chunk(task.id, task.attempt, fd, data)
        self.stream(task, fd).append(data)

    def status(self) -> str:
        return "".join(a.status_line() for a in sorted(self.agents.values(), key=lambda a: a.name))

    def state_line(self) -> str:
        t = self.tally
        return (f"state={'halted' if self.halted else 'running'} pid={os.getpid()} "
                f"agents={len(self.agents)} queued={t['queued']} running={t['running']} "
                f"done={t['done']} failed={t['failed']} events={self.log.last_seq}\n")

