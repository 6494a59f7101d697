"""The state directory has one owner: a second server on it is refused at once, in one
line naming the holder, and the first goes on unharmed; a killed server leaves no lock."""
import json

from conftest import fs9, mounted


def mount_args(m, mnt):
    return ["mount", str(mnt), "--state", str(m.state), "--agents", str(m.agents),
            "--vault", str(m.vault), "--background"]


def test_a_second_server_on_one_state_is_refused_and_the_first_goes_on(mount, tmp_path):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    other = tmp_path / "other"
    r = fs9(*mount_args(mount, other))
    try:
        assert r.returncode == 1, r.stdout + r.stderr
        line, = r.stderr.splitlines()  # one line, naming the holder
        assert line.startswith("fs9: state ") and f"fs9 pid {mount.pid} serving {mount.path}" \
            in line, line
        assert not mounted(other)
        holder = json.loads((mount.state / "lock").read_text())
        assert holder["pid"] == mount.pid and holder["mount"] == str(mount.path)
        # the first server is unharmed: it takes and logs writes as before
        for i in range(20):
            mount.sh(f"echo 'run n{i}' > agents/echo/ctl", check=True)
        mount.wait_for(lambda: mount.status("echo")["done"] == "20", what="20 tasks done")
        assert mount.alive() and mount.read("agents/echo/out") == "n19\n"
        # and once it is unmounted, the state is free for the next server
        mount.umount()
        r = fs9(*mount_args(mount, other))
        assert r.returncode == 0, r.stderr
        assert (other / "agents/echo").is_dir()
    finally:
        if mounted(other):
            assert fs9("umount", str(other)).returncode == 0


def test_kill_9_leaves_no_stale_lock(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    old = mount.pid
    mount.kill9()
    mount.mount()  # the same state, at once: the dead server's flock went with it
    assert mount.pid != old and (mount.path / "agents/echo").is_dir()
    assert json.loads((mount.state / "lock").read_text())["pid"] == mount.pid
