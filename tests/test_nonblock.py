"""Streams answer non-blocking callers as pipes do (issue 26, item 3): opened O_NONBLOCK, a
read with nothing there is EAGAIN and takes nothing; with data it returns it; select, poll
and epoll (level- and edge-triggered) wake when data comes; Python's asyncio and a Node.js
program read a stream in their event loops."""
import asyncio
import errno
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import (WAIT_S, Mount, blocked_reading, errno_of, fuse_unavailable, read_until,
                      wait_for)
from modelserver import ModelServer

NONBLOCK = os.O_RDONLY | os.O_NONBLOCK


def read_when_there(fd: int, expected: bytes, timeout: float = WAIT_S) -> bytes:
    """What a non-blocking reader gets once `expected` has come: it waits in poll(2) and
    reads when told, until EAGAIN (nothing is read by a read that would block)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    got = b""
    deadline = time.monotonic() + timeout
    while expected not in got:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {expected!r}; "
                                 f"read {got[-300:]!r}")
        if poller.poll(min(left, 1.0) * 1000):
            try:
                got += os.read(fd, 65536)
            except BlockingIOError:
                pass  # woken, and another wake-up comes with the data
    return got


def talker(mount, tmp_path):
    """Agent `talker`, its task running: it writes `out-later` to stdout and `err-later` to
    stderr once the flag file (returned) exists, and nothing before."""
    flag = tmp_path / "flag"
    mount.define("talker", "unconfined = true\ncmd = ['sh', '-c', 'read flag; "
                           "while [ ! -e \"$flag\" ]; do sleep 0.05; done; "
                           "echo out-later; echo err-later >&2; sleep 60']\n")
    mount.sh(f"echo 'spawn talker' > ctl && echo 'run {flag}' > agents/talker/ctl", check=True)
    mount.wait_for(lambda: mount.status("talker")["state"] == "running", what="talker's task")
    return flag


# Each stream kind: (mount, tmp_path) -> (its path, what makes data come, what then comes)
def events(mount, tmp_path):
    return "events", lambda: mount.sh("echo 'spawn echo' > ctl", check=True), b'"kind":"spawn"'


def topic(mount, tmp_path):
    mount.sh("touch topics/news", check=True)
    return "topics/news", lambda: mount.write("topics/news", "hello\n"), b"hello\n"


def agent_mail(mount, tmp_path):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    return ("agents/echo/mail/next", lambda: mount.write("agents/echo/mail/new", "hello\n"),
            b"\n\nhello\n")


def operator_mail(mount, tmp_path):
    """The operator's mailbox: the result of a work request it sent comes there."""
    mount.sh("echo 'spawn upper' > ctl", check=True)
    return ("mail/next",
            lambda: mount.write("agents/upper/mail/new", "type: work_request\n\nhello\n"),
            b"\n\nHELLO\n")


def agent_out(mount, tmp_path):
    flag = talker(mount, tmp_path)
    return "agents/talker/out", flag.touch, b"out-later\n"


def agent_err(mount, tmp_path):
    flag = talker(mount, tmp_path)
    return "agents/talker/err", flag.touch, b"err-later\n"


def task_out(mount, tmp_path):
    flag = talker(mount, tmp_path)
    (task,) = os.listdir(mount.path / "agents/talker/tasks")
    return f"agents/talker/tasks/{task}/out", flag.touch, b"out-later\n"


def in_a_view(mount, tmp_path):
    """An agent's own view of its mailbox: its reads are the ones counted and capped."""
    mount.define("waiter", 'cmd = ["cat"]\nunconfined = true\n')
    mount.sh("echo 'spawn waiter' > ctl", check=True)
    return ("agents/waiter/view/agents/waiter/mail/next",
            lambda: mount.write("agents/waiter/mail/new", "wake up\n"), b"\n\nwake up\n")


@pytest.mark.parametrize("kind", [events, topic, agent_mail, operator_mail, agent_out,
                                  agent_err, task_out, in_a_view], ids=lambda k: k.__name__)
def test_a_stream_opened_nonblocking_is_eagain_until_data_comes(mount, tmp_path, kind):
    rel, make_data, expected = kind(mount, tmp_path)
    fd = os.open(mount.path / rel, NONBLOCK)
    try:
        assert errno_of(os.read, fd, 65536) == errno.EAGAIN
        assert errno_of(os.read, fd, 1) == errno.EAGAIN  # and again: nothing was taken
        make_data()
        assert expected in read_when_there(fd, expected)
    finally:
        os.close(fd)


def test_a_nonblocking_read_of_mail_next_delivers_and_loses_nothing(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    box = mount.path / "agents/echo/mail"
    fd = os.open(box / "next", NONBLOCK)
    try:
        for _ in range(50):
            assert errno_of(os.read, fd, 65536) == errno.EAGAIN
    finally:
        os.close(fd)
    assert sorted(os.listdir(box)) == ["dead", "new", "next"]
    mount.write("agents/echo/mail/new", "first\n")
    mount.write("agents/echo/mail/new", "second\n")
    # no read was a delivery: none of the EAGAINs above shows in the log
    assert "mail_delivered" not in mount.read("log/audit")
    for _ in range(2):  # the head, delivered (and still pending until rm), each time
        fd = os.open(box / "next", NONBLOCK)
        try:
            got = read_when_there(fd, b"\n\nfirst\n")
        finally:
            os.close(fd)
        assert got.endswith(b"\n\nfirst\n")
    pending = [n for n in os.listdir(box) if n not in ("dead", "new", "next")]
    assert len(pending) == 2
    assert sorted(mount.read(f"agents/echo/mail/{n}").split("\n\n", 1)[1]
                  for n in pending) == ["first\n", "second\n"]


def test_a_stream_that_never_waits_reads_at_once_when_nonblocking(mount):
    fd = os.open(mount.path / "log/audit", NONBLOCK)  # the log up to the open, then EOF
    try:
        assert b'"kind":"mount"' in os.read(fd, 65536)
    finally:
        os.close(fd)
    mount.sh("echo 'spawn echo' > ctl && echo 'run done' > agents/echo/ctl", check=True)
    mount.wait_for(lambda: mount.status("echo")["latest_state"] == "done", what="task")
    fd = os.open(mount.path / "agents/echo/out", NONBLOCK)  # an ended task: data, then EOF
    try:
        assert os.read(fd, 65536) == b"done\n"
        assert os.read(fd, 65536) == b""
    finally:
        os.close(fd)


def test_select_poll_and_level_triggered_epoll_wake_a_nonblocking_reader(mount):
    mount.sh("touch topics/news", check=True)
    fd = os.open(mount.path / "topics/news", NONBLOCK)
    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLIN)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert select.select([fd], [], [], 0)[0] == [] and poller.poll(0) == []
        assert ep.poll(0) == []
        for i, wait in enumerate([lambda: select.select([fd], [], [], WAIT_S)[0] == [fd],
                                  lambda: poller.poll(WAIT_S * 1000) == [(fd, select.POLLIN)],
                                  lambda: ep.poll(WAIT_S) == [(fd, select.EPOLLIN)]]):
            threading.Thread(target=mount.write, args=("topics/news", f"event {i}\n")).start()
            assert wait()  # woken by the event (the bound is a failure, not the wake-up)
            assert os.read(fd, 65536) == b"event %d\n" % i
            assert errno_of(os.read, fd, 65536) == errno.EAGAIN
    finally:
        ep.close()
        os.close(fd)


def test_edge_triggered_epoll_wakes_for_each_arrival_after_eagain(mount):
    """Go's poller registers edge-triggered and reads until EAGAIN: the EAGAIN is what
    asks fs9 to say when the next data comes (a pipe wakes its waiters on every write)."""
    mount.sh("touch topics/news", check=True)
    fd = os.open(mount.path / "topics/news", NONBLOCK)
    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLIN | select.EPOLLET)
        for i in range(5):
            mount.write("topics/news", f"event {i}\n")
            assert ep.poll(WAIT_S) == [(fd, select.EPOLLIN)], f"no wake-up for event {i}"
            got = b""
            while (chunk := _read_or_none(fd)) is not None:
                got += chunk
            assert got == b"event %d\n" % i
    finally:
        ep.close()
        os.close(fd)


def _read_or_none(fd: int) -> bytes | None:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def test_asyncio_reads_a_stream_with_add_reader(mount):
    fd = os.open(mount.path / "events", NONBLOCK)

    async def main() -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        got, arrived = bytearray(), asyncio.Event()

        def readable() -> None:  # drains the descriptor, as a non-blocking reader may
            while (chunk := _read_or_none(fd)) is not None:
                got.extend(chunk)
            if b"asyncmarker" in got:
                arrived.set()
        loop.add_reader(fd, readable)
        ticks = 0
        while ticks < 5:  # the loop runs on while the stream has nothing
            await asyncio.sleep(0.01)
            ticks += 1
        sent = loop.run_in_executor(None, mount.sh, "echo 'spawn asyncmarker cmd=cat' > ctl")
        await asyncio.wait_for(arrived.wait(), WAIT_S)
        loop.remove_reader(fd)
        assert (await sent).returncode == 0
        return bytes(got), ticks
    try:
        got, ticks = asyncio.run(main())
    finally:
        os.close(fd)
    assert ticks == 5
    assert any(e["kind"] == "spawn" and e["agent"] == "asyncmarker"
               for e in map(json.loads, got.splitlines()))


NODE_READER = r"""
// Reads a stream with a non-blocking descriptor in Node's event loop: a read with nothing
// there is EAGAIN and is tried again later; the loop (a ticker) runs on meanwhile. Once
// the marker has come it closes the file and ends, which Node does only when no read is
// left pending in its thread pool.
const fs = require('fs');
const [path, marker] = process.argv.slice(2);
const fd = fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
const buf = Buffer.alloc(65536);
let text = '', eagain = 0, ticks = 0;
const ticker = setInterval(() => { ticks++; }, 5);
function next() {
  fs.read(fd, buf, 0, buf.length, null, (err, n) => {
    if (err) {
      if (err.code !== 'EAGAIN') throw err;
      if (eagain++ === 0) process.stdout.write('waiting\n');
      return setTimeout(next, 10);
    }
    text += buf.toString('utf8', 0, n);
    if (!text.includes(marker)) return next();
    clearInterval(ticker);
    fs.closeSync(fd);
    process.stdout.write(JSON.stringify({eagain, ticks, text}) + '\n');
  });
}
next();
"""


@pytest.mark.skipif(not shutil.which("node"),
                    reason="node missing (scripts/system-deps.sh --test installs nodejs)")
def test_a_node_program_reads_events_in_its_event_loop(mount, tmp_path):
    program = tmp_path / "reader.js"
    program.write_text(NODE_READER)
    with subprocess.Popen(["node", program, mount.path / "events", "nodemarker"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as node:
        try:
            read_until(node.stdout, lambda got: got == b"waiting\n", what="node's first EAGAIN")
            mount.sh("echo 'spawn nodemarker cmd=cat' > ctl", check=True)
            out, err = node.communicate(timeout=WAIT_S)  # it ends by itself
        finally:
            node.kill()
    assert node.returncode == 0, err
    seen = json.loads(out)
    assert seen["eagain"] >= 1 and seen["ticks"] >= 1
    assert any(e["kind"] == "spawn" and e["agent"] == "nodemarker"
               for e in map(json.loads, seen["text"].splitlines()))


def test_nonblocking_reads_take_no_slot_of_the_blocked_read_cap(mount, tmp_path):
    """An agent's reads that wait are capped (reads.BLOCKED_PER_AGENT); its EAGAINs wait for
    nothing and hold nothing: after more of them than the cap, a blocking read still waits."""
    from fs9.face.reads import BLOCKED_PER_AGENT
    rel, make_data, expected = in_a_view(mount, tmp_path)
    for _ in range(BLOCKED_PER_AGENT + 50):
        fd = os.open(mount.path / rel, NONBLOCK)
        try:
            assert errno_of(os.read, fd, 65536) == errno.EAGAIN
        finally:
            os.close(fd)
    with subprocess.Popen(["cat", mount.path / rel], stdout=subprocess.PIPE) as reader:
        mount.wait_reading([reader], rel)
        make_data()
        out, _ = reader.communicate(timeout=WAIT_S)
    assert out.endswith(expected)


def test_the_flag_set_or_cleared_after_open_counts(mount, tmp_path):
    """O_NONBLOCK set or cleared by fcntl(F_SETFL) after open counts at the next read, as
    for a pipe (pyfuse3 does not pass the flag on: fs9 reads it from /proc, fdflags.py)."""
    mount.sh("touch topics/news", check=True)
    path = mount.path / "topics/news"
    # opened non-blocking, then cleared: the read waits for data
    cleared = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)\n"
               "fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)\n"
               "print(os.read(fd, 65536))\n")
    with subprocess.Popen([sys.executable, "-c", cleared, path], stdout=subprocess.PIPE) as p:
        wait_for(lambda: blocked_reading(p.pid, path), what="the reader to wait in read(2)")
        mount.write("topics/news", "hello\n")
        out, _ = p.communicate(timeout=WAIT_S)
    assert out == b"b'hello\\n'\n"
    # opened blocking, then set: EAGAIN when nothing is there, data when some is
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        assert errno_of(os.read, fd, 65536) == errno.EAGAIN
        mount.write("topics/news", "later\n")
        assert os.read(fd, 65536) == b"later\n"
        assert errno_of(os.read, fd, 65536) == errno.EAGAIN
    finally:
        os.close(fd)


@pytest.fixture
def model_server():
    s = ModelServer()
    yield s
    s.stop()


@pytest.mark.skipif(bool(fuse_unavailable()), reason=f"cannot mount FUSE: {fuse_unavailable()}")
def test_a_models_reply_opened_nonblocking_is_eagain_while_the_model_thinks(tmp_path,
                                                                           model_server):
    m = Mount(tmp_path)
    m.state.mkdir(parents=True, exist_ok=True)
    (m.state / "models.toml").write_text(f'[models.local]\nprovider = "openai"\napi_base = '
                                         f'"{model_server.url}/v1"\nmodel = "toy"\n')
    m.mount()
    try:
        cid = m.read("models/local/clone").strip()
        m.write(f"models/local/{cid}/request", "SLEEP 600\nhello")
        wait_for(lambda: model_server.in_flight, what="the request at the model")
        fd = os.open(m.path / f"models/local/{cid}/reply", NONBLOCK)
        try:
            assert errno_of(os.read, fd, 65536) == errno.EAGAIN
            model_server.release()
            assert read_when_there(fd, b"hello").startswith(b"echo: ")
        finally:
            os.close(fd)
    finally:
        m.umount()
    assert not m.bugs(), m.bugs()


HAMMER = """import os, resource, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (5000, 5000))
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)
dups = [os.dup(fd) for _ in range(4000)]  # one description, 4,001 descriptors
print("ready", flush=True)
reads = other = 0
end = time.monotonic() + 60
while time.monotonic() < end and not os.path.exists(sys.argv[2]):
    try:
        os.read(fd, 65536)
        other += 1
    except BlockingIOError:
        reads += 1
    except OSError:
        other += 1
print(f"eagain={reads} other={other}", flush=True)
"""


def test_a_reader_with_thousands_of_descriptors_does_not_stall_fs9(mount, tmp_path):
    """Each read that would wait makes fs9 look at the reader's descriptors in /proc (on
    its loop): a program holding 4,001 descriptors of a stream and reading it in a loop
    (non-blocking: EAGAIN each time) once cost 150 ms of the loop a read, and the
    operator waited 600 ms for `status`. The walk is the reader's budget now."""
    mount.define("h", 'cmd = ["cat"]\nunconfined = true\n[unveil]\n"topics/news" = "rw"\n')
    mount.sh("echo 'spawn h' > ctl && touch topics/news", check=True)
    path = mount.path / "agents/h/view/topics/news"

    def status_read_s() -> float:
        times = []
        for _ in range(30):
            t0 = time.monotonic()
            mount.read("status")
            times.append(time.monotonic() - t0)
        return sorted(times)[len(times) // 2]

    quiet = status_read_s()
    stop = tmp_path / "stop"
    hammers = [subprocess.Popen([sys.executable, "-c", HAMMER, path, stop],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for h in hammers:
            assert h.stdout.readline() == "ready\n"
        loaded = status_read_s()
    finally:
        stop.touch()
        outs = [h.communicate(timeout=WAIT_S)[0] for h in hammers]
    counts = [dict(w.split("=") for w in out.split()) for out in outs]
    assert all(int(c["eagain"]) > 0 and c["other"] == "0" for c in counts), counts
    print(f"operator's read of status, median: {quiet * 1e3:.2f} ms quiet, "
          f"{loaded * 1e3:.2f} ms beside two such readers")
    assert loaded < 10 * quiet + 0.05, (quiet, loaded)
    # the flag set after open still counts for another reader (the budget is the
    # opener's: h spent its own)
    fd = os.open(mount.path / "topics/news", os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        assert errno_of(os.read, fd, 65536) == errno.EAGAIN
    finally:
        os.close(fd)
