"""The checks a spawn passes before anything changes: the name, the definition and
its manifest, the program, the model, vault ownership and confinement.

`prepare` changes nothing: `ctl` checks every line of a write with it before any
line is applied (lib9p's rule: a whole write or nothing).
"""
import errno
import os
import shutil

from ... import drivers
from ...drivers import confine
from ...errors import Fs9Error
from ..names import NAME_RE, OPERATOR
from .. import labels
from . import manifest as manifests, view as views
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel import Kernel

# registry/ has files of these names; federation@OS is another OS's federation itself
RESERVED_NAMES = (OPERATOR, "by-capability", "owners", "cards", "federation")
# what an agent with the spawn pledge may set: never what decides access
AGENT_SPAWN_KEYS = {"def", "priority", "timeout_s", "max_restarts", "within_s", "restart"}


def prepare(kernel: "Kernel", name: str, *overrides: str,
            by: str | None = None) -> tuple[dict, str]:
    """Check a spawn fully: (its effective manifest, its home folder); Fs9Error if it
    cannot start. Changes nothing. `by`: the agent asking (None: the operator); the
    reasons name only agents it knows of."""
    if not NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise Fs9Error(errno.EINVAL, f"bad agent name {name!r}: letters, digits, _ . -"
                                     f" (and not {', '.join(RESERVED_NAMES)})")
    kv = dict(manifests.parse_override(w) for w in overrides)
    definition = kv.pop("def", None)
    if definition is not None and not (isinstance(definition, str)
                                       and NAME_RE.fullmatch(definition)):
        raise Fs9Error(errno.EINVAL, f"bad definition name def={definition!r}")
    try:
        raw, home = manifests.load_definition(kernel.agents_dir, definition or name)
        origin = os.path.join(home, "agent.toml")
    except Fs9Error as e:
        # No definition: an ad hoc agent whose words say everything (cmd=...).
        if e.errno != errno.ENOENT or definition or "cmd" not in kv:
            raise
        raw, home, origin = {}, os.path.join(kernel.state_dir, "work", name), f"spawn {name}"
    manifest = manifests.check({**raw, **kv}, origin)
    supervises = manifest["mode"] == "supervisor"  # runs no program: nothing to confine
    if not supervises:
        check_program(name, manifest, home)
    models, model = kernel.models, drivers.of(manifest).model(manifest)
    if model is not None and models.model(model) is None:
        raise Fs9Error(errno.ENOENT, f"agent {name}: no model {model!r} "
                                     f"(models/; configured in {models.config_path}"
                                     + (f": {models.problem}" if models.problem else "") + ")")
    view = views.parse(name, manifest)
    for claim in view.owns:
        for other in kernel.agents.values():
            for owned in other.view.owns if other.name != name else ():
                if claim[:len(owned)] == owned or owned[:len(claim)] == claim:
                    raise Fs9Error(errno.EBUSY, f"{'/'.join(claim)} overlaps "
                                   f"{'/'.join(owned)}, owned by "
                                   f"{labels.named(kernel, by, other.name)}: a vault "
                                   "subtree has exactly one owner")
    labels.check_claim(kernel, name, view.owns, manifest["clearance"], by)
    labels.check_unveils(kernel, name, view, manifest["clearance"], by)
    why = not manifest["unconfined"] and not supervises and (
        confine.unavailable() or (not kernel.mount_path and "no mount to show a view in"))
    if why:
        raise Fs9Error(errno.EPERM, f"agent {name} cannot be confined here: {why}; "
                                    "set unconfined = true to run it without confinement")
    return manifest, home


def check_words_of_agent(by, args: tuple[str, ...]) -> None:
    """An agent (pledge spawn) starts agents the operator defined, and only the
    definitions its manifest lists (`spawns`), never wider ones: it may not set what
    decides access (nor, checked after, start an unconfined one)."""
    keys = {word.partition("=")[0] for word in args[1:]} - AGENT_SPAWN_KEYS
    if keys:
        raise Fs9Error(errno.EPERM, f"agent {by.name} may not set {', '.join(sorted(keys))} "
                                    f"in a spawn (only {', '.join(sorted(AGENT_SPAWN_KEYS))}): "
                                    "definitions decide what an agent may do")
    definition = dict(manifests.parse_override(w) for w in args[1:]).get("def", args[0])
    if definition not in by.manifest.get("spawns", []):
        raise Fs9Error(errno.EPERM, f"agent {by.name} may not start definition "
                                    f"{definition!r}: its manifest's spawns lists "
                                    f"{by.manifest.get('spawns', [])}")


def check_program(name: str, manifest: dict, home: str) -> None:
    """Refuse a spawn whose program cannot be found or run."""
    prog = manifest["cmd"][0]
    path = os.path.join(home, prog) if "/" in prog else shutil.which(
        prog, path=manifest["env"].get("PATH", os.environ.get("PATH")))
    if not path or not os.path.isfile(path):
        raise Fs9Error(errno.ENOENT, f"agent {name}: program {prog!r} not found")
    if not os.access(path, os.X_OK):
        raise Fs9Error(errno.EACCES, f"agent {name}: program {prog!r} is not executable")
