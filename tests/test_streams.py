"""Streams behave like pipes: blocking, never holding up others, freed by signals, pollable."""
import os
import select
import signal
import subprocess
import time

from conftest import proc_report


def long_task(mount) -> None:
    mount.define("slow", 'cmd = ["sh", "-c", "read x; echo started; sleep 60"]\n')
    mount.sh("echo 'spawn slow' > ctl && echo 'run x' > agents/slow/ctl", check=True)


def test_hundreds_of_blocked_readers_do_not_hold_up_other_requests(mount):
    long_task(mount)
    readers = [subprocess.Popen(["cat", mount.path / ("events" if i % 2 else "agents/slow/out")],
                                stdout=subprocess.DEVNULL) for i in range(300)]
    try:
        mount.wait_reading(readers[1::2], "events")  # every reader blocks in read()
        mount.wait_reading(readers[0::2], "agents/slow/out")  # ("started", then it waits)
        assert all(p.poll() is None for p in readers)
        for _ in range(3):
            start = time.monotonic()
            r = mount.sh("ls agents/slow && stat status >/dev/null && cat status", check=True)
            # (held up, they would wait for the 60 s task; a loaded machine is slow, not that)
            assert time.monotonic() - start < 10, "ls/stat/cat held up by blocked readers"
        assert "slow running" in r.stdout
        mount.sh("echo 'spawn echo' > ctl && echo 'run still works' > agents/echo/ctl", check=True)
        assert mount.read("agents/echo/out") == "still works\n"
    finally:
        for p in readers:
            p.kill()
        start = time.monotonic()
        for p in readers:
            p.wait(timeout=10)
        assert time.monotonic() - start < 30, "SIGKILLed readers were not freed promptly"


def test_timeout_ctrl_c_and_sigkill_free_a_blocked_reader(mount):
    long_task(mount)
    # the task has started and said so: from here on `cat out` prints that, then blocks
    assert mount.sh("head -n 1 agents/slow/out", check=True).stdout == "started\n"
    start = time.monotonic()
    r = mount.sh("timeout 0.5 cat agents/slow/out")
    assert r.returncode == 124 and r.stdout == "started\n"
    assert time.monotonic() - start < 30  # (not the 60 s task's end)
    for sig in (signal.SIGINT, signal.SIGKILL, signal.SIGTERM):
        # (with the signals' default actions: a suite started with `nohup ... &` ignores
        # SIGINT, and its children would inherit that)
        p = subprocess.Popen(["env", "--default-signal=INT,TERM", "cat", mount.path / "events"],
                             stdout=subprocess.DEVNULL)
        mount.wait_reading([p], "events")
        sent = time.monotonic()
        p.send_signal(sig)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:  # say where the reader and the server wait
            raise AssertionError(f"reader ignored signal {sig!r} for 30 s:\n"
                                 f"{proc_report(p.pid)}\nfs9:\n{proc_report(mount.pid)}")
        assert time.monotonic() - sent < 10, f"reader ignored signal {sig!r}"
        assert p.returncode == -sig
    assert mount.alive()


def test_select_poll_and_epoll_on_a_stream(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    fd = os.open(mount.path / "events", os.O_RDONLY)
    try:
        assert select.select([fd], [], [], 0.3)[0] == []  # nothing yet: not readable
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(200) == []
        ep = select.epoll()
        ep.register(fd, select.EPOLLIN)
        assert ep.poll(0.2) == []
        start = time.monotonic()
        subprocess.Popen(["sh", "-c", f"sleep 0.3; echo 'run hi' > {mount.path}/agents/echo/ctl"])
        assert ep.poll(60) == [(fd, select.EPOLLIN)]  # woken by the event, not by a timeout
        assert 0.2 < time.monotonic() - start
        assert select.select([fd], [], [], 0)[0] == [fd]
        assert poller.poll(0) == [(fd, select.POLLIN)]
        assert b'"kind":"task_queued"' in os.read(fd, 65536)
        ep.close()
    finally:
        os.close(fd)


def test_cat_out_of_an_idle_agent_ends_at_once(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    r = mount.sh("timeout 30 cat agents/echo/out agents/echo/err")  # (a hang: 30 s, fails)
    assert r.returncode == 0 and r.stdout == ""
