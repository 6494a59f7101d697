"""The event log is the source of truth: kill -9 the server, mount again, nothing is lost."""
import os


def test_kill_9_then_remount_brings_everything_back(mount, events):
    mount.define("slow", 'cmd = ["sh", "-c", "read x; echo \\"begin $x\\"; sleep 1; echo \\"end $x\\""]\n')
    mount.define("tmp", 'cmd = ["sh", "-c", "read x; echo \\"begin $x\\"; sleep 30"]\n'
                 'restart = "temporary"\n')
    mount.sh("echo 'spawn echo' > ctl && echo 'spawn slow' > ctl && echo 'spawn tmp' > ctl",
             check=True)
    mount.sh("echo 'run finished' > agents/echo/ctl && cat agents/echo/out", check=True)
    mount.sh("echo 'run one' > agents/slow/ctl; echo 'run two' > agents/slow/ctl;"
             "echo 'run three' > agents/slow/ctl; echo 'run t' > agents/tmp/ctl", check=True)
    mount.wait_for(lambda: mount.status("slow")["state"] == "running"
                   and mount.status("tmp")["state"] == "running", what="both running")
    r = mount.sh("timeout 30 head -n 1 agents/tmp/out", check=True)  # `out` blocks while it runs
    assert r.stdout == "begin t\n"
    slow_ids = sorted(os.listdir(mount.path / "agents/slow/tasks"), key=int)
    tmp_id = os.listdir(mount.path / "agents/tmp/tasks")[0]
    events.close()
    mount.kill9()
    assert not mount.alive()

    mount.mount()
    assert mount.read("status").split("\n")[0].startswith("echo idle")
    assert sorted(os.listdir(mount.path / "agents")) == ["echo", "slow", "tmp"]
    echo_task = os.listdir(mount.path / "agents/echo/tasks")[0]
    assert mount.read(f"agents/echo/tasks/{echo_task}/out") == "finished\n"
    assert "state=done" in mount.read(f"agents/echo/tasks/{echo_task}/status")
    # the interrupted task of a transient agent runs again, then the queued ones, in order
    mount.wait_for(lambda: mount.status("slow")["done"] == "3", what="slow tasks")
    outs = [mount.read(f"agents/slow/tasks/{i}/out") for i in slow_ids]
    assert outs == ["begin one\nend one\n", "begin two\nend two\n", "begin three\nend three\n"]
    assert "attempt=2" in mount.read(f"agents/slow/tasks/{slow_ids[0]}/status")
    # a temporary agent's interrupted task is failed, with the reason, not silently dropped
    st = mount.read(f"agents/tmp/tasks/{tmp_id}/status")
    assert "state=failed" in st and "interrupted" in st
    assert mount.read(f"agents/tmp/tasks/{tmp_id}/out") == "begin t\n"  # output kept


def test_every_acknowledged_command_survives_kill_9(mount):
    mount.sh("echo 'spawn echo' > ctl && echo stop > agents/echo/ctl", check=True)
    fd = os.open(mount.path / "agents/echo/ctl", os.O_WRONLY)
    for i in range(200):
        os.write(fd, f"run n{i}\n".encode())  # returns only once the task is logged
    os.close(fd)
    mount.write("ctl", "spawn late def=echo")
    mount.kill9()
    mount.mount()
    assert mount.status("echo")["queued"] == "200" and mount.status("echo")["state"] == "stopped"
    assert (mount.path / "agents/late").is_dir()
    ids = sorted(os.listdir(mount.path / "agents/echo/tasks"), key=int)
    assert [mount.read(f"agents/echo/tasks/{i}/input") for i in ids] == [f"n{i}\n" for i in range(200)]


def test_a_clean_unmount_interrupts_and_requeues_like_a_crash(mount):
    mount.define("slow", 'cmd = ["sh", "-c", "read x; echo go; sleep 30"]\n')
    mount.sh("echo 'spawn slow' > ctl && echo 'run a' > agents/slow/ctl", check=True)
    mount.wait_for(lambda: mount.status("slow")["state"] == "running", what="running")
    mount.umount()
    mount.mount()
    task = os.listdir(mount.path / "agents/slow/tasks")[0]
    mount.wait_for(lambda: "attempt=2" in mount.read(f"agents/slow/tasks/{task}/status"),
                   what="second attempt")
    assert "state=running" in mount.read(f"agents/slow/tasks/{task}/status")
