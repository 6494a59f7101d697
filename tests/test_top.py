"""`fs9 top` (fs9/top.py, fs9/topapp.py): what it reads from a real mount, and its keys
driven headless with textual's own pilot (App.run_test) against a real mount."""
import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, WAIT_S, wait_task

from fs9 import top

# an agent whose spawns wait for the operator's yes (as in test_approvals.py)
BOSS = ('cmd = ["cat"]\nunconfined = true\npledge = ["read", "spawn", "send"]\n'
        'spawns = ["echo"]\n[unveil]\n"ctl" = "w"\n[approval]\nspawn = true\n')


def ask_approval(m) -> None:
    """boss asks to spawn e1: approval 1 waits in approvals/."""
    m.define("boss", BOSS)
    m.sh("echo 'spawn boss' > ctl", check=True)
    r = m.sh("echo 'spawn e1 def=echo' > agents/boss/view/ctl")
    assert r.returncode != 0  # EAGAIN: asked, not yet answered
    m.wait_for(lambda: top.approvals(m.path), what="approval 1 pending")


def test_the_data_is_read_from_the_mount(mount):
    m = mount
    m.sh("echo 'spawn echo' > ctl && echo 'spawn ticker' > ctl", check=True)
    tail = top.EventTail(m.path)
    try:
        m.sh("echo 'run hello' > agents/echo/ctl", check=True)
        assert wait_task(m, "echo")[0] == "hello\n"
        ticker = m.wait_for(lambda: next((a for a in top.agents(m.path)
                                          if a.name == "ticker" and a.task), None),
                            what="ticker's task running")
        assert ticker.state == "running" and ticker.restarts == "0"
        # elapsed: the status's task_elapsed, shown as 1m05s
        assert ticker.elapsed.endswith("s") and ticker.elapsed[0].isdigit()
        snap = top.snapshot(m.path)
        assert [a.name for a in snap.agents] == ["echo", "ticker"]
        assert snap.agents[0].task == "" and snap.agents[0].elapsed == ""
        assert "ticker running" in snap.tree and "agents=2" in snap.kernel
        assert [x.name for x in snap.models] == ["scripted"]
        assert snap.models[0].breaker.startswith("closed") and "calls=" in snap.usage
        lines = m.wait_for(lambda: [x for x in tail.new_lines() if '"task_done"' in x],
                           what="task_done on the events tail")
        assert top.event_line(lines[0]).split()[1:4] == ["task_done", "agent=echo",
                                                          f"task={m.status('echo')['latest']}"]
    finally:
        tail.close()
    assert (top.duration("65.2"), top.duration("7200"), top.duration("")) == \
        ("1m05s", "2h00m", "")
    # an agent's control characters never reach the operator's terminal
    assert top.event_line('{"kind":"task_progress","text":"a\\u001b[2Jb\\nc"}').split()[1:] \
        == ["task_progress", "text=a\\x1b[2Jb\\nc"]
    assert top.command(m.path, "ticker", "stop") is None
    m.wait_for(lambda: m.status("ticker")["state"] == "stopped", what="ticker stopped")
    assert top.command(m.path, "nobody", "stop") == "nobody: No such file or directory"
    ask_approval(m)
    [pending] = top.approvals(m.path)
    assert (pending.id, pending.agent, pending.action) == ("1", "boss", "spawn")
    assert top.answer(m.path, "1", "deny") is None
    assert "state=denied" in m.read("approvals/1/status") and top.approvals(m.path) == []
    assert top.answer(m.path, "1", "approve") == "1: Invalid argument"  # answered once


def test_top_shows_the_agents_and_its_keys_stop_one_and_answer(mount):
    from fs9.topapp import TopApp
    m = mount
    m.sh("echo 'spawn echo' > ctl && echo 'spawn ticker' > ctl", check=True)
    ask_approval(m)

    async def until(pilot, predicate, what):
        deadline = time.monotonic() + WAIT_S
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await pilot.pause(0.1)

    async def drive():
        app = TopApp(m.path)
        async with app.run_test(size=(120, 35)) as pilot:
            agents = app.query_one("#agents")
            shown = lambda: [agents.get_row_at(i)[0].plain for i in range(agents.row_count)]
            await until(pilot, lambda: shown() == ["boss", "echo", "ticker"], "three agents")
            await pilot.press("down", "down")
            assert agents.coordinate_to_cell_key(agents.cursor_coordinate).row_key.value \
                == "ticker"
            await pilot.press("s")
            await until(pilot, lambda: m.status("ticker")["state"] == "stopped",
                        "ticker stopped by the s key")
            await until(pilot, lambda: agents.get_row_at(2)[1].plain == "stopped",
                        "ticker shown stopped")
            approvals = app.query_one("#approvals")
            await until(pilot, lambda: approvals.row_count == 1, "the pending approval")
            await pilot.press("a")
            await until(pilot, lambda: "state=approved" in m.read("approvals/1/status"),
                        "approval 1 approved by the a key")
            await until(pilot, lambda: approvals.row_count == 0, "no approval left")
    asyncio.run(drive())
    assert m.status("echo")["state"] == "idle"  # only the selected agent was stopped


def test_the_b_key_resets_an_open_breaker(mount):
    from fs9.topapp import TopApp
    m = mount
    m.define("picky", 'cmd = ["sh", "-c", "read x; [ \\"$x\\" = ok ]"]\n'
             '[breaker]\nfailures = 1\nwindow_s = 120\ncooldown_s = 600\n')
    m.sh("echo 'spawn picky' > ctl && echo 'run bad' > agents/picky/ctl", check=True)
    m.wait_for(lambda: m.status("picky")["breaker"] == "open", what="the breaker open")

    async def drive():
        app = TopApp(m.path)
        async with app.run_test(size=(120, 35)) as pilot:
            agents = app.query_one("#agents")
            deadline = time.monotonic() + WAIT_S
            while agents.row_count != 1 or "breaker open" not in agents.get_row_at(0)[1].plain:
                assert time.monotonic() < deadline, "picky shown with its breaker open"
                await pilot.pause(0.1)
            await pilot.press("b")
            while m.status("picky")["breaker"] != "closed":
                assert time.monotonic() < deadline, "the breaker closed by the b key"
                await pilot.pause(0.1)
    asyncio.run(drive())
    m.sh("echo 'run ok' > agents/picky/ctl", check=True)  # new work is taken again


def test_top_refuses_a_folder_that_is_no_fs9(tmp_path):
    from conftest import fs9
    r = fs9("top", str(tmp_path))
    assert r.returncode == 1 and "is not an fs9 mount" in r.stderr


@pytest.mark.skipif(not shutil.which("tmux"), reason="tmux missing (apt-get install tmux)")
def test_top_under_a_real_terminal(mount, tmp_path):
    """fs9 top in tmux (a terminal of its own server): keys sent, the screen captured."""
    m = mount
    m.sh("echo 'spawn echo' > ctl && echo 'spawn ticker' > ctl", check=True)
    tmux = ["tmux", "-L", f"fs9-top-{os.getpid()}", "-f", "/dev/null"]
    screen = lambda: subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"],
                                    capture_output=True, text=True).stdout
    subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "120", "-y", "35",
                    shlex.join([sys.executable, "-m", "fs9", "top", str(m.path)])],
                   check=True, cwd=REPO)
    try:
        # (a capture may catch a frame half drawn: wait for one with all of it)
        shown = lambda s: re.search(r"echo +idle", s) and re.search(r"ticker +running", s) \
            and "s stop" in s
        m.wait_for(lambda: shown(screen()), what="echo, ticker and the keys on screen")
        subprocess.run([*tmux, "send-keys", "-t", "top", "Down", "s"], check=True)
        m.wait_for(lambda: m.status("ticker")["state"] == "stopped", what="ticker stopped")
        m.wait_for(lambda: re.search(r"ticker +stopped", screen()), what="ticker shown stopped")
        subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True)
        m.wait_for(lambda: subprocess.run([*tmux, "has-session", "-t", "top"],
                                          capture_output=True).returncode != 0,
                   what="fs9 top gone after q")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    assert m.status("echo")["state"] == "idle"
