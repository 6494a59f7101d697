"""Agents' uids: each fs9 instance on a host owns a range (a slot) of SLOT_SIZE uids from
UID_BASE, claimed host-wide in /run/fs9/uid-slots, so two instances never share a uid.
Plain functions with no event loop: `fs9 mount`'s parent reads SLOT_SIZE without loading
the rest of the drivers.
"""
import fcntl
import os
import zlib

UID_BASE = 10_000_000  # agents' uids: UID_BASE + SLOT_SIZE * (the instance's slot) + offset
SLOTS = 10_000  # uid ranges of SLOT_SIZE uids: one per fs9 instance on a host
SLOT_SIZE = 10_000
CLAIMS = "/run/fs9/uid-slots"  # host-wide: which state directory holds which range


def claim_uid_slot(state_dir: str) -> tuple[int, int | None]:
    """The uid range (slot) this fs9 instance owns on this host, and the fd of its claim
    (flocked for the life of the process; None if claims cannot be made here). It asks
    for the slot it had (STATE/uid-slot), else one derived from the state directory's
    name; a slot another state directory claimed since boot is not taken while that
    directory exists or a process runs in its range: the next free one is, and
    remembered. So two fs9 instances never share a uid."""
    remembered = os.path.join(state_dir, "uid-slot")
    try:
        with open(remembered) as f:
            first = int(f.read()) % SLOTS
    except (OSError, ValueError):
        first = zlib.crc32(state_dir.encode()) % SLOTS
    try:
        os.makedirs(CLAIMS, mode=0o700, exist_ok=True)
    except OSError:
        return first, None
    me = state_dir.encode()
    for i in range(SLOTS):
        slot = (first + i) % SLOTS
        try:
            fd = os.open(os.path.join(CLAIMS, str(slot)),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a running fs9
            os.close(fd)
            continue
        holder = os.pread(fd, 4096, 0)
        if holder not in (b"", me) and (os.path.isdir(holder) or _range_in_use(slot)):
            os.close(fd)  # another instance's since boot: its agents may come back, or live
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        if slot != first or not os.path.exists(remembered):
            with open(remembered, "w") as f:
                f.write(str(slot))
        return slot, fd
    return first, None


def _range_in_use(slot: int) -> bool:
    lo = uid_base(slot)
    return bool(uids_running(lo, lo + SLOT_SIZE))


def uid_base(slot: int) -> int:
    """The first uid of a slot's range."""
    return UID_BASE + SLOT_SIZE * slot


def uids_running(lo: int, hi: int) -> set[int]:
    """The uids in [lo, hi) that some process on this host runs as (a previous
    holder's may): one walk of /proc, however many uids are asked about."""
    found = set()
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                try:
                    uid = entry.stat(follow_symlinks=False).st_uid
                except OSError:
                    continue
                if lo <= uid < hi:
                    found.add(uid)
    return found
