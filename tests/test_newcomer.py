"""A newcomer's first steps fail out loud (issue 18, item 1): each refusal is an exit
status a shell shows and a reason in an `err`, never an empty success."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, Mount, fuse_unavailable, mounted

pytestmark = pytest.mark.skipif(bool(fuse_unavailable()), reason=f"cannot mount FUSE: {fuse_unavailable()}")


def bash(mount, cmd: str) -> subprocess.CompletedProcess:
    """bash, not sh: its printf writes a line at a time (dash's writes once), and it says
    the errno (dash says "I/O error" for any)."""
    return subprocess.run(["bash", "-c", cmd], cwd=mount.path, capture_output=True,
                          text=True, timeout=60)


def test_a_clone_closed_to_other_users_is_refused_at_spawn(tmp_path):
    from fs9.drivers import confine
    if confine.unavailable():
        pytest.skip(f"agents are not confined here: {confine.unavailable()}")
    closed = tmp_path / "home"  # as root's 0700 home, where a root `git clone` lands
    closed.mkdir(mode=0o700)
    m = Mount(tmp_path)
    m.agents = shutil.move(m.agents, closed / "agents")
    r = subprocess.run([sys.executable, "-m", "fs9", "mount", str(m.path), "--state", str(m.state),
                        "--agents", str(m.agents), "--vault", str(m.vault), "--background"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    try:
        assert f"{closed} is closed to other users" in r.stderr  # said at mount already
        spawn = bash(m, "echo 'spawn upper' > ctl")
        assert spawn.returncode != 0 and "Permission denied" in spawn.stderr
        assert f"chmod o+x {closed}" in m.read("err")
        assert os.listdir(m.path / "agents") == []  # no agent that fails every task
        m.sh("echo 'spawn upper unconfined=true' > ctl", check=True)  # the way around
    finally:
        m.umount()


def test_bash_printf_of_a_bad_header_fails_and_sends_nothing(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    r = bash(mount, r"printf 'priority: urgent\n\nhi\n' > agents/echo/mail/new")
    assert r.returncode == 1 and "Invalid argument" in r.stderr
    assert "bad priority 'urgent'" in mount.read("agents/echo/err")
    mailbox = mount.path / "agents/echo/mail"
    assert sorted(os.listdir(mailbox)) == ["dead", "new", "next"]  # nothing was sent
    # a good message written a line at a time still goes, with all its headers
    r = bash(mount, r"printf 'type: note\npriority: high\n\nhello\n' > agents/echo/mail/new")
    assert r.returncode == 0, r.stderr
    assert [n[:7] for n in os.listdir(mailbox) if "-" in n] == ["1-high-"]


def test_the_root_err_says_why_a_spawn_was_refused(mount):
    r = bash(mount, "echo 'spawn nosuch' > ctl")
    # the definition is missing, not ctl: not "No such file or directory"
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert "no agent definition 'nosuch'" in mount.read("err")


def test_grep_r_over_the_mount_ends(mount):
    mount.sh("echo 'spawn echo' > ctl && echo 'run findme' > agents/echo/ctl", check=True)
    assert mount.read("agents/echo/out") == "findme\n"  # (ends when the task ends)
    r = subprocess.run(["timeout", "60", "grep", "-r", "-l", "findme", "."], cwd=mount.path,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode != 124, "grep -r hung on a stream"
    assert "./agents/echo/out" in r.stdout.split("\n")


def test_make_run_and_make_stop_twice_each(tmp_path):
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    make = ["make", "-C", str(REPO), f"MNT={mnt}", f"STATE={state}"]
    try:
        for _ in range(2):
            r = subprocess.run(make + ["run"], capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stderr
            assert mounted(mnt)
        assert "already mounted" in r.stdout
    finally:
        stops = [subprocess.run(make + ["stop"], capture_output=True, text=True, timeout=60)
                 for _ in range(2)]
    assert [s.returncode for s in stops] == [0, 0] and not mounted(mnt)
    assert "not mounted" in stops[1].stdout


def test_a_machine_without_fuse_gets_one_line(tmp_path):
    """/dev/fuse hidden (a bind mount of a plain file, in a private mount namespace)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to hide /dev/fuse in a mount namespace")
    (tmp_path / "notfuse").touch()
    script = (f"mount --bind {tmp_path / 'notfuse'} /dev/fuse && exec {sys.executable} -m fs9 "
              f"mount {tmp_path / 'mnt'} --state {tmp_path / 'state'} "
              f"--vault {tmp_path / 'vault'} --agents {REPO / 'agents'}")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "/dev/fuse" in r.stderr and "Traceback" not in r.stderr


def test_a_failed_task_is_never_a_failure_without_a_reason(mount):
    """`status` beside `failed=1` says why (a newcomer reads status first), whether the
    program exited non-zero or could not run at all."""
    mount.write("ctl", "spawn failer cmd=/bin/false\n")
    mount.write("agents/failer/in", "x\n")
    mount.wait_for(lambda: mount.status("failer")["failed"] == "1", what="the failed task")
    assert mount.status("failer")["reason"] == "its program exited with status 1"
    mount.write("ctl", "spawn doer cmd=/bin/true\n")
    mount.write("agents/doer/in", "x\n")
    mount.wait_for(lambda: mount.status("doer")["done"] == "1", what="the task")
    assert mount.status("doer")["reason"] == ""
