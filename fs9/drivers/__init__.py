"""Drivers: how an agent's work runs. Plan 9's devtab[]: the kernel names no driver;
it looks up the manifest's `driver` in one table, DRIVERS, and asks that entry:

    keys      the manifest keys it reads (beyond the kernel's own)
    check     manifest -> the keys it completes (cmd, its defaults); BadManifest(text)
    argv      checked manifest -> the program and its arguments
    environ   checked manifest -> variables added to the program's environment
    reads     checked manifest -> folders its sandbox must be able to read
    model     manifest -> the model its program talks to (models/NAME), or None
    run       `await run(job, task_status=...)`: runs a Job, returns its exit status

Every answer is plain data (dicts, lists, strings); only `run` blocks. The kernel
hands drivers data (manifests, a sandbox spec, a Job), never its own objects:
nothing in fs9/drivers imports fs9.kernel or fs9.face.

DRIVERS loads on first use: the sandboxes' fork server (`python -m fs9.drivers.forkserver`)
imports this package, and must not pay for exec.py's trio (~120 ms, 10 MB).
"""
import functools
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

DEFAULT = "exec"  # the driver of a manifest that names none


class BadManifest(ValueError):
    """A driver's manifest keys are malformed; the text says which and why."""


@dataclass
class Job:
    """One run of an agent's program, as the kernel hands it to a driver's `run`."""
    cmd: list[str]
    cwd: str
    env: dict[str, str]
    stdin: bytes | None  # None: /dev/null (daemons)
    priority: str
    emit: Callable[[int, bytes], None]  # (1 stdout | 2 stderr, bytes)
    sandbox: object = None  # a confine.Sandbox: start the program confined in it
    shutdown_s: float = 2.0  # when cancelled: SIGTERM, SIGKILL this much later (0: at once)


@dataclass(frozen=True)
class Driver:
    """One entry of DRIVERS (see the module doc for what each answers)."""
    keys: tuple[str, ...]
    check: Callable[[dict], dict[str, Any]]
    argv: Callable[[dict], list[str]]
    environ: Callable[[dict], dict[str, str]]
    reads: Callable[[dict], list[str]]
    model: Callable[[dict], str | None]
    run: Callable[..., Awaitable[int]]


def of(manifest: dict) -> Driver:
    """The driver a manifest names: a known one once the manifest is checked; the
    default when it names none."""
    return _table()[manifest.get("driver", DEFAULT)]


@functools.cache
def _table() -> dict[str, Driver]:
    from . import exec as exec_driver, llm
    return {"exec": exec_driver.DRIVER, "llm": llm.DRIVER}


def __getattr__(name: str):
    if name == "DRIVERS":  # loaded on first use (see the module doc)
        return _table()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
