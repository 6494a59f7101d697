"""The server process behind a mount: started detached (`fs9 mount --background`),
served from a child forked after the kernel audit's exemption, found by its mount
point and stopped (`fs9 umount`)."""
import os
import subprocess
import sys
import time

from .errors import StateError, UsageError


EXEMPT_ENV = "FS9_AUDIT_EXEMPT"  # this server was forked after the audit exemption


def exempt_from_audit() -> bool:
    """Ask the kernel's audit to give no audit context to the processes forked from now
    on, but agents' programs (fs9/drivers/auditrules.py): so the server, forked after this,
    does not pay for the audit rules on every syscall. Whether it is in place."""
    from .drivers import confinable as confine
    if confine.unavailable() is not None:
        return False
    from .drivers import auditrules
    return auditrules.exempt_others()


def serve_exempt(args) -> int:
    """Serve from a child forked after the exemption, in its own process group; pass
    on SIGINT and SIGTERM (once each), wait for it, exit as it did."""
    import signal
    proc = subprocess.Popen([sys.executable, "-m", "fs9"] + args.argv,
                            env={**os.environ, EXEMPT_ENV: "1"}, process_group=0,
                            pass_fds=() if args.ready_fd is None else (args.ready_fd,))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: proc.send_signal(signum))
    return proc.wait()


def background(args, mnt: str, state: str) -> int:
    """Start a foreground server detached; return once it reports the mount ready."""
    exempt = args.audit and exempt_from_audit()
    r, w = os.pipe()
    argv = [sys.executable, "-m", "fs9", "mount", mnt, "--vault", args.vault, "--state", state,
            "--agents", args.agents, "--durability", args.durability,
            "--max-agents", str(args.max_agents),
            "--ready-fd", str(w), "--log-file", os.path.join(state, "fs9.log")] \
        + (["--debug"] if args.debug else []) \
        + ([] if args.audit else ["--no-kernel-audit"]) \
        + (["--metrics", args.metrics] if args.metrics else []) \
        + (["--share-vault"] if args.share_vault else []) \
        + (["--full-replay"] if args.full_replay else []) \
        + ["--snapshot-every", str(args.snapshot_every), "--max-awake", str(args.max_awake),
           "--sandbox-pool", str(args.sandbox_pool)] \
        + (["--otlp", args.otlp] if args.otlp else []) \
        + (["--cluster", args.cluster, "--node", args.node] if args.cluster else [])
    logpath = os.path.join(state, "fs9.log")
    with open(logpath, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                pass_fds=(w,), start_new_session=True,
                                env={**os.environ, **({EXEMPT_ENV: "1"} if exempt else {})})
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        answer = pipe.readline().decode(errors="replace").rstrip("\n")
    if answer.startswith("refused "):  # it would not serve this state: its one line
        proc.wait()
        raise StateError(answer.removeprefix("refused "))
    if answer != "ok":
        proc.wait()
        with open(logpath, errors="replace") as f:
            tail = f.read()[-2000:]
        raise UsageError(f"the server did not start (exit {proc.returncode}); its log {logpath}:\n{tail}")
    print(f"fs9 mounted at {mnt} (pid {proc.pid}, log {logpath})")
    return 0


def is_mounted(mnt: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mnt for line in f)


def clear_stale(mnt: str) -> None:
    """A server killed with -9 leaves a dead mount (ENOTCONN): detach it."""
    try:
        os.stat(mnt)
    except OSError as e:
        if e.errno == 107:  # ENOTCONN
            subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)


def server_pid(mnt: str) -> int | None:
    try:
        with open(os.path.join(mnt, "ctl")) as f:
            fields = dict(w.split("=", 1) for w in f.read().split() if "=" in w)
        return int(fields["pid"])
    except (OSError, KeyError, ValueError):
        return None


def _running(pid: int) -> bool:
    """True while pid exists and is not a zombie waiting for its reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def umount(mountpoint: str) -> int:
    mnt = os.path.abspath(mountpoint)
    if not is_mounted(mnt):
        raise UsageError(f"{mnt} is not mounted")
    pid = server_pid(mnt)
    if pid is not None:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pid = None
    deadline = time.monotonic() + 15
    while pid is not None and is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.02)
    if is_mounted(mnt):  # no server answering: detach whatever is left
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
    while pid is not None and time.monotonic() < deadline and _running(pid):
        time.sleep(0.02)  # let the server finish writing its log
    if is_mounted(mnt):
        raise UsageError(f"could not unmount {mnt}")
    print(f"fs9 unmounted {mnt}")
    return 0
