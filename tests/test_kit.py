"""The operator's kit and the libraries behind it (issue 18, items 2 and 3): token counts
from tiktoken, the manifest written with tomli-w, --version, the configuration file,
systemd's readiness protocol and a stop by SIGTERM, the unit file, fs9.log's rotation."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tomllib

import pytest

import fs9
from conftest import REPO, WAIT_S, fs9 as run_fs9, fuse_unavailable, mounted, wait_for
from fs9 import service
from fs9.kernel import state
from fs9.kernel.agents import manifest as manifests
from fs9.kernel.models import tokens

needs_fuse = pytest.mark.skipif(bool(fuse_unavailable()), reason=f"cannot mount FUSE: {fuse_unavailable()}")


# --- token counts ------------------------------------------------------------------

def test_token_counts_are_tiktokens_cl100k_base_offline():
    if tokens.tokenizer() != "tiktoken cl100k_base":
        pytest.skip(f"no offline cl100k_base here: {tokens.tokenizer()}")
    import tiktoken
    assert tokens.count("hello world") == 2  # [15339, 1917], tiktoken's own test
    assert tokens.count("hello <|endoftext|>") > 3  # an agent's marker is plain text
    tool_result = json.dumps([{"id": f"{i:016x}", "ok": True, "n": i} for i in range(20)])
    chinese = "知识库中的每一个文件都是智能体可以读取的记录" * 4
    for text, undercount in ((tool_result, 1.5), (chinese, 3.0)):
        assert tokens.count(text) >= undercount * (len(text) // 4 + 1), text  # vs 4 chars/token
    long = "the quick brown fox " * 10_000  # past EXACT_CHARS: scaled, within a few percent
    exact = len(tiktoken.get_encoding("cl100k_base").encode(long))
    assert abs(tokens.count(long) - exact) <= exact * 0.05
    assert "TIKTOKEN_CACHE_DIR" not in os.environ  # set only while loading


# --- the manifest -------------------------------------------------------------------

def test_the_manifest_with_control_characters_is_valid_toml():
    m = {"cmd": ["sh", "-c", "printf '\x1b[1m\x01\x7f'"], "priority": "normal", "timeout_s": 1.5,
         "unconfined": False, "env": {"A\tB": "\x00x\x1f\u2028\"\\", "LANG": "C"},
         "net": {"connect": [80, 443]}}
    text = manifests.render(m)
    assert tomllib.loads(text) == m
    assert 'cmd = ["sh", "-c", ' in text and "priority = \"normal\"" in text  # one key a line


@needs_fuse
def test_a_manifest_file_with_control_characters_parses_back(mount):
    mount.define("ctrl", 'cmd = ["cat"]\nunconfined = true\n[env]\nX = "a\\u0001b\\u007fc"\n')
    mount.sh("echo 'spawn ctrl' > ctl", check=True)
    parsed = tomllib.loads(mount.read("agents/ctrl/manifest"))
    assert parsed["env"]["X"] == "a\x01b\x7fc" and parsed["cmd"] == ["cat"]


# --- the command --------------------------------------------------------------------

def test_version():
    r = run_fs9("--version")
    assert r.returncode == 0 and r.stdout == f"fs9 {fs9.__version__}\n"


def test_the_configuration_file_is_checked_and_relative_to_itself(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[mount]\nstate = "st"\ndurability = "power"\nkernel_audit = false\n')
    assert service.load_config(str(cfg)) == {"state": str(tmp_path / "st"),
                                             "durability": "power", "kernel_audit": False}
    for bad, said in (('[mount]\nmountpoint = "/x"\n', "unknown key 'mountpoint'"),
                      ('[mount]\ndebug = "yes"\n', "debug must be a bool"),
                      ("[mount\n", "config.toml")):
        cfg.write_text(bad)
        r = run_fs9("mount", str(tmp_path / "mnt"), "--config", str(cfg))
        assert r.returncode == 2 and said in r.stderr and r.stderr.count("\n") == 1
    r = run_fs9("mount", str(tmp_path / "mnt"), "--config", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and "no configuration file" in r.stderr
    assert not (tmp_path / "mnt").exists()


@needs_fuse
def test_the_configuration_sets_the_options_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "fs9.toml"
    cfg.write_text(f'[mount]\nstate = "from-config"\nagents = "{REPO / "agents"}"\n'
                   f'vault = "v"\ndurability = "power"\n')
    mnt = tmp_path / "mnt"
    r = run_fs9("mount", str(mnt), "--config", str(cfg), "--vault", str(tmp_path / "cli-vault"),
                "--background")
    assert r.returncode == 0, r.stderr
    try:
        assert (tmp_path / "from-config" / "log.sqlite").exists()
        assert (tmp_path / "cli-vault").is_dir() and not (tmp_path / "v").exists()
        with open(mnt / "ctl") as f:
            server = dict(w.split("=", 1) for w in f.read().split() if "=" in w)["pid"]
        with open(f"/proc/{server}/cmdline", "rb") as f:
            assert b"--durability\0power\0" in f.read()
    finally:
        assert run_fs9("umount", str(mnt)).returncode == 0


# --- as a systemd service -----------------------------------------------------------

@needs_fuse
@pytest.mark.parametrize("stop", ["ExecStop", "KillMode=mixed", "KillMode=control-group"])
def test_notify_ready_then_a_stop_is_clean(tmp_path, stop):
    """systemd's side, played by the test: a NOTIFY_SOCKET, READY=1 awaited, then a stop
    as the unit makes it: `fs9 umount` (ExecStop), a SIGTERM to the main process only
    (KillMode=mixed), or to every process at once (control-group): the serving process
    then gets a second SIGTERM, the main process passing its own on, and ignores it once
    its stop is under way."""
    sock_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        sock.settimeout(WAIT_S * 2)
        mnt = tmp_path / "mnt"
        p = subprocess.Popen([sys.executable, "-m", "fs9", "mount", str(mnt), "--state",
                              str(tmp_path / "state"), "--agents", str(REPO / "agents"),
                              "--vault", str(tmp_path / "vault")],
                             env={**os.environ, "NOTIFY_SOCKET": sock_path},
                             stderr=subprocess.PIPE, text=True)
        try:
            assert sock.recv(4096) == b"READY=1"
            assert mounted(mnt) and (mnt / "ctl").exists()  # ready means serving
            (mnt / "ctl").write_text("spawn envy cmd=env unconfined=true")
            (mnt / "agents/envy/ctl").write_text("run go")
            seen = (mnt / "agents/envy/out").read_text()  # (ends with the task)
            assert "PATH=" in seen and "NOTIFY_SOCKET" not in seen  # no agent inherits it
            if stop == "ExecStop":
                r = run_fs9("umount", str(mnt))
                assert r.returncode == 0, r.stderr
            elif stop == "KillMode=mixed":
                os.kill(p.pid, signal.SIGTERM)
            else:
                with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                    children = [int(c) for c in f.read().split()]
                for pid in [p.pid] + children:
                    os.kill(pid, signal.SIGTERM)
            assert p.wait(timeout=60) == 0, p.stderr.read()
            assert not mounted(mnt)
        finally:
            if p.poll() is None:
                p.kill()
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    # stopped, the state's lock is free (systemd's restart mounts it again at once), and
    # the lock file says the stop was clean
    lock = state.StateLock(str(tmp_path / "state"))
    try:
        assert "stopped" in lock.previous and lock.previous["pid"] != os.getpid(), lock.previous
    finally:
        lock._write(lock.previous)
        lock.release()
    r = run_fs9("check", str(tmp_path / "state"))
    assert r.returncode == 0, r.stderr


def test_the_unit_file():
    unit = (REPO / "systemd" / "fs9.service").read_text()
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in unit.splitlines()
             if "=" in line and not line.startswith("#")}
    assert lines["Type"] == "notify" and lines["KillMode"] == "mixed"
    assert lines["ExecStop"].split()[1:2] == ["umount"]
    assert lines["ExecStart"].split()[2] == lines["ExecStop"].split()[2]  # one mount point
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", str(REPO / "systemd" / "fs9.service")],
                           capture_output=True, text=True, timeout=60)
        # only the placeholder path of fs9 may be missing on this machine
        problems = [line for line in r.stderr.splitlines() if "/usr/local/bin/fs9" not in line]
        assert problems == [], r.stderr


# --- the log --------------------------------------------------------------------------

def test_fs9_log_rotates_and_keeps_other_libraries_quiet(tmp_path):
    """In a child process: logging and file descriptors 1 and 2 are process-wide."""
    code = f"""
import logging, os, sys
from fs9 import service
service.LOG_BYTES = 4096
service.setup_logging(True, {str(tmp_path / 'fs9.log')!r})
logging.getLogger("bm25s").debug("Building index from IDs")
logging.getLogger("bm25s").info("indexing")
for i in range(600):
    logging.getLogger("fs9.kernel").debug("line %d", i)
os.write(2, b"raw stderr after rotation\\n")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    logs = sorted(os.listdir(tmp_path))
    assert logs == ["fs9.log", "fs9.log.1", "fs9.log.2", "fs9.log.3"]
    every = "".join((tmp_path / name).read_text() for name in logs)
    assert "line 599" in (tmp_path / "fs9.log").read_text()
    assert "raw stderr after rotation" in (tmp_path / "fs9.log").read_text()
    assert "Building index" not in every and "indexing" not in every
    assert all(os.path.getsize(tmp_path / name) <= 4096 + 200 for name in logs)


def test_shell_completion(tmp_path):
    """argcomplete's protocol, as bash's completion function speaks it."""
    out = tmp_path / "completions"
    env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": "fs9 mo", "COMP_POINT": "6",
           "_ARGCOMPLETE_STDOUT_FILENAME": str(out), "_ARGCOMPLETE_IFS": "\n"}
    subprocess.run([sys.executable, "-m", "fs9"], env=env, capture_output=True, timeout=60)
    assert out.read_text().split() == ["mount"]
    env.update(COMP_LINE="fs9 mount x --dur", COMP_POINT="17")
    subprocess.run([sys.executable, "-m", "fs9"], env=env, capture_output=True, timeout=60)
    assert out.read_text().split() == ["--durability"]
