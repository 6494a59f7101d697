# PYTHON_ARGCOMPLETE_OK
"""The `fs9` command: mount (foreground or --background), umount, mcp (fs9/mcp.py) and
top (fs9/topapp.py). Shell completion: argcomplete (`eval "$(register-python-argcomplete
fs9)"`)."""
import argparse
import os
import re
import sys

from . import __version__, service
from .drivers.uidslots import SLOT_SIZE as MAX_AGENTS  # (kernel/agents/spawn.py: one uid each)
from .kernel.agents.limits import MAX_AWAKE, POOL_MAX
from .errors import StateError, UsageError
from .serverproc import (EXEMPT_ENV, background, clear_stale, exempt_from_audit,
                         serve_exempt, is_mounted, umount)

STATE_DEFAULT = os.path.join(os.environ.get("XDG_STATE_HOME", os.path.expanduser("~/.local/state")), "fs9")
VAULT_DEFAULT = os.path.join(os.environ.get("XDG_DATA_HOME", os.path.expanduser("~/.local/share")), "fs9", "vault")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fs9", description="fs9: an operating system for AI agents, as files")
    p.add_argument("--version", action="version", version=f"fs9 {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mount", help="mount fs9 at MOUNTPOINT and serve it")
    m.add_argument("mountpoint")
    m.add_argument("--vault", default=VAULT_DEFAULT, help=f"the knowledge vault directory (default {VAULT_DEFAULT})")
    m.add_argument("--state", default=STATE_DEFAULT, help=f"state directory: the event log (default {STATE_DEFAULT})")
    m.add_argument("--agents", default="agents", help="agent definitions, one folder per agent (default ./agents)")
    m.add_argument("--background", action="store_true", help="detach once the mount is ready")
    m.add_argument("--debug", action="store_true")
    m.add_argument("--no-kernel-audit", dest="audit", action="store_false",
                   help="do not witness confined agents' refused syscalls through kernel audit "
                        "(they are still refused; audited programs run ~15 us slower a syscall)")
    m.add_argument("--durability", choices=("process", "power"), default="process",
                   help="when a write is acknowledged: process (default) once logged, safe "
                        "from a crash of fs9; power once on disk, safe from a power cut "
                        "(writers share fsyncs)")
    m.add_argument("--metrics", metavar="HOST:PORT",
                   help="also serve the root metrics over HTTP for Prometheus (a loopback "
                        "address, e.g. 127.0.0.1:9109)")
    m.add_argument("--share-vault", action="store_true",
                   help="admit other local users to vault/ (only), with the usual permission "
                        "checks (mounted as root; docs/security.md)")
    m.add_argument("--otlp", metavar="URL", type=_otlp_url,
                   help="export traces (tasks, mail, model calls; one trace a correlation id) "
                        "to an OpenTelemetry collector over OTLP/HTTP, e.g. http://127.0.0.1:4318")
    m.add_argument("--max-agents", metavar="N", type=_agent_count, default=MAX_AGENTS,
                   help=f"live agents at once, 1 to {MAX_AGENTS} (the default); agents' own "
                        "spawns stop a tenth (at most 100) short of it, kept for the operator")
    m.add_argument("--max-awake", metavar="N", type=_agent_count, default=MAX_AWAKE,
                   help=f"on-demand agents awake at once, 1 to {MAX_AGENTS} (default "
                        f"{MAX_AWAKE}); past it a wake waits for room")
    m.add_argument("--sandbox-pool", metavar="N", type=_pool_size, default=0,
                   help=f"confined agents' sandboxes made ahead of their spawns, 0 (the "
                        f"default: none) to {POOL_MAX}: a spawn that takes one starts in "
                        "milliseconds; each unused holds two processes, a uid and a "
                        "control group (docs/benchmarks.md)")
    m.add_argument("--cluster", metavar="URLS", default="",
                   help="join the NATS JetStream cluster at these nats:// URLs (comma-separated) "
                        "as one node of one fs9 (docs/cluster.md); @FILE: the URLs are in FILE "
                        "(with this node's user:password@, kept off the command line; mode 600)")
    m.add_argument("--node", default="", help="this node's name in the cluster (default: the host name)")
    m.add_argument("--full-replay", action="store_true",
                   help="rebuild the state from event 1, not from the log's snapshot "
                        "(a new snapshot is written from the result)")
    m.add_argument("--snapshot-every", metavar="N", type=_snapshot_every, default=100_000,
                   help="events between the snapshots a mount starts from (default 100000)")
    m.add_argument("--config", metavar="FILE",
                   help="options from FILE's [mount] table (default: "
                        f"{service.config_path()}, if it exists); the command line wins")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--log-file", help=argparse.SUPPRESS)  # --background's fs9.log
    u = sub.add_parser("umount", help="unmount fs9 from MOUNTPOINT")
    u.add_argument("mountpoint")
    c = sub.add_parser("check", help="check a state directory: the log's integrity, "
                                     "its version, the event sequence (safe while served); "
                                     "or an archive of events retention cut (a .sqlite file)")
    c.add_argument("state")
    b = sub.add_parser("backup", help="copy a state's log into the new directory DEST, "
                                      "consistent while a server runs (mount DEST to restore)")
    b.add_argument("state")
    b.add_argument("dest")
    m = sub.add_parser("mcp", help="serve the mount at MOUNTPOINT to an MCP client as one agent")
    m.add_argument("mountpoint")
    m.add_argument("--as", dest="agent", required=True, help="the agent whose view the client gets")
    m.add_argument("--http", type=int, metavar="PORT",
                   help="streamable HTTP on 127.0.0.1:PORT (default: stdio)")
    sub.add_parser("top", help="a live terminal view of the mount at MOUNTPOINT").add_argument("mountpoint")
    k = sub.add_parser("federation-keys", help="an nkey for each member OS in DIR (OS.nk, "
                       "kept if there) and DIR/auth.conf, the nats-server's users: each "
                       "member may publish only as itself (docs/namespace.md)")
    k.add_argument("dir")
    k.add_argument("os", nargs="+")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["mount"]:  # the configuration's values are defaults of the options
        known, _ = _config_option().parse_known_args(argv[1:])
        try:
            config = service.load_config(known.config)
        except service.ConfigError as e:
            print(f"fs9: {e}", file=sys.stderr)
            return 2
        if "kernel_audit" in config:
            config["audit"] = config.pop("kernel_audit")
        sub.choices["mount"].set_defaults(**config)
    if "_ARGCOMPLETE" in os.environ:  # a shell asks for completions (and gets them)
        import argcomplete
        argcomplete.autocomplete(p)
    args = p.parse_args(argv)
    args.argv = argv
    if args.cmd == "top":
        from . import topapp
        return topapp.run(args.mountpoint)
    if args.cmd == "mcp":
        from . import mcp
        return mcp.run(args.mountpoint, args.agent, args.http)
    try:
        if args.cmd == "check":
            return check(args.state)
        if args.cmd == "backup":
            return backup(args.state, args.dest)
        if args.cmd == "federation-keys":
            return federation_keys(args.dir, args.os)
        return mount(args) if args.cmd == "mount" else umount(args.mountpoint)
    except UsageError as e:
        print(f"fs9: {e}", file=sys.stderr)
        return 2
    except StateError as e:  # the state is another server's, or unreadable: one line
        print(f"fs9: {e}", file=sys.stderr)
        return 1


def _config_option() -> argparse.ArgumentParser:
    """Just `--config`, to read the configuration before the options it provides."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    return pre


def _otlp_url(url: str) -> str:
    if not url.startswith(("http://", "https://")) or not url.split("://", 1)[1].strip("/"):
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {url!r}")
    return url


def _agent_count(word: str) -> int:
    if not (word.isascii() and word.isdigit() and 1 <= int(word) <= MAX_AGENTS):
        raise argparse.ArgumentTypeError(f"not a number from 1 to {MAX_AGENTS}: {word!r}")
    return int(word)


def _pool_size(word: str) -> int:
    if not (word.isascii() and word.isdigit() and 0 <= int(word) <= POOL_MAX):
        raise argparse.ArgumentTypeError(f"not a number from 0 to {POOL_MAX}: {word!r}")
    return int(word)


def _snapshot_every(word: str) -> int:
    if not (word.isascii() and word.isdigit() and 1 <= int(word) <= 10**9):
        raise argparse.ArgumentTypeError(f"not a number of events from 1 to 10^9: {word!r}")
    return int(word)


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def mount(args) -> int:
    mnt = os.path.abspath(args.mountpoint)
    state, agents, vault = (os.path.abspath(d) for d in (args.state, args.agents, args.vault))
    for label, d in (("state", state), ("vault", vault), ("agents", agents)):
        if _inside(mnt, d) or _inside(d, mnt):
            raise UsageError(f"the mount point {mnt} must not be inside the {label} directory "
                             f"{d} (nor it inside the mount point): lookups would deadlock")
    if not 1 <= args.max_agents <= MAX_AGENTS:  # (from a configuration file)
        raise UsageError(f"max_agents is from 1 to {MAX_AGENTS}, not {args.max_agents}")
    if not 1 <= args.max_awake <= MAX_AGENTS:  # (from a configuration file)
        raise UsageError(f"max_awake is from 1 to {MAX_AGENTS}, not {args.max_awake}")
    if not 0 <= args.sandbox_pool <= POOL_MAX:  # (from a configuration file)
        raise UsageError(f"sandbox_pool is from 0 to {POOL_MAX}, not {args.sandbox_pool}")
    if args.cluster and args.node and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", args.node):
        raise UsageError(f"not a node name: {args.node!r} (letters, digits, _ and -)")
    cluster_urls(args.cluster)  # (a file that will not do is said before any mount)
    metrics_at = None
    if args.metrics:
        from .kernel.scrape import http_address
        try:
            metrics_at = http_address(args.metrics)
        except ValueError as e:
            raise UsageError(str(e))
    from .face.device import fuse_problem  # (not the face itself: see device.py)
    why = fuse_problem()
    if why:
        raise UsageError(f"cannot mount {mnt}: {why}")
    clear_stale(mnt)
    if is_mounted(mnt):
        raise UsageError(f"{mnt} is already mounted (fs9 umount {args.mountpoint})")
    os.makedirs(mnt, exist_ok=True)
    os.makedirs(state, mode=0o700, exist_ok=True)  # the log holds everything: not for others
    os.makedirs(vault, exist_ok=True)
    _warn_unreachable(mnt, agents)
    if args.background:
        return background(args, mnt, state)
    if args.audit and not os.environ.get(EXEMPT_ENV) and exempt_from_audit():
        return serve_exempt(args)
    service.setup_logging(args.debug, args.log_file)
    notify_at = os.environ.pop("NOTIFY_SOCKET", None)  # systemd's (Type=notify); no agent's

    def ready(answer: str = "ok"):
        """Tell a waiting `--background` parent (or systemd) how the start went."""
        if answer == "ok":
            service.notify(notify_at, "READY=1")
        if args.ready_fd is not None:
            os.write(args.ready_fd, answer.replace("\n", " ").encode() + b"\n")
            os.close(args.ready_fd)
            args.ready_fd = None

    from .face.mount import serve
    try:
        import trio  # (the server only: a --background parent never loads it)
        trio.run(serve, mnt, state, agents, vault, ready, args.audit, args.durability,
                 metrics_at, args.share_vault, args.otlp or "", args.max_agents,
                 cluster_urls(args.cluster), args.node, args.full_replay,
                 args.snapshot_every, args.max_awake, args.sandbox_pool)
    except* StateError as group:  # (raised inside a nursery, it comes in a group)
        ready(f"refused {group.exceptions[0]}")
        raise group.exceptions[0] from None
    return 0


def cluster_urls(given: str) -> str:
    """--cluster's URLs: as given, or (@FILE) FILE's first line: a node's NATS user and
    password in them stay out of the command line, which any process may read. FILE is
    root's and no one else's to read, as ssh wants of a key."""
    if not given.startswith("@"):
        return given
    path = given[1:]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise UsageError(f"--cluster {given}: {e.strerror}")
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise UsageError(f"--cluster {given}: readable by others or not yours "
                             f"(chmod 600, chown it): it holds this node's NATS password")
        urls = f.readline().strip()
    if not urls:
        raise UsageError(f"--cluster {given}: no URLs in it")
    return urls


def _warn_unreachable(mnt: str, agents: str) -> None:
    """Confined agents run as other users: say at once, in one line, when they cannot
    walk to the mount point or the definitions (a clone in root's 0700 home); each spawn
    of a confined agent is then refused (EACCES) with the same words."""
    from .drivers import confinable as confine
    if confine.unavailable() is not None:
        return
    for label, path in (("the mount point", mnt), ("the agents' folder", agents)):
        blocked = confine.unreachable(path)
        if blocked:
            print(f"fs9: warning: confined agents cannot reach {label} {path}: {blocked} is "
                  f"closed to other users (chmod o+x {blocked}, or use another place)",
                  file=sys.stderr)


def federation_keys(folder: str, members: list[str]) -> int:
    from .errors import Fs9Error
    from .kernel.federation import credentials
    try:
        keys = credentials.write_keys(folder, members)
    except (Fs9Error, OSError) as e:
        print(f"fs9: {e}", file=sys.stderr)
        return 1
    for me, key in keys.items():
        print(f"{me} {key} {os.path.join(os.path.abspath(folder), me + '.nk')}")
    return 0


def check(state: str) -> int:
    """Print what is wrong with a state (exit 1), or a summary of a sound one (exit 0)."""
    from .kernel import state as states, event_retention
    problems, summary = event_retention.check_archive(state) if os.path.isfile(state) \
        else states.check(os.path.abspath(state))
    for line in problems:
        print(f"fs9 check: {line}", file=sys.stderr)
    if not problems:
        print(f"{state}: ok: {summary}")
    return 1 if problems else 0


def backup(state: str, dest: str) -> int:
    from .kernel import state as states
    events = states.backup(os.path.abspath(state), os.path.abspath(dest))
    print(f"fs9 backed up {state} to {dest}: {events} events (mount it with --state {dest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
