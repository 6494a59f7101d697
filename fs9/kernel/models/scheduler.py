"""Who calls a model next, when the model is the bottleneck.

A model serves `slots` calls at once (`max_concurrent` in models.toml); more wait
here. A freed slot goes to the waiting call with the lowest key:
  1. the caller's priority class: interactive, then normal, then background;
  2. fairness within a class: the caller that has used this model least lately
     (tokens in the last minute, `recent(who)`), so one busy agent cannot starve
     the others of its class;
  3. arrival order.
A call that has waited AGED_S (3 s) goes before fairness applies (arrival order within
its class): fairness alone could hold a caller back for the whole minute its past
use counts. The key is computed when a slot frees, not when the call arrives, so
usage that changed while a call waited counts. A cancelled waiter leaves the queue; a slot
handed to a caller that was cancelled at that moment goes to the next one.
"""
import itertools
from contextlib import asynccontextmanager
from typing import Callable

import trio

RANKS = {"interactive": 0, "normal": 1, "background": 2}
AGED_S = 3.0


class _Waiter:
    def __init__(self, who: str, rank: int, seq: int) -> None:
        self.who, self.rank, self.seq = who, rank, seq
        self.since = trio.current_time()
        self.granted = trio.Event()


class Scheduler:
    def __init__(self, slots: int, recent: Callable[[str], int]) -> None:
        self.slots = max(1, slots)
        self.busy = 0
        self.recent = recent  # who -> tokens of this model used lately
        self.waiting: list[_Waiter] = []
        self._seq = itertools.count()

    @asynccontextmanager
    async def slot(self, who: str, priority: str):
        """Hold one of the model's slots for the body; blocks (in key order) until free."""
        if self.busy < self.slots and not self.waiting:
            self.busy += 1
        else:
            waiter = _Waiter(who, RANKS.get(priority, 1), next(self._seq))
            self.waiting.append(waiter)
            try:
                await waiter.granted.wait()  # _release counted us in busy
            except BaseException:
                if waiter in self.waiting:
                    self.waiting.remove(waiter)
                else:  # granted as we were cancelled: pass the slot on
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        if not self.waiting:
            self.busy -= 1
            return
        now = trio.current_time()
        best = min(self.waiting, key=lambda w: (
            w.rank, now - w.since < AGED_S, 0 if now - w.since >= AGED_S else self.recent(w.who),
            w.seq))
        self.waiting.remove(best)
        best.granted.set()  # the slot passes on: busy stays the same

    def statistics(self) -> dict:
        return {"slots": self.slots, "busy": self.busy, "waiting": len(self.waiting)}
