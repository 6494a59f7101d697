"""The fs9 command and the Makefile: mount, stop, unmount cleanly every time."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, blocked_reading, fs9, fuse_unavailable, mounted, wait_for

pytestmark = pytest.mark.skipif(bool(fuse_unavailable()), reason=f"cannot mount FUSE: {fuse_unavailable()}")


def args(tmp_path):
    return ["--state", str(tmp_path / "state"), "--agents", str(REPO / "agents"),
            "--vault", str(tmp_path / "vault")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_foreground_mount_unmounts_cleanly_on_ctrl_c(tmp_path, sig):
    mnt = tmp_path / "mnt"
    p = subprocess.Popen([sys.executable, "-m", "fs9", "mount", str(mnt), *args(tmp_path)],
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (mounted(mnt) and os.path.exists(mnt / "ctl")):
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()
            time.sleep(0.05)
        (mnt / "ctl").write_text("spawn echo")
        reader = subprocess.Popen(["cat", mnt / "events"], stdout=subprocess.DEVNULL)
        wait_for(lambda: blocked_reading(reader.pid, mnt / "events"), what="cat to block")
        p.send_signal(sig)
        assert p.wait(timeout=30) == 0
        assert reader.wait(timeout=30) == 0  # a blocked reader got EOF, not a hang
        assert not mounted(mnt)
    finally:
        if p.poll() is None:
            p.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


def test_umount_and_refusals(tmp_path):
    mnt = tmp_path / "mnt"
    r = fs9("mount", str(mnt), *args(tmp_path), "--background")
    assert r.returncode == 0 and "fs9 mounted at" in r.stdout
    try:
        again = fs9("mount", str(mnt), *args(tmp_path), "--background")
        assert again.returncode == 2 and "already mounted" in again.stderr
    finally:
        r = fs9("umount", str(mnt))
    assert r.returncode == 0 and not mounted(mnt)
    r = fs9("umount", str(mnt))
    assert r.returncode == 2 and "not mounted" in r.stderr
    inside = fs9("mount", str(tmp_path / "state" / "mnt"), *args(tmp_path))
    assert inside.returncode == 2 and "must not be inside the state directory" in inside.stderr


def test_make_run_and_make_stop(tmp_path):
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    make = ["make", "-C", str(REPO), f"MNT={mnt}", f"STATE={state}"]
    r = subprocess.run(make + ["run"], capture_output=True, text=True, timeout=120)
    try:
        assert r.returncode == 0, r.stderr
        assert "make stop" in r.stdout
        assert sorted(os.listdir(mnt / "agents")) == ["counter", "echo", "ticker", "upper"]
        r2 = subprocess.run(["sh", "-c", "echo 'run hello fs9' > agents/upper/ctl && cat agents/upper/out"],
                            cwd=mnt, capture_output=True, text=True, timeout=20)
        assert r2.stdout == "HELLO FS9\n"
    finally:
        r = subprocess.run(make + ["stop"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not mounted(mnt)


def test_the_readme_walkthrough_runs(mount):
    mount.sh("echo 'spawn upper' > ctl && echo 'spawn counter' > ctl", check=True)
    r = subprocess.run(["sh", str(REPO / "examples/walkthrough.sh"), str(mount.path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["counter idle - 0 0 0 0", "upper idle - 0 0 0 0"]
    assert lines[2:6] == ["HELLO FS9", "1", "2", "3"]
    i = lines.index("refused, and the reason is in err:")
    assert lines[i + 1] == ("fs9: unknown control message 'frobnicate' "
                            "(verbs: run, stop, start, restart, kill, priority, reset)")
    mail = lines[i + 2:-3]  # the result of the request sent by mail, in the operator's mailbox
    assert "type: result" in mail and "from: upper" in mail and mail[-1] == "SHOUT THIS"
    assert lines[-3:-1] == ["upper", "upper"]  # its view of agents/; the registry
    assert lines[-1] == "(scripted model) you said: hello model"
