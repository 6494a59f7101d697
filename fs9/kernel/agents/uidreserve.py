"""Agents' uids vetted ahead of their spawns. A spawn must take a uid no process on the
host runs as (a previous holder's program may outlive it), and learning that is a walk
of /proc: 25-35 ms of the spawn's write with 2,000 processes on the host. A background
walk finds free uids before they are wanted; a spawn takes one of those, and walks
/proc itself only when none is left (a burst of spawns: one walk a write, as before).

Sound because nothing but this fs9 puts a process on a uid of its range (the range is
this instance's alone, uidslots.py): a uid no process held at the walk, and that no
agent was given since the walk began, holds none now. A uid once given to an agent
leaves the reserve for good (its programs may outlive the agent): it is vetted afresh
by a later walk before it is handed out again.
"""
import trio

from ...drivers import uidslots

LOW = 16  # fewer vetted uids than this: walk /proc again, in the background
FULL = 64  # how many a walk vets


class UidReserve:
    def __init__(self) -> None:
        self._free: list[int] = []  # offsets in the instance's range, in the order given
        self._given: set[int] = set()  # offsets given while a walk was under way
        self._wanted = trio.Event()
        self._wanted.set()  # (the first walk comes at mount)

    def __len__(self) -> int:
        return len(self._free)  # (how many are vetted now)

    def take(self, kernel) -> int | None:
        """A vetted free offset, taken out of the reserve; None if none is left."""
        base = uidslots.uid_base(kernel.uid_slot)
        while self._free:
            offset = self._free.pop(0)
            uid = base + offset
            if uid not in kernel.uids and uid not in kernel.uids_ending and \
                    uid not in kernel.uids_pooled:
                self._want_more()
                return offset
        self._want_more()
        return None

    def given(self, offset: int) -> None:
        """An agent was given this offset (by whatever path): never from the reserve
        again until a walk begun after this vets it."""
        self._given.add(offset)
        if offset in self._free:
            self._free.remove(offset)

    def _want_more(self) -> None:
        if len(self._free) < LOW:
            self._wanted.set()

    async def keep(self, kernel) -> None:
        """Refill the reserve whenever it runs low, for the mount's life."""
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            self._given = set()
            base = uidslots.uid_base(kernel.uid_slot)
            running = await trio.to_thread.run_sync(
                uidslots.uids_running, base, base + uidslots.SLOT_SIZE, abandon_on_cancel=True)
            # (from the latest spawn's offset on, as a spawn that walks /proc picks)
            held = set(self._free) | self._given
            fresh = []
            for i in range(1, uidslots.SLOT_SIZE + 1):
                if len(self._free) + len(fresh) >= FULL:
                    break
                offset = (kernel.uid_offset + i) % uidslots.SLOT_SIZE
                uid = base + offset
                if offset not in held and uid not in running and uid not in kernel.uids \
                        and uid not in kernel.uids_ending and uid not in kernel.uids_pooled:
                    fresh.append(offset)
            self._free += fresh
