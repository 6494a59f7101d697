"""The seams between layers: imports point down only (face -> kernel -> drivers), and
the driver table answers the kernel in plain data."""
import ast
import importlib.util
import json
from pathlib import Path

import pytest

import fs9
from fs9 import drivers
from fs9.kernel.agents import manifest as manifests

ROOT = Path(fs9.__file__).parent


def imported(path: Path) -> set[str]:
    """Every module path names in an import, relative ones resolved against its
    package; `from X import a` also counts X.a (a may be a module)."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    package = ".".join(parts if path.name == "__init__.py" else parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def reaching(layer: str, banned: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT.parent)} imports {name}"
            for path in sorted((ROOT / layer).rglob("*.py")) for name in sorted(imported(path))
            if any(name == b or name.startswith(b + ".") for b in banned)]


def test_imports_point_down_only():
    assert "fs9.drivers.confine" in imported(ROOT / "kernel" / "kernel.py")  # `from ..drivers`
    assert "fs9.errors" in imported(ROOT / "kernel" / "agents" / "agent.py")  # `from ...errors`
    assert reaching("drivers", ("fs9.kernel", "fs9.face")) == []
    assert reaching("kernel", ("fs9.face",)) == []


def plain(value) -> bool:
    return json.loads(json.dumps(value)) == value


@pytest.mark.parametrize("raw", [
    {"cmd": "python3 main.py --x 'a b'", "env": {"K": "v"}},
    {"driver": "llm", "model": "m", "tools": ["read", "send"], "clearance": "public"},
])
def test_each_driver_answers_in_plain_data(raw):
    assert set(drivers.DRIVERS) == {"exec", "llm"}
    m = manifests.check(raw, "t")
    driver = drivers.of(m)
    assert driver is drivers.DRIVERS[m["driver"]] and set(driver.keys) <= set(manifests.KNOWN_KEYS)
    argv, env, reads = driver.argv(m), driver.environ(m), driver.reads(m)
    assert plain(argv) and plain(env) and plain(reads)
    assert argv and all(isinstance(w, str) for w in argv)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert all(isinstance(p, str) and p.startswith("/") for p in reads)
    if m["driver"] == "exec":
        assert argv == ["python3", "main.py", "--x", "a b"] and env == {} and reads == []
        assert driver.model(m) is None
    else:  # fs9's program, readable by agents; its settings in the environment
        assert argv[0] == m["cmd"][0] and Path(argv[1]).name == "llm_agent.py"
        assert reads == [str(Path(argv[1]).parent)]
        assert env["FS9_MODEL"] == driver.model(m) == "m" and env["FS9_CLEARANCE"] == "public"
        assert json.loads(env["FS9_TOOLS"]) == ["read", "send"]


def test_a_mount_loads_only_what_it_uses():
    """`fs9 mount --background`'s parent (and `fs9 umount`) load no event loop, face or
    kernel; the server loads nats-py only when it joins a federation or a cluster
    (docs/benchmarks.md: a second's start-up each, on a loaded machine)."""
    import subprocess
    import sys
    probe = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
             "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")

    def loaded(module):
        return subprocess.run([sys.executable, "-c", probe, module], capture_output=True,
                              text=True, check=True).stdout.split()
    parent = loaded("fs9.cli")
    assert not {"trio", "pyfuse3", "nats", "aiohttp"} & set(parent), parent
    server = loaded("fs9.face.mount")
    assert "trio" in server and "pyfuse3" in server  # (the probe sees what it should)
    assert not {"nats", "aiohttp"} & set(server), server
