"""Agents that start on demand (manifest `start = "on-demand"`): no loop, sandbox or
process until work comes (a task queued; a daemon, mail delivered), and asleep again after
`idle_s` without work, keeping everything else (mailbox, memory, tasks, uid) but its
scratch folder, a tmpfs of the sandbox's that goes with it (each wake starts empty).
A mixin of Agent (agent.py): asleep is simply its loop not running (Agent.serving false),
so ten thousand of them cost the server their state and nothing else.
"""
import collections

import trio

from .limits import MAX_AWAKE

# On-demand agents awake at once (MAX_AWAKE, kept in limits.py). Any agent with `send`
# can mail every agent it sees and so wake them all; each awake one costs a sandbox
# (memory and CPU on fs9's own account), so past this many a wake waits its turn (first
# come, first served) until another falls asleep or ends: its work waits, queued,
# nothing is lost. Agents that are not on-demand (the operator's always-on ones) are
# never counted, and a flood has a source the operator can see in `status` (awake,
# waking) and stop.


class Wakes:
    """The kernel's count of awake on-demand agents and the queue of those waiting to
    wake (kernel.wakes)."""

    def __init__(self, kernel, most: int = MAX_AWAKE) -> None:
        self.kernel, self.most = kernel, most
        self.awake: set = set()  # on-demand agents whose loop runs
        self.waiting: collections.OrderedDict = collections.OrderedDict()  # name -> agent

    def request(self, agent) -> None:
        """Wake agent now if there is room, else queue it (once)."""
        if agent in self.awake:
            return
        if len(self.awake) < self.most:
            self.waiting.pop(agent.name, None)
            self.awake.add(agent)
            self.kernel.start_loop(agent)
        else:
            self.waiting.setdefault(agent.name, agent)

    def ended(self, agent) -> None:
        """agent's loop returned (asleep, killed, or a defect): its room goes to the
        first waiting agent that still has work."""
        self.awake.discard(agent)
        while self.waiting and len(self.awake) < self.most:
            _, first = self.waiting.popitem(last=False)
            first.wake()  # (one killed, stopped or without work meanwhile stays asleep)


class OnDemand:
    """Agent's sleeping and waking (it holds the manifest, the loop, the mailbox)."""

    @property
    def on_demand(self) -> bool:
        """It runs only while it has work (manifest `start`), asleep after idle_s without."""
        return self.manifest["start"] == "on-demand"

    def wanted(self) -> bool:
        """It has work: a task queued or running; a daemon, mail pending."""
        if self.current is not None:
            return True
        return bool(self.mailbox.order) if self.daemon else bool(self.queue)

    def wake(self) -> None:
        """An asleep on-demand agent with work gets its loop (and then its sandbox) again,
        when there is room for one more awake (Wakes)."""
        if self.on_demand and not self.serving and self.runnable() and self.wanted():
            self.kernel.wakes.request(self)

    def _mail_came(self) -> None:
        self.changes.bump()  # (an awake one waiting for work looks again)
        self.wake()

    async def _idle(self) -> bool:
        """An on-demand agent without work: whether some came within idle_s (if not, it
        sleeps: its loop returns)."""
        if self._idled:  # its daemon's run waited idle_s already
            self._idled = False
            return False
        with trio.move_on_after(self.manifest["idle_s"]):
            await self.changes.wait_past(self.changes.version)
            return True
        return self.wanted()

    async def _watch_idle(self) -> None:
        """An on-demand daemon's run: ended once no mail was pending for idle_s."""
        box = self.mailbox
        while True:
            while box.order:
                await box.changes.wait_past(box.changes.version)
            with trio.move_on_after(self.manifest["idle_s"]):
                await box.changes.wait_past(box.changes.version)
                continue
            if not box.order:
                self._idled = True
                self._cancel_run("asleep")
                return
