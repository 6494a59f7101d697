"""Sandboxes starting at once, with room kept for the operator's agents.

A thousand spawns in one burst start their sandboxes a few at a time, each in its own
time limit, rather than all sharing the CPUs until every one of them runs out of its
time to start. Agents that other agents spawned (an agent with `spawn` in a loop) may
hold all but RESERVED of those places: an agent the operator spawned always finds one
free, and waits behind at most the starts under way, never behind a queue an agent made.
"""
import contextlib

import trio

PER_CPU = 4  # starts at once per CPU
RESERVED = 2  # of them, never taken by agents an agent spawned


class Starts:
    def __init__(self, places: int) -> None:
        self._all = trio.Semaphore(places)
        # agents' spawns pass this first: at most places - RESERVED of them hold or wait
        # for a place, so RESERVED places stay free for the operator's (trio's
        # semaphores are first come, first served)
        self._agents = trio.Semaphore(max(1, places - RESERVED))

    @contextlib.asynccontextmanager
    async def place(self, by_agent: bool):
        """Hold a place while a sandbox starts. by_agent: another agent spawned it."""
        async with contextlib.AsyncExitStack() as held:
            if by_agent:
                await held.enter_async_context(self._agents)
            await held.enter_async_context(self._all)
            yield
