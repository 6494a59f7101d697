"""Bad input gets a clear errno, the reason in words lands in err/events, nothing is lost."""
import errno
import os

import pytest


def write_errno(mount, rel: str, data: bytes) -> int:
    fd = os.open(mount.path / rel, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.write(fd, data)
        return e.value.errno
    finally:
        os.close(fd)


@pytest.mark.parametrize("line, code, reason", [
    (b"frobnicate", errno.EINVAL, "unknown control message 'frobnicate'"),
    (b"kill", errno.EINVAL, "bad # args to command 'kill'"),
    (b"halt now", errno.EINVAL, "bad # args to command 'halt now'"),
    (b"kill nobody", errno.ENOENT, "no such agent: nobody"),
    (b"spawn nosuchdef", errno.EINVAL, "no agent definition 'nosuchdef'"),
    (b"spawn x cmd=/no/such/program", errno.ENOENT, "program '/no/such/program' not found"),
    (b"spawn x cmd=cat mode=sometimes", errno.EINVAL, "mode = 'sometimes'"),
    (b"spawn ../evil cmd=cat", errno.EINVAL, "bad agent name"),
    (b"spawn x cmd='unbalanced", errno.EINVAL, "cannot parse"),
    (b"\xff\xfe", errno.EINVAL, "not UTF-8"),
])
def test_root_ctl_refusals(mount, events, line, code, reason):
    assert write_errno(mount, "ctl", line) == code
    refused = [e for e in events.wait_kind("refused") if e["kind"] == "refused"]
    assert reason in refused[0]["reason"], refused
    assert mount.read("ctl").startswith("state=running") and "agents=0" in mount.read("ctl")


def test_spawn_twice_is_eexist_and_a_malformed_manifest_is_einval(mount, events):
    mount.write("ctl", "spawn echo")
    assert write_errno(mount, "ctl", b"spawn echo") == errno.EEXIST
    mount.define("broken", 'cmd = ["cat"\n')
    assert write_errno(mount, "ctl", b"spawn broken") == errno.EINVAL
    mount.define("typo", 'cdm = ["cat"]\n')
    assert write_errno(mount, "ctl", b"spawn typo") == errno.EINVAL
    reasons = [e["reason"] for e in events.wait_kind("refused", count=3) if e["kind"] == "refused"]
    assert any("malformed manifest" in r and "broken/agent.toml" in r for r in reasons)
    assert any("unknown key(s) cdm" in r for r in reasons)
    assert sorted(os.listdir(mount.path / "agents")) == ["echo"]


def test_a_bad_line_in_a_multiline_write_applies_nothing(mount):
    mount.write("ctl", "spawn echo")
    assert write_errno(mount, "ctl", b"spawn a cmd=cat\nspawn b cmd=cat\nkill nobody\n") == errno.ENOENT
    assert os.listdir(mount.path / "agents") == ["echo"]
    assert write_errno(mount, "agents/echo/ctl", b"run one\nrun two\npriority urgent\n") == errno.EINVAL
    assert mount.status("echo")["done"] == "0" and os.listdir(mount.path / "agents/echo/tasks") == []


def test_agent_ctl_refusals_reach_err_and_keep_earlier_work(mount):
    mount.sh("echo 'spawn echo' > ctl && echo 'run keep me' > agents/echo/ctl", check=True)
    assert mount.read("agents/echo/out") == "keep me\n"
    assert write_errno(mount, "agents/echo/ctl", b"priority urgent") == errno.EINVAL
    assert write_errno(mount, "agents/echo/ctl", b"run") == errno.EINVAL
    assert write_errno(mount, "agents/echo/ctl", b"jump") == errno.EINVAL
    err = mount.read("agents/echo/err")
    assert "bad priority 'urgent'" in err and "unknown control message 'jump'" in err
    task = os.listdir(mount.path / "agents/echo/tasks")[0]
    assert mount.read(f"agents/echo/tasks/{task}/out") == "keep me\n"
    r = mount.sh("echo jump > agents/echo/ctl")
    assert r.returncode == 1 and r.stderr  # echo reports the failure


def test_the_namespace_refuses_disk_operations_with_fitting_errnos(mount):
    mount.write("ctl", "spawn echo")
    cases = {
        "create": lambda: open(mount.path / "newfile", "w"),
        "mkdir": lambda: os.mkdir(mount.path / "agents/new"),
        "unlink": lambda: os.unlink(mount.path / "status"),
        "rename": lambda: os.rename(mount.path / "status", mount.path / "s2"),
        "write status": lambda: open(mount.path / "status", "w"),
        "read in": lambda: open(mount.path / "agents/echo/in").read(),
        "chmod": lambda: os.chmod(mount.path / "ctl", 0o777),
        "open dir for write": lambda: os.open(mount.path / "agents", os.O_WRONLY),
    }
    for what, op in cases.items():
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno in (errno.EACCES, errno.EPERM, errno.EISDIR), what
    with pytest.raises(FileNotFoundError):
        os.stat(mount.path / "agents/nobody/out")
    with pytest.raises(FileNotFoundError):
        os.unlink(mount.path / "nothing")
    assert mount.alive()


def test_oversized_input_is_efbig_and_queues_nothing(mount):
    mount.write("ctl", "spawn echo")
    mount.write("agents/echo/ctl", "stop")
    fd = os.open(mount.path / "agents/echo/in", os.O_WRONLY)
    chunk = b"x" * (1 << 20)
    with pytest.raises(OSError) as e:
        for _ in range(20):
            os.write(fd, chunk)
    assert e.value.errno == errno.EFBIG
    with pytest.raises(OSError) as e:
        os.close(fd)  # close(2) reports it too: the whole input was refused
    assert e.value.errno == errno.EFBIG
    assert mount.status("echo")["queued"] == "0"
    assert "task input over 16777216 bytes" in mount.read("agents/echo/err")
