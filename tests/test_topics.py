"""Topics: one write is one event; each open for reading is a subscription."""
import os
import subprocess
import time

from conftest import pending_bytes, read_until


def subscribe(mount, topic: str) -> subprocess.Popen:
    return subprocess.Popen(["cat", mount.path / "topics" / topic], stdout=subprocess.PIPE)


def test_touch_creates_a_topic_and_every_subscriber_gets_every_event_in_order(mount):
    mount.sh("touch topics/news", check=True)
    assert os.listdir(mount.path / "topics") == ["news"]
    subs = [subscribe(mount, "news") for _ in range(5)]
    mount.wait_reading(subs, "topics/news")  # each has subscribed (at open) and waits
    mount.sh("for i in 1 2 3 4 5 6 7 8 9 10; do echo \"event $i\" > topics/news; done", check=True)
    expected = b"".join(b"event %d\n" % i for i in range(1, 11))
    mount.wait_for(lambda: all(pending_bytes(p.stdout) >= len(expected) for p in subs),
                   what="every event in every subscriber's output")
    for p in subs:
        p.kill()
        assert p.stdout.read() == expected
        p.wait()
    # a subscriber sees only what is published after it opened
    # (a check that nothing comes: the past would be served at once; 2 s is ample)
    late = mount.sh("timeout 2 cat topics/news")
    assert late.returncode == 124 and late.stdout == ""


def test_writing_a_new_name_creates_the_topic_and_bad_names_are_refused(mount):
    mount.sh("echo hello > topics/fresh", check=True)
    assert "fresh" in os.listdir(mount.path / "topics")
    r = mount.sh("echo x > 'topics/bad name!'")
    assert r.returncode != 0
    assert not (mount.path / "topics/bad name!").exists()


def test_a_slow_subscriber_stalls_nobody_and_is_told_what_it_missed(mount):
    mount.sh("touch topics/firehose", check=True)
    slow = os.open(mount.path / "topics/firehose", os.O_RDONLY)  # never reads meanwhile
    fast = subscribe(mount, "firehose")
    mount.wait_reading([fast], "topics/firehose")
    start = time.monotonic()
    fd = os.open(mount.path / "topics/firehose", os.O_WRONLY)
    for i in range(3000):
        os.write(fd, b"e%d\n" % i)
    os.close(fd)
    assert time.monotonic() - start < 10  # the publisher was never blocked
    head = read_until(fast.stdout, lambda out: out.endswith(b"e2999\n"),
                      what="the fast subscriber to read the last event")
    fast.kill()
    got = (head + fast.stdout.read()).splitlines()
    fast.wait()
    assert got[:3] == [b"e0", b"e1", b"e2"] and got[-1] == b"e2999"
    first = os.read(slow, 65536).splitlines()
    os.close(slow)
    assert first[0] == b"fs9: overflow: 1976 events dropped"  # 3000 - 1024 kept
    assert first[1] == b"e1976"


def test_durable_subscription_gets_events_as_mail_even_across_a_crash(mount):
    mount.sh("touch topics/bugs && echo \"spawn triage def=echo subscribe='[\\\"bugs\\\"]'\" > ctl",
             check=True)
    mount.sh("echo 'bug 1' > topics/bugs", check=True)
    mount.kill9()
    mount.mount()
    mount.sh("echo 'bug 2' > topics/bugs", check=True)
    names = [n for n in os.listdir(mount.path / "agents/triage/mail")
             if n not in ("new", "next", "dead")]
    bodies = [mount.read(f"agents/triage/mail/{n}") for n in names]
    assert [b.split("\n\n", 1)[1] for b in bodies] == ["bug 1\n", "bug 2\n"]
    assert all("x-topic: bugs\n" in b and "type: event\n" in b for b in bodies)
    assert mount.sh("cat log/audit | grep -c '\"kind\":\"published\"'").stdout.strip() == "2"


def test_subscribers_join_and_leave_while_a_publisher_runs(mount):
    mount.sh("touch topics/busy", check=True)
    publisher = subprocess.Popen(
        ["sh", "-c", "i=0; while [ $i -lt 200 ]; do echo \"e $i\" > topics/busy; i=$((i+1));"
               " sleep 0.01; done"],
        cwd=mount.path)
    joined, heard = [], set()
    for _ in range(6):  # join, read a little, leave; repeatedly, while events flow
        p = subscribe(mount, "busy")
        mount.wait_for(lambda: pending_bytes(p.stdout) or publisher.poll() is not None,
                       what="a subscriber to read an event")
        if pending_bytes(p.stdout):
            heard.add(p)  # it joined while events flowed: it gets every later one
        joined.append(p)
        if len(joined) > 2:
            joined.pop(0).kill()
    assert publisher.wait(timeout=60) == 0
    received = []
    for p in joined:
        # one that heard events goes on to the last; one that heard none before the
        # publisher ended gets what it will get (all of it published) in one read
        head = read_until(p.stdout, lambda out: out.endswith(b"e 199\n"),
                          what="the last event") if p in heard else b""
        p.kill()
        received.append([int(line.split()[1])
                         for line in (head + p.stdout.read()).decode().splitlines()])
        p.wait()
    assert any(received), "no subscriber saw an event"
    for numbers in filter(None, received):  # each saw a gap-free run up to the last event
        assert numbers == list(range(numbers[0], 200))
    assert mount.alive() and not mount.bugs()
