"""The llm driver: fs9's own agent program (llm_agent.py, beside this file), run by
the exec driver like any program, its settings passed in its environment.

DRIVER is its entry in drivers.DRIVERS. Its manifest names no program (`cmd` is
fs9's) but a model and how to use it: KEYS.
"""
import functools
import json
import os
import re
import shutil
import sys
import tempfile

from . import BadManifest, Driver, confine, llm_agent
from .exec import run

KEYS = ("model", "instructions", "tools", "max_steps", "on_injection", "injection_patterns",
        "first_tool")
PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llm_agent.py")
# agents' programs cannot reach fs9's own interpreter (a venv, maybe under /root)
PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
               if os.access(p, os.X_OK)), sys.executable)
DEFAULT_MODEL = "scripted"
MAX_STEPS = 20  # model turns per task, unless the manifest says
INJECTION_PATTERNS = [  # likely attempts to turn data into instructions
    r"ignore (all |any )?(the )?(previous|prior|above|earlier) (instructions|prompts?)",
    r"disregard (your|the) (instructions|rules|system prompt)",
    r"you are now\b", r"new instructions:", r"system prompt", r"</?(system|assistant)>",
    r"do not tell (the )?(user|operator)"]


def check(m: dict) -> dict:
    """Check the settings the program reads; complete `cmd` (fs9's program, under the
    system's python3) and `model` (default scripted). BadManifest(text)."""
    if "cmd" in m:
        raise BadManifest("driver = \"llm\" runs fs9's own agent program: no cmd")
    for key in ("model", "instructions"):
        if not isinstance(m.get(key, ""), str):
            raise BadManifest(f"{key} must be a string")
    for key in ("tools", "injection_patterns"):
        if key in m and not (isinstance(m[key], list) and all(isinstance(v, str) for v in m[key])):
            raise BadManifest(f"{key} must be a list of strings")
    steps = m.get("max_steps", MAX_STEPS)  # (true is an int to Python, not to the program)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise BadManifest("max_steps must be a whole number >= 1")
    first = m.get("first_tool")
    if first is not None and (not isinstance(first, str) or
                              first not in (m["tools"] if "tools" in m else llm_agent.TOOLS)):
        raise BadManifest("first_tool must name one of the agent's tools")
    if m.get("on_injection", "flag") not in ("flag", "stop"):
        raise BadManifest("on_injection must be flag or stop")
    for p in m.get("injection_patterns", []):
        try:
            re.compile(p)
        except re.error as e:
            raise BadManifest(f"injection_patterns: {p!r}: {e}")
    return {"cmd": [PYTHON, PROGRAM], "model": m.get("model", DEFAULT_MODEL)}


@functools.cache
def program() -> str:
    """llm_agent.py where agents' uids can read it: in place, or (fs9 kept under a
    closed directory such as /root) a root-owned copy in a fresh temp dir, made once."""
    if not confine.unreachable(PROGRAM):
        return PROGRAM
    folder = tempfile.mkdtemp(prefix="fs9-programs-")
    os.chmod(folder, 0o755)
    copy = shutil.copy(PROGRAM, folder)
    os.chmod(copy, 0o644)
    return copy


def argv(m: dict) -> list[str]:
    """The python3 the manifest names (logged at spawn), running the readable program."""
    return [m["cmd"][0], program()]


def environ(m: dict) -> dict[str, str]:
    return {"FS9_MODEL": m["model"], "FS9_INSTRUCTIONS": m.get("instructions", ""),
            "FS9_CLEARANCE": m["clearance"],
            "FS9_MAX_STEPS": str(m.get("max_steps", MAX_STEPS)),
            "FS9_TOOLS": json.dumps(m.get("tools")),
            "FS9_FIRST_TOOL": m.get("first_tool", ""),
            "FS9_INJECTION_PATTERNS": json.dumps(m.get("injection_patterns",
                                                       INJECTION_PATTERNS))}


def model(m: dict) -> str | None:
    """The model the program talks to: it must exist, and the agent's view unveils it."""
    name = m.get("model", DEFAULT_MODEL)
    return name if isinstance(name, str) else None


DRIVER = Driver(keys=KEYS, check=check, argv=argv, environ=environ,
                reads=lambda m: [os.path.dirname(program())], model=model, run=run)
