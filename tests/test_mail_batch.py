"""Mail in batches (kernel/bus/batch.py): many messages a write of mail/batch, many a read,
many acknowledged a write of mail/ack; the guarantees of mail/new, next and rm."""
import errno
import json
import os
import subprocess

import pytest

from conftest import Mount
from midstream import killed_mid_stream
from test_faults import fill, small_disks  # noqa: F401  (a fixture)


def pending(mount, agent: str) -> list[str]:
    return [n for n in os.listdir(mount.path / f"agents/{agent}/mail")
            if n not in ("new", "next", "dead")]


def test_a_batch_from_the_shell_sent_read_and_acknowledged(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    r = mount.sh("printf 'one\\ntwo\\tand\\\\ three\\n\\nlast' > agents/echo/mail/batch"
                 " && printf 'priority: high\\n\\nfirst a\\nfirst b\\n' > agents/echo/mail/batch"
                 " && ls agents/echo/mail", check=True)
    names = r.stdout.split()
    assert len(names) == 8 and names[5:] == ["dead", "new", "next"]  # batch, ack: unlisted
    assert [n.split("-")[1] for n in names[:5]] == ["high"] * 2 + ["normal"] * 3
    lines = mount.read("agents/echo/mail/batch").splitlines()
    rows = [line.split("\t", 2) for line in lines]
    assert [body for _, _, body in rows] == ["first a", "first b", "one", "two\\tand\\\\ three",
                                             "last"]  # delivery order; escaped to one line
    assert {sender for _, sender, _ in rows} == {"operator"}
    ids = [i for i, _, _ in rows]
    head = mount.read(f"agents/echo/mail/{ids[2]}")
    assert head.endswith("\n\none\n") and f"id: {ids[2]}" in head
    mount.sh(f"echo {ids[0]} {ids[1]} > agents/echo/mail/ack", check=True)
    assert pending(mount, "echo") == names[2:5]
    # an id not pending refuses the whole write: nothing acknowledged
    with pytest.raises(FileNotFoundError):
        mount.write("agents/echo/mail/ack", f"{ids[2]} {ids[0]}\n")
    assert pending(mount, "echo") == names[2:5]
    audit = [json.loads(line) for line in mount.read("log/audit").splitlines()]
    kinds = [e["kind"] for e in audit]
    assert kinds.count("mail_sent") == 5 and kinds.count("mail_acked") == 2
    # 5 in the batch; the file read after it rereads one of them: on the record already
    assert kinds.count("mail_delivered") == 5 and "refused" in kinds


def test_a_bad_line_refuses_its_write_and_sends_none_of_it(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    for head in ("type: work_request", "priority: urgent", "idempotency-key: k"):
        with pytest.raises(OSError) as e:
            mount.write("agents/echo/mail/batch", f"{head}\n\nx\ny\n")
        assert e.value.errno == errno.EINVAL
    assert pending(mount, "echo") == []
    assert "work_request" in mount.read("agents/echo/err")


def test_reading_a_batch_waits_for_mail_and_acknowledges_nothing(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    with subprocess.Popen(["cat", mount.path / "agents/echo/mail/batch"],
                          stdout=subprocess.PIPE, text=True) as reader:
        mount.wait_reading([reader], "agents/echo/mail/batch")
        assert reader.poll() is None
        mount.write("agents/echo/mail/batch", "a\nb\n")
        out, _ = reader.communicate(timeout=30)
    assert [line.split("\t")[2] for line in out.splitlines()] == ["a", "b"]
    assert len(pending(mount, "echo")) == 2  # read is not acknowledged: delivered again
    assert mount.read("agents/echo/mail/batch") == out


def test_only_the_owner_acknowledges_in_a_view(mount):
    mount.define("peer", 'cmd = ["sleep", "600"]\n[unveil]\n"agents/echo/mail" = "w"\n')
    mount.sh("echo 'spawn echo' > ctl && echo 'spawn peer' > ctl", check=True)
    mount.write("agents/echo/mail/batch", "x\n")
    (msg_id,) = [line.split("\t")[0] for line in
                 mount.read("agents/echo/mail/batch").splitlines()]
    with pytest.raises(OSError) as e:
        mount.write("agents/peer/view/agents/echo/mail/ack", msg_id)
    assert e.value.errno == errno.EACCES
    assert len(pending(mount, "echo")) == 1
    mount.write("agents/peer/view/agents/echo/mail/batch", "from peer\n")  # sending: allowed
    rows = [line.split("\t") for line in mount.read("agents/echo/mail/batch").splitlines()]
    assert [(r[1], r[2]) for r in rows] == [("operator", "x"), ("peer", "from peer")]


SENDER = """
import os, sys
box, k = sys.argv[1], 20
i = 0
fd = os.open(box + "/batch", os.O_WRONLY)
while True:
    try:
        os.write(fd, "".join(f"n{j}\\n" for j in range(i, i + k)).encode())
    except OSError:
        break
    print(*range(i, i + k), flush=True)  # acknowledged: the write returned
    i += k
"""

RECEIVER = """
import os, sys
box = sys.argv[1]
while True:
    try:
        with open(box + "/batch") as f:
            rows = [line.split("\\t") for line in f.read().splitlines()]
        print("R", *(body for _, _, body in rows), flush=True)  # read, not yet acknowledged
        fd = os.open(box + "/ack", os.O_WRONLY)
        try:
            os.write(fd, " ".join(i for i, _, _ in rows).encode())
        finally:
            os.close(fd)
    except OSError:
        break
    print("A", *(body for _, _, body in rows), flush=True)  # acknowledged
"""


def test_kill_9_in_the_middle_of_a_stream_of_batches(mount):
    mount.sh("echo 'spawn echo' > ctl", check=True)
    box = str(mount.path / "agents/echo/mail")
    said_sender, said_receiver = killed_mid_stream(mount, SENDER, RECEIVER, box, 20, 5,
                                                   "20 batches sent and 5 acknowledged")
    sent = {f"n{i}" for line in said_sender for i in line.split()}
    log = [line.split() for line in said_receiver]
    acked = [body for words in log if words[0] == "A" for body in words[1:]]
    in_doubt = {body for words in log if words[0] == "R" for body in words[1:]} - set(acked)
    assert len(sent) > 400 and len(acked) > 5
    assert len(acked) == len(set(acked))  # nothing acknowledged was delivered again
    mount.mount()
    bodies = [mount.read(f"agents/echo/mail/{n}").split("\n\n", 1)[1].strip()
              for n in pending(mount, "echo")]
    assert len(bodies) == len(set(bodies))  # nothing twice
    assert not set(acked) & set(bodies)  # acknowledged: gone for good
    missing = sent - set(acked) - set(bodies) - in_doubt
    assert not missing, f"acknowledged sends lost: {sorted(missing)[:5]}"
    assert bodies == sorted(bodies, key=lambda b: int(b[1:]))  # still in arrival order


def test_a_batch_the_full_state_disk_refuses_leaves_none_of_its_messages(small_disks, tmp_path):
    statefs, vaultfs = small_disks
    m = Mount(tmp_path)
    m.state, m.vault = statefs / "state", vaultfs / "vault"
    m.mount()
    try:
        m.sh("echo 'spawn echo' > ctl", check=True)
        filler = fill(statefs)
        lines = "".join(f"b{i:05d} {'x' * 180}\n" for i in range(300))  # ~60 KiB a write
        sent, refused = 0, None
        for _ in range(200):  # until the log must grow (the WAL may have room left)
            try:
                m.write("agents/echo/mail/batch", lines)
                sent += 300
            except OSError as e:
                refused = e.errno
                break
        assert refused == errno.ENOSPC, f"no ENOSPC after {sent} messages"
        assert len(pending(m, "echo")) == sent  # none of the refused write's messages
        filler.unlink()
        m.write("agents/echo/mail/batch", "after\n")
        m.kill9()
        m.mount()
        assert len(pending(m, "echo")) == sent + 1  # and so after a replay
    finally:
        m.umount()


def test_lines_begun_in_open_batches_count_against_the_agents_cap(mount):
    """A line not yet ended is held by fs9 until its newline or close: an agent's open
    batches hold at most what its open files may (64 MiB, EDQUOT past it); a close
    gives the room back."""
    mount.define("a", 'cmd = ["sleep", "600"]\n')
    mount.sh("echo 'spawn a' > ctl", check=True)
    path = mount.path / "agents/a/view/agents/a/mail/batch"
    part = b"x" * ((1 << 20) - 1)  # one line short of a message's most, no newline
    files, refused = [], None
    try:
        for _ in range(80):
            f = open(path, "wb", buffering=0)
            files.append(f)
            try:
                f.write(part)
            except OSError as e:
                refused = e.errno
                break
        assert refused == errno.EDQUOT and 60 <= len(files) <= 66, (refused, len(files))
    finally:
        for f in files:
            try:
                f.close()
            except OSError:
                pass  # (the refused one: its close sends nothing)
    f = open(path, "wb", buffering=0)
    try:
        assert f.write(part) == len(part)  # the room is back
    finally:
        try:
            f.close()
        except OSError as e:  # (its line sent at close: the agent's mail rate may say
            assert e.errno == errno.EAGAIN  # wait, after the 60-odd MiB just sent)


def test_the_operators_results_read_and_acknowledged_in_batches(mount):
    mount.sh("echo 'spawn upper' > ctl", check=True)
    for word in ("one", "two", "three"):
        mount.write("agents/upper/mail/new", f"type: work_request\n\n{word}\n")
    mount.wait_for(lambda: len(root_pending(mount)) == 3, what="three results")
    rows = [line.split("\t") for line in mount.read("mail/batch").splitlines()]
    assert sorted(body for _, _, body in rows) == ["ONE", "THREE", "TWO"]
    assert {sender for _, sender, _ in rows} == {"upper"}
    assert root_pending(mount) == sorted(root_pending(mount)) and len(root_pending(mount)) == 3
    with pytest.raises(FileNotFoundError):  # one not pending: nothing acknowledged
        mount.write("mail/ack", f"{rows[0][0]} no-such-id\n")
    assert len(root_pending(mount)) == 3
    mount.sh(f"echo {rows[0][0]} {rows[1][0]} > mail/ack", check=True)
    assert len(root_pending(mount)) == 1
    mount.kill9()  # acknowledged before the write returned: gone for good
    mount.mount()
    (left,) = root_pending(mount)
    assert mount.read(f"mail/{left}").endswith(f"\n\n{rows[2][2]}\n")
    assert sorted(os.listdir(mount.path / "mail")) == sorted(["dead", "next", left])
    kinds = [json.loads(line)["kind"] for line in mount.read("log/audit").splitlines()]
    assert kinds.count("mail_acked") >= 2 + 3  # the kernel's acks of the requests, and ours


def test_an_agent_never_acknowledges_the_operators_mail(mount):
    mount.define("peer", 'cmd = ["sleep", "600"]\n[unveil]\n"mail" = "rw"\n')
    mount.sh("echo 'spawn upper' > ctl && echo 'spawn peer' > ctl", check=True)
    mount.write("agents/upper/mail/new", "type: work_request\n\nx\n")
    mount.wait_for(lambda: len(root_pending(mount)) == 1, what="a result")
    (msg_id,) = [line.split("\t")[0] for line in mount.read("mail/batch").splitlines()]
    # unveiled to it, the operator's mailbox reads as next does; acknowledging is not its
    assert mount.read("agents/peer/view/mail/batch").startswith(msg_id + "\t")
    with pytest.raises(OSError) as e:
        mount.write("agents/peer/view/mail/ack", msg_id)
    assert e.value.errno == errno.EACCES
    with pytest.raises(OSError) as e:  # nor by rm
        os.unlink(mount.path / "agents/peer/view/mail" / msg_id)
    assert e.value.errno == errno.EACCES
    assert len(root_pending(mount)) == 1


def root_pending(mount) -> list[str]:
    return [n for n in os.listdir(mount.path / "mail") if n not in ("next", "dead")]
