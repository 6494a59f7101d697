"""Mail held open (kernel/bus/mailstream.py): `mail/stream` read one message a read by a
program holding it open, never EOF, acknowledged by writes to a held-open `mail/ack`;
the guarantees of mail/new, next and rm, a kill -9 of the server included."""
import errno
import json
import os
import select
import subprocess

import pytest

from conftest import WAIT_S, blocked_reading
from midstream import killed_mid_stream
from fs9.kernel.bus.mailstream import MAX_UNACKED


def pending(mount, agent: str) -> list[str]:
    return [n for n in os.listdir(mount.path / f"agents/{agent}/mail")
            if n not in ("new", "next", "dead")]


def read_lines(fd: int, count: int, size: int = 65536) -> list[bytes]:
    """count whole lines from a held-open stream, read size bytes at a time."""
    data = b""
    while data.count(b"\n") < count:
        ready, _, _ = select.select([fd], [], [], WAIT_S)
        assert ready, f"no line within {WAIT_S} s: {data!r}"
        chunk = os.read(fd, size)
        assert chunk, "EOF on mail/stream"
        assert len(chunk) <= size
        data += chunk
    lines = data.split(b"\n")
    assert lines[-1] == b"" and len(lines) == count + 1, data  # whole lines, no more
    return lines[:-1]


def test_held_open_one_message_a_read_and_acknowledged_a_write(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    box = mount.path / "agents/echo/mail"
    send = os.open(box / "batch", os.O_WRONLY)
    stream = os.open(box / "stream", os.O_RDONLY)
    ack = os.open(box / "ack", os.O_WRONLY)
    try:
        got = []
        for i in range(5):
            os.write(send, b"hello\t%d\n" % i)  # one message, committed when write returns
            (row,) = read_lines(stream, 1)
            msg_id, sender, body = row.split(b"\t", 2)
            assert (sender, body) == (b"operator", b"hello\\t%d" % i)  # escaped: one line
            got.append(msg_id)
            os.write(ack, msg_id + b"\n")
        assert pending(mount, "echo") == []
        # a read returns what is pending, as many lines as fit, in delivery order
        os.write(send, b"a\nb\n")
        mount.write("agents/echo/mail/new", "priority: high\n\nurgent\n")
        rows = read_lines(stream, 3)
        assert [r.split(b"\t")[2] for r in rows] == [b"urgent", b"a", b"b"]
        os.write(ack, b" ".join(r.split(b"\t")[0] for r in rows))
    finally:
        for fd in (send, stream, ack):
            os.close(fd)
    assert pending(mount, "echo") == []
    audit = [json.loads(line) for line in mount.read("log/audit").splitlines()]
    kinds = [e["kind"] for e in audit]
    assert kinds.count("mail_sent") == 8 and kinds.count("mail_acked") == 8
    assert kinds.count("mail_delivered") == 8  # each given once, logged with its ack


def test_a_read_waits_for_a_send_and_never_ends(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    # from the shell: head stops after the lines it wants; the stream itself never ends
    with subprocess.Popen(["head", "-n", "2", str(mount.path / "agents/echo/mail/stream")],
                          stdout=subprocess.PIPE, text=True) as reader:
        mount.wait_for(lambda: blocked_reading(reader.pid, mount.path / "agents/echo/mail/stream"),
                       what="head blocked in its read of mail/stream")
        mount.sh("echo one > agents/echo/mail/batch", check=True)
        mount.wait_for(lambda: len(pending(mount, "echo")) == 1, what="one pending")
        assert reader.poll() is None  # one line given; head waits for the second
        mount.sh("echo two > agents/echo/mail/batch", check=True)
        out, _ = reader.communicate(timeout=WAIT_S)
    assert [line.split("\t")[2] for line in out.splitlines()] == ["one", "two"]
    fd = os.open(mount.path / "agents/echo/mail/stream", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert [r.split(b"\t")[2] for r in read_lines(fd, 2)] == [b"one", b"two"]  # again
        with pytest.raises(BlockingIOError):  # all given to this open: nothing, not EOF
            os.read(fd, 4096)
    finally:
        os.close(fd)


def test_a_read_smaller_than_a_line_gets_it_in_pieces(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    long = b"x" * 300
    mount.write("agents/echo/mail/batch", long + b"\nshort\n")
    fd = os.open(mount.path / "agents/echo/mail/stream", os.O_RDONLY)
    try:
        first = read_lines(fd, 1, size=100)[0]  # pieces of at most 100 bytes, then short
        assert first.split(b"\t")[2] == long
        (second,) = read_lines(fd, 1, size=100)
        assert second.split(b"\t")[2] == b"short"
    finally:
        os.close(fd)


def test_opens_reading_pieces_of_one_long_line_share_it(mount):
    """Many opens each begin the same long line (a 1 MiB message of newlines, 2 MiB
    escaped) with a small read: what the server keeps of it is the line once, not a copy
    of its rest per open (4096 opens an agent may hold would be 8 GiB); each open gets it
    whole, piece by piece."""
    from agentprocs import rss_mib
    from fs9.kernel.bus.message import MAX_MESSAGE
    mount.sh("echo 'spawn echo' > ctl", check=True)
    body = b"\n" * (MAX_MESSAGE - 1024)
    mount.write("agents/echo/mail/new", body)
    opens = [os.open(mount.path / "agents/echo/mail/stream", os.O_RDONLY) for _ in range(64)]
    try:
        before = rss_mib(mount.pid)
        heads = [os.read(fd, 64) for fd in opens]
        grown = rss_mib(mount.pid) - before
        assert len({h.split(b"\t")[0] for h in heads}) == 1 and all(heads)
        assert grown < 32, f"the server grew {grown:.0f} MiB for 64 opens' pieces"
        (row,) = read_lines(opens[-1], 1, size=1 << 17)  # the rest, then the line's end
        assert (heads[-1] + row).split(b"\t")[2] == b"\\n" * (len(body) - 1)
    finally:
        for fd in opens:
            os.close(fd)


def test_two_opens_each_get_every_message_and_a_new_open_what_is_unacknowledged(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    box = mount.path / "agents/echo/mail"
    a, b = os.open(box / "stream", os.O_RDONLY), os.open(box / "stream", os.O_RDONLY)
    try:
        mount.write("agents/echo/mail/batch", "m1\nm2\nm3\n")
        rows_a, rows_b = read_lines(a, 3), read_lines(b, 3)
        assert rows_a == rows_b
        mount.write("agents/echo/mail/ack", rows_a[1].split(b"\t")[0])  # m2 acknowledged
        mount.write("agents/echo/mail/batch", "m4\n")
        assert [r.split(b"\t")[2] for r in read_lines(a, 1)] == [b"m4"]  # only the new one
    finally:
        os.close(a)
        os.close(b)
    c = os.open(box / "stream", os.O_RDONLY)
    try:  # unacknowledged: given again, in order; the acknowledged one never again
        assert [r.split(b"\t")[2] for r in read_lines(c, 3)] == [b"m1", b"m3", b"m4"]
    finally:
        os.close(c)
    assert mount.read("agents/echo/mail/next").endswith("\n\nm1\n")


def test_an_open_holds_at_most_its_cap_of_unacknowledged_messages(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    lines = "".join(f"n{i}\n" for i in range(MAX_UNACKED + 5))
    mount.write("agents/echo/mail/batch", lines)
    fd = os.open(mount.path / "agents/echo/mail/stream", os.O_RDONLY | os.O_NONBLOCK)
    try:
        rows = read_lines(fd, MAX_UNACKED)
        with pytest.raises(BlockingIOError):  # at the cap: waits for acknowledgements
            os.read(fd, 4096)
        mount.write("agents/echo/mail/ack", b" ".join(r.split(b"\t")[0] for r in rows[:3]))
        assert [r.split(b"\t")[2] for r in read_lines(fd, 3)] == [b"n1000", b"n1001", b"n1002"]
        with pytest.raises(BlockingIOError):
            os.read(fd, 4096)
    finally:
        os.close(fd)


def test_another_agents_stream_is_its_views_to_read(mount):
    mount.define("peer", 'cmd = ["sleep", "600"]\n[unveil]\n"agents/echo/mail" = "w"\n')
    mount.sh("echo 'spawn echo' > ctl && echo 'spawn peer' > ctl", check=True)
    with pytest.raises(OSError) as e:
        open(mount.path / "agents/peer/view/agents/echo/mail/stream").close()
    assert e.value.errno == errno.EACCES
    assert "stream" not in os.listdir(mount.path / "agents/echo/mail")  # unlisted


def test_the_operators_results_received_held_open(mount):
    mount.sh("echo 'spawn upper' > ctl", check=True)
    stream = os.open(mount.path / "mail/stream", os.O_RDONLY)
    ack = os.open(mount.path / "mail/ack", os.O_WRONLY)
    try:
        got = []
        for word in ("one", "two"):  # each result wakes the held-open read
            mount.write("agents/upper/mail/new", f"type: work_request\n\n{word}\n")
            (row,) = read_lines(stream, 1)
            msg_id, sender, body = row.split(b"\t", 2)
            assert sender == b"upper"
            got.append(body)
            os.write(ack, msg_id)
        assert got == [b"ONE", b"TWO"]
    finally:
        os.close(stream)
        os.close(ack)
    assert [n for n in os.listdir(mount.path / "mail") if n not in ("dead", "next")] == []
    # an agent's view never acknowledges the operator's mail, held open or not
    mount.define("peer", 'cmd = ["sleep", "600"]\n[unveil]\n"mail" = "w"\n')
    mount.sh("echo 'spawn peer' > ctl", check=True)
    with pytest.raises(OSError) as e:
        open(mount.path / "agents/peer/view/mail/ack", "w").close()
    assert e.value.errno == errno.EACCES


SENDER = """
import os, sys
fd = os.open(sys.argv[1] + "/batch", os.O_WRONLY)
i = 0
while True:
    try:
        os.write(fd, b"n%d\\n" % i)
    except OSError:
        break
    print(i, flush=True)  # acknowledged: the write returned
    i += 1
"""

RECEIVER = """
import os, sys
box = sys.argv[1]
stream = os.open(box + "/stream", os.O_RDONLY)
ack = os.open(box + "/ack", os.O_WRONLY)
buf = b""
while True:
    try:
        chunk = os.read(stream, 65536)
    except OSError:
        break
    if not chunk:
        break
    buf += chunk
    *rows, buf = buf.split(b"\\n")
    for row in rows:
        msg_id, _, body = row.split(b"\\t", 2)
        print("R", body.decode(), flush=True)  # read, not yet acknowledged
        try:
            os.write(ack, msg_id)
        except OSError:
            sys.exit(0)
        print("A", body.decode(), flush=True)  # acknowledged
"""


def test_kill_9_in_the_middle_of_a_held_open_stream(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    box = str(mount.path / "agents/echo/mail")
    said_sender, said_receiver = killed_mid_stream(mount, SENDER, RECEIVER, box, 300, 200,
                                                   "300 sent and 200 acknowledged")
    sent = {f"n{line.strip()}" for line in said_sender}
    log = [line.split() for line in said_receiver]
    acked = [words[1] for words in log if words[0] == "A"]
    read = [words[1] for words in log if words[0] == "R"]
    in_doubt = set(read) - set(acked)  # read, its acknowledgement cut short by the kill
    assert len(acked) == len(set(acked))  # nothing acknowledged was delivered again
    assert read == sorted(read, key=lambda b: int(b[1:]))  # in arrival order
    mount.mount()
    bodies = [mount.read(f"agents/echo/mail/{n}").split("\n\n", 1)[1].strip()
              for n in pending(mount, "echo")]
    assert len(bodies) == len(set(bodies))  # nothing twice
    assert not set(acked) & set(bodies), "acknowledged, yet delivered again"
    missing = sent - set(acked) - set(bodies) - in_doubt
    assert not missing, f"acknowledged sends lost: {sorted(missing)[:5]}"
    # what was read and not acknowledged is pending, given again to a new open: all of
    # it but the one whose acknowledgement the kill cut short after its commit
    assert len(in_doubt - set(bodies)) <= 1, sorted(in_doubt - set(bodies))
    assert bodies, "the sender outran the receiver: something was pending"
    fd = os.open(mount.path / "agents/echo/mail/stream", os.O_RDONLY)
    try:
        shown = min(len(bodies), MAX_UNACKED)
        rows = read_lines(fd, shown, size=1 << 20)
        assert [r.split(b"\t")[2].decode() for r in rows] == bodies[:shown]
    finally:
        os.close(fd)
    print(f"sent and acknowledged {len(sent)}, acknowledged by the receiver {len(acked)}, "
          f"pending after the kill {len(bodies)}, in doubt {len(in_doubt)}, lost 0")
