"""Agent manifests: `agents/NAME/agent.toml`, parsed with tomllib and checked.

A manifest is plain data. `load_definition` reads one from disk, `parse_override`
reads one KEY=VALUE word of `spawn NAME KEY=VALUE...` (agents/spawn.py folds them
in), and `check` turns anything malformed into Fs9Error(EINVAL) naming the file and
the field (a driver's own keys: its entry in drivers.DRIVERS checks them); `render`
shows the effective manifest (the `manifest` file).
"""
import errno
import math
import os
import tomllib
from typing import Any

import tomli_w

from ... import drivers
from ...errors import Fs9Error
from . import view as views
from ..models.budget import Limits
from . import breaker as breakers, limits
from .memory import policy as memory_policy
from ..names import NAME_RE, remote_topic
from .. import approvals, supervisor

MODES = ("task", "daemon", "supervisor")
RESTARTS = ("permanent", "transient", "temporary")
PRIORITIES = ("interactive", "normal", "background")
from ..bus.message import CLASSIFICATIONS  # noqa: E402 (one list, the bus's)

DEFAULTS: dict[str, Any] = {
    "driver": drivers.DEFAULT,
    "mode": "task",
    "restart": "transient",
    "max_restarts": 3,
    "within_s": 60,
    "priority": "normal",
    "timeout_s": 3600,  # a task's run time (0: no limit); agents/limits.py has the rest
    "env": {},
    "unconfined": False,  # true: run without a private namespace (an explicit, logged choice)
    "clearance": "internal",  # the highest classification it may receive (bus/message.py)
    # "on-demand": no process until work comes (a task; a daemon: mail), asleep again
    # after idle_s without work (agent.py); "always": a daemon runs from its spawn on
    "start": "always",
    "idle_s": 300,
}
STARTS = ("always", "on-demand")

# Keys later layers read (views, bus, registry); accepted and kept as data now.
FUTURE_KEYS = ("provides", "accepts", "description", "sla", "subscribe")
# Bounds every value keeps, whoever reads it: a manifest goes into the JSON log and
# into exec(2), which takes 128 KiB per string and about 2 MiB of arguments and
# environment together (E2BIG: every task would fail).
MAX_TEXT = 64 << 10  # bytes of one string
MAX_ITEMS = 1024  # entries of one array or table
MAX_EXEC = 1 << 20  # bytes of cmd and env together
INT64 = 1 << 63  # TOML's integers (tomllib reads longer ones; JSON readers may not)
LINES = ("description", "sla")  # shown as KEY=VALUE lines in registry/: one line each
# the definitions an agent with the spawn pledge may start (none unless listed)
SPAWN_KEYS = ("spawns", "max_instances")  # (max_instances: live agents of this definition)
SUPERVISOR_KEYS = ("strategy", "children")  # mode = "supervisor" (kernel/supervisor.py)
# each driver's own keys (the exec driver's cmd, the llm driver's model...) come last
KNOWN_KEYS = tuple(DEFAULTS) + ("pledge", "unveil", "owns", "budget", "memory", "net",
                                 "limits", "approval", "breaker", "nodes") \
    + FUTURE_KEYS + SPAWN_KEYS + SUPERVISOR_KEYS + tuple(k for d in drivers.DRIVERS.values() for k in d.keys)


def load_definition(agents_dir: str, name: str) -> tuple[dict, str]:
    """Read agents_dir/NAME/agent.toml; return (raw manifest, its directory)."""
    folder = os.path.join(agents_dir, name)
    path = os.path.join(folder, "agent.toml")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise Fs9Error(errno.ENOENT, f"no agent definition {name!r} (looked for {path})")
    except (ValueError, RecursionError) as e:  # (TOMLDecodeError and UnicodeDecodeError
        # are ValueErrors; so is an integer of more than 4300 digits)
        raise Fs9Error(errno.EINVAL, f"malformed manifest {path}: {e}")
    except OSError as e:
        raise Fs9Error(e.errno or errno.EIO, f"cannot read {path}: {e.strerror}")
    return raw, folder


def parse_override(word: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (key, value); VALUE is read as a TOML value when it is one."""
    key, sep, value = word.partition("=")
    if not sep or not key:
        raise Fs9Error(errno.EINVAL, f"expected KEY=VALUE, got {word!r}")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value
    except (ValueError, RecursionError) as e:  # TOML, but beyond what Python reads back
        raise Fs9Error(errno.EINVAL, f"{key}: {e}")


def check(raw: dict, origin: str) -> dict:
    """Return the effective manifest (defaults filled in) or raise Fs9Error(EINVAL)."""
    def bad(text: str) -> Fs9Error:
        return Fs9Error(errno.EINVAL, f"malformed manifest {origin}: {text}")

    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(KNOWN_KEYS)})")
    for key, value in raw.items():
        problem = _not_plain(value)
        if problem:
            raise bad(f"{key}: {problem}")
    m = {**DEFAULTS, **raw}
    for key, allowed in (("driver", tuple(drivers.DRIVERS)), ("mode", MODES),
                         ("restart", RESTARTS), ("priority", PRIORITIES),
                         ("start", STARTS)):
        if m[key] not in allowed:
            raise bad(f"{key} = {m[key]!r}; expected one of {', '.join(allowed)}")
    if m["clearance"] not in CLASSIFICATIONS:
        raise bad(f"clearance = {m['clearance']!r}; expected one of {', '.join(CLASSIFICATIONS)}")
    problem = _supervisor_problem(m)
    if problem:
        raise bad(problem)
    try:  # the driver's own keys; it completes cmd (a list of strings from here on)
        m.update(drivers.of(m).check(m) if m["mode"] != "supervisor" else {"cmd": []})
    except drivers.BadManifest as e:
        raise bad(str(e))
    for key in ("max_restarts", "within_s", "timeout_s", "idle_s"):
        if not isinstance(m[key], (int, float)) or isinstance(m[key], bool) or m[key] < 0:
            raise bad(f"{key} must be a number >= 0, got {m[key]!r}")
    if not 0 < m["idle_s"] <= INT64:
        raise bad(f"idle_s must be a number > 0, got {m['idle_s']!r}")
    if m["start"] == "on-demand" and m["mode"] == "supervisor":
        raise bad('a supervisor runs no program: start = "on-demand" is for tasks and daemons')
    if "max_instances" in m and not (isinstance(m["max_instances"], int) and not isinstance(
            m["max_instances"], bool) and m["max_instances"] >= 1):
        raise bad(f"max_instances must be an integer >= 1, got {m['max_instances']!r}")
    if m["within_s"] == 0:  # a zero window would count no restarts: no limit at all
        raise bad("within_s must be > 0")
    if not isinstance(m["env"], dict) or not all(isinstance(v, str) for v in m["env"].values()):
        raise bad("env must be a table of strings")
    if any(not k or "=" in k for k in m["env"]):
        raise bad("env names must be non-empty and contain no '='")
    if not isinstance(m["unconfined"], bool):
        raise bad(f"unconfined must be true or false, got {m['unconfined']!r}")
    for key in ("provides", "accepts", "spawns", "subscribe"):
        if key in m and not (isinstance(m[key], list) and all(isinstance(v, str) for v in m[key])):
            raise bad(f"{key} must be a list of strings")
        bad_names = [v for v in m.get(key, []) if key != "subscribe" and (
            not v or "/" in v or v in (".", "..") or len(v.encode()) > 255
            or not v.isprintable())]
        if bad_names:
            raise bad(f"{key}: {bad_names[0]!r} cannot be a file name (registry/by-capability)")
    if "nodes" in m and not (isinstance(m["nodes"], list) and m["nodes"] and all(
            isinstance(v, str) and NAME_RE.fullmatch(v) and "." not in v for v in m["nodes"])):
        raise bad("nodes must be a list of node names (letters, digits, _ -): where it may "
                  "run in a cluster")
    topics = [t for t in m.get("subscribe", []) if not NAME_RE.fullmatch(t)
              and not remote_topic(t)]
    if topics:
        raise bad(f"subscribe: {topics[0]!r} is not a topic name (letters, digits, _ . -; "
                  "TOPIC@OS for a peer's)")
    for key in LINES:
        if key in m and not (isinstance(m[key], str) and m[key].isprintable()):
            raise bad(f"{key} must be one line of text")
    if sum(len(w.encode()) + 1 for w in m["cmd"]) + sum(
            len(k.encode()) + len(v.encode()) + 2 for k, v in m["env"].items()) > MAX_EXEC:
        raise bad(f"cmd and env together are over {MAX_EXEC} bytes (exec(2) would refuse them)")
    problem = _net_problem(m)
    if problem:
        raise bad(problem)
    try:
        views.parse("", m)
        if not isinstance(m.get("budget", {}), dict):
            raise Fs9Error(errno.EINVAL, "budget must be a table")
        Limits.of(m.get("budget", {}), "budget")
        approvals.policy(m)
        breakers.settings(m)
        memory_policy(m)
        limits.of(m)
    except Fs9Error as e:
        raise bad(e.text)
    m.setdefault("pledge", list(views.DEFAULT_PLEDGE))  # shown in full in `manifest`
    m.setdefault("unveil", {})
    m.setdefault("owns", [])
    return m


def _supervisor_problem(m: dict) -> str:
    """What is wrong with a supervisor's keys (it runs no program: it supervises its
    children), "" if nothing; fills in its default strategy."""
    if m["mode"] != "supervisor":
        given = [k for k in SUPERVISOR_KEYS if k in m]
        return f"{', '.join(given)}: a supervisor's keys (mode = \"supervisor\")" if given else ""
    if "cmd" in m or m["driver"] != drivers.DEFAULT:
        return "a supervisor runs no program (no cmd, no driver)"
    m.setdefault("strategy", "one_for_one")
    if m["strategy"] not in supervisor.STRATEGIES:
        return f"strategy = {m['strategy']!r}; expected one of {', '.join(supervisor.STRATEGIES)}"
    try:
        supervisor.children(m.setdefault("children", []))
    except ValueError as e:
        return str(e)
    return ""


def _net_problem(m: dict) -> str:
    """What is wrong with [net] (connect, bind: lists of TCP ports), "" if nothing."""
    net = m.get("net", {})
    if not isinstance(net, dict) or set(net) - {"connect", "bind"}:
        return "[net] is a table of connect and bind (lists of TCP ports)"
    for key, ports in net.items():
        if not isinstance(ports, list) or not all(
                isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports):
            return f"[net] {key} must be a list of TCP ports (1-65535)"
    if net and "inet" not in m.get("pledge", []):
        return "[net] narrows the inet pledge: pledge inet too"
    return ""


def reach(m: dict) -> str:
    """An agent's network reach in words: none | any | tcp connect P,Q ..."""
    if m.get("unconfined"):
        return "unconfined"
    if "inet" not in m.get("pledge", []):
        return "none"
    net = m.get("net", {})
    parts = [f"tcp {key} {','.join(map(str, ports)) or 'none'}" for key, ports in net.items()]
    return "; ".join(parts) or "any"


def _not_plain(value: Any, depth: int = 0) -> str:
    """Why value cannot live in a manifest (it must round-trip through the JSON log
    and the exec(2) call), or "" if it can."""
    if depth > 16:
        return "nested too deeply"
    if isinstance(value, str):
        if "\0" in value:
            return "contains a NUL byte"
        return f"a string over {MAX_TEXT} bytes" if len(value.encode()) > MAX_TEXT else ""
    if isinstance(value, bool):
        return ""
    if isinstance(value, int):
        return "" if -INT64 <= value < INT64 else f"{value} does not fit in 64 bits"
    if isinstance(value, float):
        return "" if math.isfinite(value) else f"{value} is not a finite number"
    if isinstance(value, (list, dict)) and len(value) > MAX_ITEMS:
        return f"over {MAX_ITEMS} entries"
    if isinstance(value, list):
        return next((p for v in value if (p := _not_plain(v, depth + 1))), "")
    if isinstance(value, dict):
        return next((p for k, v in value.items()
                     if (p := _not_plain(k, depth + 1) or _not_plain(v, depth + 1))), "")
    return f"{type(value).__name__} values are not allowed (strings, numbers, arrays, tables)"


def text(manifest: dict) -> str:
    """agents/NAME/manifest: the manifest as TOML, then where its network reaches."""
    return render(manifest) + f"# network reach: {reach(manifest)}\n"


def render(manifest: dict) -> str:
    """The effective manifest as TOML (the `manifest` file), one key a line so that grep
    finds a setting; tomllib reads it back to the same values."""
    lines = []
    tables = {k: v for k, v in manifest.items() if isinstance(v, dict)}
    for key, value in manifest.items():
        if key not in tables:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, table in tables.items():
        lines.append(f"\n[{_toml_key(key)}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    """One value on one line: scalars as tomli-w writes them, so any
    character a string may hold is escaped as TOML wants; arrays and tables inline
    (tomli-w would spread an array over lines)."""
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # (a supervisor's children)
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return tomli_w.dumps({"v": v}).removeprefix("v = ").removesuffix("\n")


def _toml_key(key: str) -> str:
    """A key as tomli-w writes it: bare if it can be, else a quoted string."""
    return tomli_w.dumps({key: 0}).removesuffix(" = 0\n")
