"""The checks a spawn passes before anything changes: the name, the definition and
its manifest, the program, the model, vault ownership and confinement.

`prepare` changes nothing: `ctl` checks every line of a write with it before any
line is applied (lib9p's rule: a whole write or nothing).
"""
import errno
import os
import shutil

from ... import drivers
from ...drivers import confine, uidslots
from ...errors import Fs9Error
from ..names import NAME_RE, OPERATOR
from .. import labels
from . import manifest as manifests, view as views
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel import Kernel

# registry/ has files of these names; federation@OS is another OS's federation itself
RESERVED_NAMES = (OPERATOR, "by-capability", "owners", "cards", "federation")
# How many agents there may be (a spawn loop, an agent's or a script's, meets these
# before the machine's limits). MAX_AGENTS: one uid each, from this fs9's range (the
# default of `fs9 mount --max-agents`). Agents' spawns stop OPERATOR_ROOM short of the
# whole, so the operator can always start more.
MAX_AGENTS = uidslots.SLOT_SIZE
INT_MAX = 1 << 63
OPERATOR_ROOM = 100  # (at most a tenth of --max-agents)
SPAWNED_PER_AGENT = 100  # live agents one agent has started
PER_DEFINITION = 1000  # live agents of one definition, when agents spawn it (for the
# operator: the definition's own `max_instances`, if it says)
# what an agent with the spawn pledge may set: never what decides access
AGENT_SPAWN_KEYS = {"def", "priority", "timeout_s", "max_restarts", "within_s", "restart"}
# ...and only to narrow the definition (check_narrower): the higher, the wider
PRIORITY_RANK = {p: -i for i, p in enumerate(manifests.PRIORITIES)}  # interactive highest
RESTART_RANK = {r: -i for i, r in enumerate(manifests.RESTARTS)}  # permanent restarts most


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
        if e.errno != errno.ENOENT:
            raise
        if definition or "cmd" not in kv:  # a bad word in the command, not a missing file:
            raise Fs9Error(errno.EINVAL, e.text) from None  # ENOENT reads "no such file"
        raw, home, origin = {}, os.path.join(kernel.state_dir, "work", name), f"spawn {name}"
    manifest = manifests.check({**raw, **kv}, origin)
    if by is not None and kv:
        check_narrower(by, definition or name, manifests.check(dict(raw), origin), manifest)
    supervises = manifest["mode"] == "supervisor"  # runs no program: nothing to confine
    if not supervises:
        check_program(name, manifest, home)
    models, model = kernel.models, drivers.of(manifest).model(manifest)
    if model is not None and models.model(model) is None:
        raise Fs9Error(errno.ENOENT, f"agent {name}: no model {model!r} "
                                     f"(models/; configured in {models.config_path}"
                                     + (f": {models.problem}" if models.problem else "") + ")")
    view = views.parse(name, manifest)
    for claim in view.owns:  # (a walk of the owned subtrees, not of every agent)
        for owned, other in kernel.owners.items():
            if other != name and (claim[:len(owned)] == owned or owned[:len(claim)] == claim):
                raise Fs9Error(errno.EBUSY, f"{'/'.join(claim)} overlaps "
                               f"{'/'.join(owned)}, owned by "
                               f"{labels.named(kernel, by, other)}: a vault "
                               "subtree has exactly one owner")
    labels.check_claim(kernel, name, view.owns, manifest["clearance"], by)
    labels.check_unveils(kernel, name, view, manifest["clearance"], by)
    why = not manifest["unconfined"] and not supervises and (
        confine.unavailable() or (not kernel.mount_path and "no mount to show a view in"))
    if why:
        raise Fs9Error(errno.EPERM, f"agent {name} cannot be confined here: {why}; "
                                    "set unconfined = true to run it without confinement")
    if not manifest["unconfined"] and not supervises:
        check_reachable(kernel, name, home)
    return manifest, home


def check_room(kernel: "Kernel", spawns: list[tuple[str, dict]], by: str | None) -> None:
    """A write to ctl spawning agents [(home, manifest)] (home: their definition's
    folder), by `by` (None: the operator): EAGAIN when fs9 is full (for agents: its
    room short of that), EDQUOT when the spawning agent or a definition has its share."""
    homes = [home for home, _ in spawns]
    limit = kernel.max_agents - (0 if by is None else
                                 min(OPERATOR_ROOM, kernel.max_agents // 10))
    if len(kernel.agents) + len(homes) > limit:
        raise Fs9Error(errno.EAGAIN, f"fs9 holds {len(kernel.agents)} agents: {limit} at "
                                     "the most; kill some first" if by is None else
                                     "fs9 holds as many agents as agents may start "
                                     "(the rest is the operator's)")
    if by is not None:
        mine = kernel.spawned_by[by] + len(homes)
        if mine > SPAWNED_PER_AGENT:
            raise Fs9Error(errno.EDQUOT, f"agent {by} has started {mine - len(homes)} live "
                                         f"agents: {SPAWNED_PER_AGENT} at the most")
    for home, manifest in dict(spawns).items():
        most = manifest.get("max_instances", INT_MAX if by is None else PER_DEFINITION)
        most = most if by is None else min(most, PER_DEFINITION)
        same = kernel.of_home[home] + homes.count(home)
        if same > most:  # (to an agent, no count: it would tell of agents hidden from it)
            raise Fs9Error(errno.EDQUOT, f"definition {os.path.basename(home)} has "
                                         f"{same - homes.count(home)} live agents: {most} at "
                                         "the most" if by is None else
                                         f"definition {os.path.basename(home)} has as many "
                                         f"live agents as agents may start ({most})")


def check_reachable(kernel: "Kernel", name: str, home: str) -> None:
    """A confined program runs as its own uid, another user: refuse the spawn (EACCES)
    if that uid cannot walk to the mount point or the agent's folder, naming the folder
    to open, instead of a task that fails with no output (a root `git clone` lands in
    /root, which is 0700). Ad hoc agents start in their scratch folder, fs9's own."""
    inside_state = os.path.commonpath([home, kernel.state_dir]) == kernel.state_dir
    for path in (kernel.mount_path, *(() if inside_state else (home,))):
        blocked = confine.unreachable(path)
        if blocked:
            raise Fs9Error(errno.EACCES, f"agent {name}: its uid cannot reach {path}: "
                                         f"{blocked} is closed to other users (chmod o+x "
                                         f"{blocked}, or keep the mount point and agents "
                                         "elsewhere)")


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


def check_narrower(by: str, definition: str, defined: dict, asked: dict) -> None:
    """An agent's spawn words (AGENT_SPAWN_KEYS) may narrow what the operator defined,
    never widen it (EPERM): no priority above the definition's, a time limit where it
    has one (timeout_s 0 is none), restarts neither more (max_restarts) nor sooner
    (within_s), nor for more kinds of end (restart). Else an agent made a child
    interactive, unlimited in time, or a daemon restarting for ever (a sandbox each)."""
    wider = []
    if PRIORITY_RANK[asked["priority"]] > PRIORITY_RANK[defined["priority"]]:
        wider.append(f"priority={asked['priority']} (defined {defined['priority']})")
    if defined["timeout_s"] and not 0 < asked["timeout_s"] <= defined["timeout_s"]:
        wider.append(f"timeout_s={asked['timeout_s']} (defined {defined['timeout_s']})")
    if asked["max_restarts"] > defined["max_restarts"]:
        wider.append(f"max_restarts={asked['max_restarts']} (defined {defined['max_restarts']})")
    if asked["within_s"] < defined["within_s"]:
        wider.append(f"within_s={asked['within_s']} (defined {defined['within_s']})")
    if RESTART_RANK[asked["restart"]] > RESTART_RANK[defined["restart"]]:
        wider.append(f"restart={asked['restart']} (defined {defined['restart']})")
    if wider:
        raise Fs9Error(errno.EPERM, f"agent {by} may not widen definition {definition}: "
                                    f"{', '.join(wider)}; only narrow it")


def check_program(name: str, manifest: dict, home: str) -> None:
    """Refuse a spawn whose program cannot be found or run."""
    prog = manifest["cmd"][0]
    path = os.path.join(home, prog) if "/" in prog else shutil.which(
        prog, path=manifest["env"].get("PATH", os.environ.get("PATH")))
    if not path or not os.path.isfile(path):
        raise Fs9Error(errno.ENOENT, f"agent {name}: program {prog!r} not found")
    if not os.access(path, os.X_OK):
        raise Fs9Error(errno.EACCES, f"agent {name}: program {prog!r} is not executable")
