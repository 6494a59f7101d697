"""Sandboxes made ahead of their agents' spawns (drivers/pooled.py says what one is):
a confined spawn that finds one takes its uid, and its agent starts it at once (not at
its first task: agent.py) and hands it its spec, where a fresh sandbox would be forked,
set up and its first program moved into its control group then (the move waits for a
grace period of the kernel's cgroup migration lock: docs/benchmarks.md). Its scratch
folder and control group (default limits) are made with it.

Off unless the operator asks (`fs9 mount --sandbox-pool N`): each unused one holds two
processes (the sandbox and its first program), a uid, a control group and an empty
scratch folder.

Bounded: at most N made at a time (limits.POOL_MAX at most), one made at a time, each in a sandbox start's
place (agents/starts.py: the operator's room kept) and from a uid vetted ahead
(uidreserve.py), never by a walk of /proc; none made while fs9 is halted. Each is for
one uid, set aside (kernel.uids_pooled: no spawn gets it otherwise) with its control
group made in that uid's name and default limits, which the agent's start rewrites
with its own if they differ. Used once: a spawn takes it with its uid, or it is closed unused. Which
spawns take one: confined agents that run a program (not supervisors), started at
once (not on-demand: one asleep would hold it), and without `inet`.

At unmount every one not taken, and every one taken whose agent never started it,
is closed, its control group removed and its uid let go: nothing is left.
"""
import shutil

import trio

from ...drivers import cgroups, confine, uidslots
from . import limits, sandbox as sandboxes, view as views

RETRY_S = (0.5, 30.0)  # after a failed making, waits doubling from, up to
# A take's replacement is begun this long after it: making one (a fork, a network
# namespace, a program moved into a control group) takes the CPU the taking spawn's
# start needs, which is over by then on a quiet machine (docs/benchmarks.md).
AFTER_TAKE_S = 0.05


class Entry:
    """One sandbox made ahead: its uid's offset, control group (and the limits it was
    made with: the defaults) and sandbox."""

    def __init__(self, offset: int, uid: int, group: cgroups.Group) -> None:
        self.offset, self.uid, self.group = offset, uid, group
        d = limits.DEFAULTS
        self.limits = (d["memory_mb"] << 20, d["processes"], limits.CPU_WEIGHT["normal"])
        self.sandbox: confine.Pooled | None = None


class SandboxPool:
    def __init__(self, size: int) -> None:
        self.size = size  # how many are kept made ahead (0: none)
        self._ready: list[Entry] = []  # made, not taken
        self._dead: list[Entry] = []  # made, found ended (their fork server killed, say)
        self._out: dict[int, Entry] = {}  # uid -> taken by a spawn, not yet started
        self._wanted = trio.Event()

    def __len__(self) -> int:
        return len(self._ready)

    def take(self, kernel, name: str, manifest: dict) -> int | None:
        """At a spawn (the write's): the uid offset of a sandbox made ahead, set aside
        for this agent (`hand` gives it to it), or None to pick a uid as usual."""
        if len(self._ready) < self.size:
            self._wanted.set()  # (a pool short since a halt is made again from now)
        if not self._ready or kernel.halted or manifest["unconfined"] or \
                manifest["mode"] == "supervisor" or manifest["start"] == "on-demand" or \
                "inet" in views.parse(name, manifest).pledges:
            return None
        entry = self._ready.pop(0)
        self._wanted.set()
        if not entry.sandbox.alive():  # (closed by keep, which makes another)
            self._dead.append(entry)
            return self.take(kernel, name, manifest)
        self._out[entry.uid] = entry
        kernel.uids_pooled.discard(entry.uid)  # (the spawn's now: kernel.uids has it)
        kernel.uid_reserve.given(entry.offset)
        return entry.offset

    def untake(self, kernel, offset: int) -> None:
        """The spawn that took offset's sandbox was not recorded: it is the pool's again."""
        uid = uidslots.uid_base(kernel.uid_slot) + offset
        entry = self._out.get(uid)
        if entry is not None and uid not in kernel.uids:
            del self._out[uid]
            kernel.uids_pooled.add(uid)
            self._ready.insert(0, entry)

    def hand(self, uid: int) -> Entry | None:
        """The sandbox made ahead for the agent just spawned with this uid, if any."""
        return self._out.get(uid)

    def started(self, entry: Entry) -> confine.Pooled | None:
        """Its agent starts it: the sandbox, now the agent's (None: it has ended; the
        agent starts a fresh one, in the same control group)."""
        self._out.pop(entry.uid, None)
        sandbox, entry.sandbox = entry.sandbox, None
        return sandbox if sandbox is not None and sandbox.alive() else None

    async def drop(self, entry: Entry) -> None:
        """Its agent ended before it started it: close it (its group stays the agent's,
        whose end removes it)."""
        self._out.pop(entry.uid, None)
        if entry.sandbox is not None:
            sandbox, entry.sandbox = entry.sandbox, None
            await sandbox.close()

    async def keep(self, kernel) -> None:
        """Keep `size` sandboxes made ahead, for the mount's life; at its end, close them."""
        if self.size == 0:
            return
        await kernel.mounted.wait()
        try:
            retry = RETRY_S[0]
            while True:
                while self._dead:
                    with trio.CancelScope(shield=True):  # (seen through, as at the end)
                        await self._discard(kernel, self._dead.pop())
                if len(self._ready) >= self.size or kernel.halted:
                    await self._wanted.wait()
                    self._wanted = trio.Event()
                    await trio.sleep(AFTER_TAKE_S)
                    continue
                try:
                    entry = await self._make(kernel)
                except OSError:  # (the fork server down or stopping, a group refused)
                    entry = None
                if entry is not None:
                    self._ready.append(entry)
                    retry = RETRY_S[0]
                    continue
                with trio.move_on_after(retry):  # (no vetted uid yet, or it failed)
                    await self._wanted.wait()
                self._wanted = trio.Event()
                retry = min(retry * 2, RETRY_S[1])
        finally:
            with trio.CancelScope(shield=True):
                entries = self._ready + self._dead + list(self._out.values())
                self._ready, self._dead, self._out = [], [], {}
                for entry in entries:
                    await self._discard(kernel, entry)

    async def _make(self, kernel) -> Entry | None:
        """One made, or None if no vetted uid is free now; OSError if it failed (what
        it made is gone)."""
        offset = kernel.uid_reserve.take(kernel)
        if offset is None:
            return None
        uid = uidslots.uid_base(kernel.uid_slot) + offset
        kernel.uids_pooled.add(uid)
        entry = Entry(offset, uid, cgroups.Group(kernel.instance, str(uid)))
        try:
            await trio.to_thread.run_sync(entry.group.create, *entry.limits)
            sandboxes.make_scratch(sandboxes.scratch_of(kernel, uid), uid)
            async with kernel.sandbox_starts.place(True):
                entry.sandbox = await confine.Pooled.make(
                    kernel.forkserver, uid, entry.group.join_files(), kernel.audit)
            return entry
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard(kernel, entry)
            raise

    async def _discard(self, kernel, entry: Entry) -> None:
        """Close a sandbox never started, remove its group, let its uid go (only one
        no agent holds: a spawn's agent removes its own group at its end)."""
        if entry.sandbox is not None:
            sandbox, entry.sandbox = entry.sandbox, None
            await sandbox.close()
        if kernel.uids.get(entry.uid) is None and entry.uid not in kernel.uids_ending:
            await trio.to_thread.run_sync(entry.group.remove)
            shutil.rmtree(sandboxes.scratch_of(kernel, entry.uid), ignore_errors=True)
            kernel.uids_pooled.discard(entry.uid)
