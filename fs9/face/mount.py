"""Serve a kernel at a mount point until unmounted, SIGINT or SIGTERM."""
import logging
import os
import signal
import sqlite3

import pyfuse3
import trio

from ..errors import Fs9Error
from ..kernel import scrape, snapshot, sync
from ..kernel.agents import spawn
from ..kernel.agents.ondemand import MAX_AWAKE
from ..kernel.kernel import Kernel
from ..kernel.state import StateError
from .device import fuse_problem
from .ops import Operations
from .reads import MAX_TASKS

log = logging.getLogger("fs9")
# FUSE reads ahead 128 KiB by default, so a cold sequential read is served in 128 KiB
# requests, each a trip through Python and a worker thread; 1 MiB (the most one FUSE
# request carries) reads a vault file cold at ~0.8x native instead of ~0.3x.
READ_AHEAD_KB = 1024
IDLE_WORKERS = 16  # pyfuse3's workers kept waiting for the next request (serve)


async def serve(mountpoint: str, state_dir: str, agents_dir: str, vault_dir: str = "",
                ready=None, audit: bool = True, durability: str = "process",
                metrics_at: tuple[str, int] | None = None, share_vault: bool = False,
                otlp: str = "", max_agents: int = spawn.MAX_AGENTS, cluster: str = "",
                node: str = "", full_replay: bool = False,
                snapshot_every: int = 100_000, max_awake: int = MAX_AWAKE,
                sandbox_pool: int = 0) -> None:
    """Mount, call ready() once requests can be served, serve until told to stop."""
    kernel = Kernel(state_dir, agents_dir, mount_path=mountpoint, vault_dir=vault_dir,
                    audit=audit, durability=durability, otlp=otlp, max_agents=max_agents,
                    cluster=cluster, node=node, full_replay=full_replay,
                    snapshot_every=snapshot_every, max_awake=max_awake,
                    sandbox_pool=sandbox_pool)
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(kernel.serve)
        except sqlite3.DatabaseError as e:  # damage the checks at open did not see
            raise StateError(f"{kernel.log.path} cannot be replayed: {e}; the files are "
                             f"left as they are (fs9 check {state_dir})") from e
        if metrics_at is not None:  # (fs9 mount --metrics HOST:PORT)
            await nursery.start(scrape.serve_http, kernel, *metrics_at)
        ops = Operations(kernel, nursery, share_vault)
        # noatime: a read need not be followed by a getattr to refresh atime
        # No default_permissions: access is decided (and refusals logged) by ops.py and the
        # views, not by mode bits the kernel checks before we ever hear of a request.
        options = set(pyfuse3.default_options) - {"default_permissions"}
        options |= {"fsname=fs9", "subtype=fs9", "noatime"}
        if os.geteuid() == 0:
            # Confined agents run as their own uids; ops.py admits each only to its view
            # (and, with --share-vault, other local users to vault/: access.py).
            options.add("allow_other")
        try:
            pyfuse3.init(ops, mountpoint, options)
        except RuntimeError as e:  # libfuse said why on stderr, above this line
            raise StateError(f"cannot mount FUSE at {mountpoint}: {e} "
                             f"({fuse_problem() or 'see the lines above'})") from None
        kernel.mounted.set()
        kernel.log.append("mount", mountpoint=mountpoint, pid=os.getpid(),
                          durability=durability)
        for kind, said in sync.last_stop(kernel.log.previous):
            kernel.log.append(kind, **said)
            log.warning("%s", said["reason"])
        try:
            nursery.start_soon(_stop_on_signal, ops, kernel)
            nursery.start_soon(_settle, mountpoint, ready)
            log.info("fs9 serving at %s (state %s, agents %s)", mountpoint, state_dir, agents_dir)
            # min_tasks: workers kept waiting for requests. With one, each read that
            # waits (a subscriber's, a blocked `mail/next`) made pyfuse3 start a worker
            # for the next request and end one after it: a trio task made and ended
            # per wait, most of a topic fan-out's cost once reads come in batches
            await pyfuse3.main(min_tasks=IDLE_WORKERS, max_tasks=MAX_TASKS)
        finally:
            pyfuse3.close(unmount=True)
            try:
                kernel.log.append("unmount", mountpoint=mountpoint)
            except Fs9Error as e:  # the log takes no writes (said in the root err)
                log.error("unmount not logged: %s", e)
            nursery.cancel_scope.cancel()
    snapshot.write_now(kernel)  # the next mount replays from here (kernel/snapshot.py)
    kernel.log.close()


async def _settle(mountpoint: str, ready) -> None:
    """Ready means set up: a reader right after `fs9 mount --background` returns gets
    the read-ahead too (CI once read the bdi before the task setting it had run)."""
    await read_ahead(mountpoint, READ_AHEAD_KB)
    if ready is not None:
        ready()


async def read_ahead(mountpoint: str, kb: int) -> None:
    """Set our mount's read-ahead (root only; its bdi is gone with the mount). The kernel
    lowers it to what FUSE's INIT reply says, so this waits for a first request (served
    only after INIT) and then finds the mount's device in mountinfo."""
    if os.geteuid() != 0:
        return
    path = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(mountpoint))),
                        os.path.basename(os.path.abspath(mountpoint)))  # no lstat of it
    for c in "\\ \t\n":  # mountinfo escapes these as octal
        path = path.replace(c, f"\\{ord(c):03o}")
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint)
        with open("/proc/self/mountinfo") as f:
            devs = [line.split()[2] for line in f if line.split()[4] == path]
        with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except (OSError, IndexError) as e:
        log.info("read-ahead of %s stays at the default: %s", mountpoint, e)


async def _stop_on_signal(ops: Operations, kernel: Kernel) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            break
    # A stop is under way: a second signal (systemd's SIGTERM to the whole control
    # group, a second Ctrl-C) must not end the server before its log is closed.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    ops.end_reads()
    with trio.move_on_after(2):  # let the ended reads send their EOF replies
        while ops.reading:
            await trio.sleep(0.01)
        await trio.sleep(0.01)
    pyfuse3.terminate()
