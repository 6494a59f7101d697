"""Resource limits of a confined agent (manifest `[limits]`), with defaults, so that
an agent that declares nothing is still bounded:

    [limits]
    memory_mb = 1024     # its programs together (cgroup memory; the OOM killer past it)
    processes = 256      # processes and threads at once (cgroup pids; fork fails past it)
    output_mb = 64       # one task's out and err together (the task ends past it)
    scratch_mb = 256     # its scratch folder, a tmpfs in its sandbox (ENOSPC past it)

A task's run time is `timeout_s` (default 3600; 0: none). Its CPU share follows its
`priority` (cgroup CPU weight, besides nice): interactive 800, normal 100,
background 10. Crossing a limit ends the task (or the daemon's run) with the reason in
its status and the agent's, and a `limit_exceeded` event naming the limit and value;
the supervisor's restart policy then applies. Pure data and checks.
"""
import errno

from ...errors import Fs9Error

# fs9-wide: on-demand agents awake at once (agents/ondemand.py says why; here, with no
# event loop imported, for `fs9 mount`'s options)
MAX_AWAKE = 256
POOL_MAX = 16  # confined sandboxes made ahead (`fs9 mount --sandbox-pool`, agents/pool.py)
DEFAULTS = {"memory_mb": 1024, "processes": 256, "output_mb": 64, "scratch_mb": 256}
MINIMUM = {"memory_mb": 16, "processes": 8, "output_mb": 1, "scratch_mb": 1}
# what the kernel's controls take (a larger value fails every start with ERANGE):
# memory.max and a tmpfs size in bytes, pids.max up to PID_MAX_LIMIT (4 Mi)
MAXIMUM = {"memory_mb": 1 << 40, "processes": 1 << 22, "output_mb": 1 << 40,
           "scratch_mb": 1 << 40}
CPU_WEIGHT = {"interactive": 800, "normal": 100, "background": 10}


def of(manifest: dict) -> dict:
    """The manifest's [limits] with defaults; Fs9Error(EINVAL) if malformed."""
    table = manifest.get("limits", {})
    if not isinstance(table, dict) or set(table) - set(DEFAULTS):
        raise Fs9Error(errno.EINVAL, f"limits: a table of {', '.join(DEFAULTS)}")
    for key, value in table.items():
        if not isinstance(value, int) or isinstance(value, bool) or \
                not MINIMUM[key] <= value <= MAXIMUM[key]:
            raise Fs9Error(errno.EINVAL, f"limits: {key} must be a whole number from "
                                         f"{MINIMUM[key]} to {MAXIMUM[key]}")
    return {**DEFAULTS, **table}


def reason(limit: str, value) -> str:
    """What a person reads in a status when a limit ended a task."""
    return {"memory_mb": f"limit exceeded: memory {value} MiB (killed by the OOM killer)",
            "processes": f"limit exceeded: processes {value} (fork refused)",
            "output_mb": f"limit exceeded: output {value} MiB (out and err)",
            "timeout_s": f"limit exceeded: run time {value} s"}[limit]
