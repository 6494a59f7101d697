"""What a mount's agents run and what they leave behind, read from /proc and
/sys/fs/cgroup: shared by tests/test_scale.py and bench/scale.py (the same checks at a
reduced and at full size). `mount` is anything with the served `path`, the server's
`pid`, its `state` folder and the `root` folder the mount point is in (the tests' mount
fixture, bench/foundation.py's Fs9Mount)."""
import os
import zlib

READ_SYSCALL = {"x86_64": 0, "aarch64": 63, "riscv64": 63, "i686": 3, "armv7l": 3}.get(
    os.uname().machine)

# a daemon's program: each mail's body to out, then the mail removed (blocked on
# mail/next between mails)
ECHO = r'''M="$FS9_AGENT_DIR/mail"
while :; do
  m=$(cat "$M/next") || exit 1
  id=$(printf '%s\n' "$m" | sed -n 's/^id: //p' | head -n 1)
  printf '%s\n' "$m" | sed '1,/^$/d'
  rm "$M/$id"
done
'''


def ours(mount, programs_only: bool = False) -> dict[int, int]:
    """The processes this mount's agents run (their sandboxes' too, unless
    programs_only): pid -> uid. An agent's program has FS9_MNT=<the mount> in its
    environment; its sandbox is forked from the mount's fork server, whose command line
    ends with the server's pid. Not counted: the server, its fork server while it is
    the server's child (once the server is gone, a fork server left is), a zombie
    waiting for its reaper (it holds nothing: no memory, fd, mount, namespace)."""
    found, mark = {}, str(mount.path).encode()
    server = [b"fs9.drivers.forkserver", str(mount.pid).encode()]
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (mount.pid, os.getpid()):
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
            uid = os.stat(f"/proc/{entry}").st_uid
        except (OSError, ValueError):
            continue
        if state != b"Z" and (b"FS9_MNT=" + mark + b"\0" in env or (
                not programs_only and cmdline[2:3] + cmdline[-2:-1] == server
                and int(ppid) != mount.pid)):
            found[int(entry)] = uid
    return found


def blocked_on_mail(pids) -> int:
    """How many of pids are `cat` processes asleep in read(2) (on their mail/next)."""
    n = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "cat":
                    continue
            with open(f"/proc/{pid}/syscall") as f:
                n += f.read().split()[0] == str(READ_SYSCALL)
        except (OSError, IndexError):
            pass
    return n


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def groups_left(mount) -> list[str]:
    """The agents' control groups this instance left (its parent group may stay)."""
    parent = f"fs9-{zlib.crc32(str(mount.state).encode()):08x}"
    left = []
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        if os.path.basename(root) == parent:
            left += [os.path.join(root, d) for d in dirs]
            dirs.clear()
    return left


def scratch_of(pids) -> set[str]:
    """The scratch roots (HOME's parent) of these agents' programs."""
    roots = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if b"HOME" in env:
            roots.add(os.path.dirname(os.fsdecode(env[b"HOME"])))
    return roots


def uid_in_use(uids) -> list[int]:
    """Processes on the host running as any of uids."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in uids:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def left_behind(mount, uids: set[int], scratch: set[str]) -> list[str]:
    """What an unmounted fs9 left behind (nothing, it should be): processes, processes
    as its agents' uids, its mount, scratch folders, control groups."""
    left = []
    if procs := ours(mount):
        left.append(f"{len(procs)} processes")
    if running := uid_in_use(uids):
        left.append(f"{len(running)} processes as agent uids")
    with open("/proc/self/mountinfo") as f:
        if str(mount.root) in f.read():
            left.append("mounts")
    left += [f"scratch {d}" for d in scratch if os.path.exists(d)]
    left += [f"cgroup {g}" for g in groups_left(mount)]
    return left
