"""What a confined agent's sandbox is made of, and what it needs before it starts:
its uid (never one a previous holder may still use), its scratch folder (in a folder
of fs9's own, where no other user can plant a name), its control group (its limits),
and the spec handed to drivers/zygote.py. Plain functions over the kernel's and the
agent's data; the sandbox itself is drivers/confine.py's.
"""
import errno
import os
import tempfile

import trio

from ...drivers import cgroups, confine, migrations, uidslots
from ...errors import Fs9Error
from .. import approvals, labels
from . import endings, limits
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel import Kernel


def running_uids(kernel: "Kernel") -> set[int]:
    """The uids of this instance's range some process on the host runs as."""
    base = uidslots.uid_base(kernel.uid_slot)
    return uidslots.uids_running(base, base + uidslots.SLOT_SIZE)


def free_uid_offset(kernel: "Kernel", running: set[int]) -> int:
    """The next uid of this instance's range that nothing holds: no agent of ours, and
    no process on the host (`running`: running_uids; a previous holder's program may
    outlive it)."""
    base = uidslots.uid_base(kernel.uid_slot)
    for i in range(1, uidslots.SLOT_SIZE + 1):
        offset = (kernel.uid_offset + i) % uidslots.SLOT_SIZE
        uid = base + offset
        if uid not in kernel.uids and uid not in running and uid not in kernel.uids_ending \
                and uid not in kernel.uids_pooled:
            return offset
    raise Fs9Error(errno.EAGAIN, f"all {uidslots.SLOT_SIZE} agent uids of this fs9 are in use")


class UidPicker:
    """Free uids for the spawns of one write: a sandbox's made ahead for it (pool.py),
    or each vetted ahead (uidreserve.py), or, when none is left, found with one walk of
    /proc for the whole write."""

    def __init__(self, kernel: "Kernel") -> None:
        self._kernel = kernel
        self._running: set[int] | None = None

    def next(self, name: str, manifest: dict) -> int:
        offset = self._kernel.sandbox_pool.take(self._kernel, name, manifest)
        if offset is not None:
            return offset
        offset = self._kernel.uid_reserve.take(self._kernel)
        if offset is not None:
            return offset
        if self._running is None:
            self._running = running_uids(self._kernel)
        return free_uid_offset(self._kernel, self._running)


def scratch_root(kernel: "Kernel") -> str:
    """Where agents' scratch folders are: a folder of fs9's own (root's, 0711) made
    afresh in /tmp on first use, so no other user can plant a name in it. One that a
    server of this state left (killed, it removed nothing) goes then, or at unmount."""
    if not kernel.scratch_dir:
        prefix = scratch_prefix(kernel)
        endings.remove_scratch_roots(prefix)
        kernel.scratch_dir = tempfile.mkdtemp(prefix=prefix)
        os.chmod(kernel.scratch_dir, 0o711)
    return kernel.scratch_dir


def scratch_prefix(kernel: "Kernel") -> str:
    return f"fs9-scratch-{kernel.instance}-"


def scratch_of(kernel: "Kernel", uid: int) -> str:
    """The scratch folder of the agent of this uid."""
    return os.path.join(scratch_root(kernel), str(uid))


def make_scratch(path: str, uid: int) -> None:
    """An agent's scratch folder, made and given to its uid without following anything
    (its parent is root's, 0711: nobody else can make names in it)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchown(fd, uid, uid)
    finally:
        os.close(fd)


# One such write at a time, in a thread of its own: starts meanwhile share its grace
# period, and a thousand sandboxes starting never hold the worker threads that other
# work (a control group's removal, say) needs.
_MOVES = trio.CapacityLimiter(1)


def begin_group_moves(kernel: "Kernel") -> None:
    """A sandbox starts: begin, in a worker thread, the grace period its first program's
    move into its control groups would wait for (drivers/migrations.py), unless one
    is under way."""
    if kernel._nursery is not None and _MOVES.borrowed_tokens == 0:
        kernel._nursery.start_soon(_begin_grace_period)


async def _begin_grace_period() -> None:
    try:
        _MOVES.acquire_nowait()
    except trio.WouldBlock:
        return  # (one began a moment ago: this start shares its grace period)
    try:
        await trio.to_thread.run_sync(migrations.begin_grace_period, abandon_on_cancel=True)
    finally:
        _MOVES.release()


def group_limits(agent) -> tuple[int, int, int]:
    """What its control group is made with: (memory bytes, processes, cpu weight)."""
    return (agent.limits["memory_mb"] << 20, agent.limits["processes"],
            limits.CPU_WEIGHT[agent.priority])


def make_group(agent, group: cgroups.Group | None = None,
               made: tuple[int, int, int] | None = None) -> cgroups.Group:
    """Its control group, with its limits (drivers/cgroups.py); `group`: the one made
    ahead with its sandbox (pool.py) with limits `made`, the agent's from now (written
    again only if the agent's differ). A controller the host lacks is said once, in an
    event."""
    wanted = group_limits(agent)
    if group is None or made != wanted:
        group = group or cgroups.Group(agent.kernel.instance, str(agent.uid))
        group.create(*wanted)
    if group.missing:
        agent.kernel.log.append("limits_unavailable", agent=agent.name,
                                reason=f"this host has no cgroup {', '.join(group.missing)} "
                                       "controller: those limits are not enforced")
    return group


def _vault_binds(kernel: "Kernel", subtrees) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(its names under the vault's folder, its names under the mount) for vault
    subtrees: the zygote resolves both beneath fds, never a path string."""
    return [(sub[1:], sub) for sub in subtrees] if kernel.vault_dir else []


def _owned_natively(agent) -> list[tuple[str, ...]]:
    """The owned subtrees its sandbox binds read-write from disk: not one holding or
    inside a path whose changes need the operator's yes (approval.vault_write), which
    fs9 serves instead, so that every change there meets the question."""
    gated = approvals.vault_gated(agent)
    return [p for p in agent.view.owned_vault()
            if not any(p[:len(g)] == g or g[:len(p)] == p for g in gated)]


def spec(kernel: "Kernel", agent) -> dict:
    """What agent's sandbox is made of (drivers/zygote.py reads it). The vault subtrees
    it binds from disk are noted in kernel.native_reads."""
    mnt = kernel.mount_path
    read = list(confine.SYSTEM_READ) + agent.driver.reads(agent.manifest)
    if agent.workdir() == agent.home:
        read.append(agent.home)
    net = dict(inet="inet" in agent.view.pledges, **agent.manifest.get("net", {}))
    # read natively, past fs9's label checks: only what holds nothing labelled above it,
    # remembered so that no owner cleared above it claims a subtree in there later
    native = agent.view.read_only_vault(labels.above(kernel, agent.manifest["clearance"]))
    kernel.native_reads[agent] = tuple(native) if kernel.vault_dir else ()
    return dict(agent=agent.name, uid=agent.uid, mnt=mnt, audit=kernel.audit, net=net,
                cgroups=agent.group.join_files() if agent.group is not None else [],
                scratch=agent.scratch, scratch_mb=agent.limits["scratch_mb"],
                view=os.path.join(mnt, "agents", agent.name, "view"),
                hide=[p for p in (kernel.state_dir, kernel.vault_dir) if p],
                vault=kernel.vault_dir, binds=_vault_binds(kernel, native),
                owned_binds=_vault_binds(kernel, _owned_natively(agent)),
                read=read, write=[mnt, agent.scratch], devices=list(confine.DEVICES))
