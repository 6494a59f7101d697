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


def test_a_killed_durable_subscriber_gets_no_more_and_its_name_spawned_again_does(mount):
    """Durable subscribers are the agents spawned with `subscribe` and not killed since:
    a kill stops their mail (its mailbox went with it), a spawn of the name starts it
    again, an agent without the topic in its manifest never gets it."""
    def bodies(name):
        mail = mount.path / "agents" / name / "mail"
        return sorted(mount.read(f"agents/{name}/mail/{n}").split("\n\n", 1)[1]
                      for n in os.listdir(mail) if n not in ("new", "next", "dead"))
    spawn = "echo \"spawn {} def=echo subscribe='[\\\"alerts\\\"]'\" > ctl"
    mount.sh("touch topics/alerts && " + spawn.format("watcher") + " && " + spawn.format("other")
             + " && echo 'spawn bystander def=echo' > ctl", check=True)
    mount.sh("echo one > topics/alerts && echo 'kill watcher' > ctl && "
             "echo two > topics/alerts", check=True)
    assert bodies("other") == ["one\n", "two\n"] and bodies("bystander") == []
    mount.sh(spawn.format("watcher") + " && echo three > topics/alerts", check=True)
    assert bodies("watcher") == ["three\n"]
    assert bodies("other") == ["one\n", "three\n", "two\n"]


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


def log_bytes(mount) -> int:
    """The log's size on disk: the database and its WAL."""
    return sum(os.path.getsize(p) for p in (mount.state / "log.sqlite",
                                            mount.state / "log.sqlite-wal") if p.exists())


def test_a_topic_keeps_its_retention_on_disk_too(mount):
    """A topic keeps `keep_bytes` of events (1 MiB here, set in STATE/topics.toml) in
    memory and in the log alike: 8 MiB of 64 KiB events grow the log by about 1 MiB, a
    reader that fell behind gets the kept tail, a remount replays the same tail, and the
    mail and tasks in the log are untouched."""
    (mount.state / "topics.toml").write_text("[topic.flood]\nkeep_bytes = 1048576\n")
    mount.umount()
    mount.mount()
    mount.sh("echo \"spawn up cmd='tr a-z A-Z' unconfined=true\" > ctl", check=True)
    mount.write("agents/up/mail/new", "type: event\n\nthis mail stays\n")
    mount.write("agents/up/in", "a task\n")
    assert mount.sh("cat agents/up/out", timeout=30).stdout == "A TASK\n"
    mount.sh("touch topics/flood", check=True)
    mount.umount()
    before = log_bytes(mount)
    mount.mount()

    slow = os.open(mount.path / "topics/flood", os.O_RDONLY)  # reads only after the flood
    try:
        fd = os.open(mount.path / "topics/flood", os.O_WRONLY)
        for i in range(128):  # 8 MiB, eight times what the topic keeps
            os.write(fd, b"%05d " % i + b"x" * ((64 << 10) - 7) + b"\n")
        os.close(fd)
        # the WAL, once checkpointed, shrinks back (each publish starts it over if it can)
        wal = mount.state / "log.sqlite-wal"
        mount.wait_for(lambda: mount.sh("echo tick > topics/ticks").returncode == 0
                       and wal.stat().st_size <= (4 << 20) + (1 << 20),
                       what="the WAL back within 5 MiB")
        got = read_until_quiet(slow)
    finally:
        os.close(slow)
    lines = got.split(b"\n")
    assert lines[0] == b"fs9: overflow: 112 events dropped"  # 16 of 64 KiB kept
    tail = [line[:5] for line in lines[1:] if line]
    assert tail == [b"%05d" % i for i in range(112, 128)]

    mount.umount()
    grown = log_bytes(mount) - before
    assert grown < (2 << 20), f"the log grew by {grown} bytes for a topic keeping 1 MiB"
    # a remount replays the same tail (read by a kernel on the same log, as a mount's is)
    from fs9.kernel.kernel import Kernel
    kernel = Kernel(str(mount.state), str(mount.agents))
    try:
        for event, _ in kernel.log.replay({}):
            kernel.apply(event)
        topic = kernel.bus.topics["flood"]
        dropped, withheld, events = topic.since(0, "confidential")
        assert (topic.count, dropped, withheld) == (128, 112, 0)
        assert [e[:5] for e in events] == tail
    finally:
        kernel.log.close()
    mount.mount()
    names = [n for n in os.listdir(mount.path / "agents/up/mail") if n not in ("new", "next", "dead")]
    assert [mount.read(f"agents/up/mail/{n}").split("\n\n", 1)[1] for n in names] == \
        ["this mail stays\n"]
    tasks = os.listdir(mount.path / "agents/up/tasks")
    assert [mount.read(f"agents/up/tasks/{t}/out") for t in tasks] == ["A TASK\n"]
    mount.sh("echo after > topics/flood", check=True)  # the topic goes on


def read_until_quiet(fd: int) -> bytes:
    """What a topic's reader reads until nothing more comes for a second."""
    import select
    got = b""
    while select.select([fd], [], [], 1.0)[0]:
        got += os.read(fd, 1 << 20)
    return got


def test_retention_settings_are_checked_and_per_topic():
    import errno
    import pytest
    from fs9.errors import Fs9Error
    from fs9.kernel.bus.topic import KEEP_BYTES, Retention, Topic
    r = Retention({"keep_events": 10, "topic": {"news": {"keep_bytes": 1 << 20}}})
    assert r.of("news") == {"keep_events": 10, "keep_bytes": 1 << 20}
    assert r.of("other") == {"keep_events": 10, "keep_bytes": KEEP_BYTES}
    for bad in ({"keep_bytes": 100}, {"keep_events": 0}, {"keep_bytes": "4MiB"},
                {"keep": 1}, {"topic": {"bad name": {}}}, {"topic": {"a": {"size": 1}}}):
        with pytest.raises(Fs9Error) as e:
            Retention(bad)
        assert e.value.errno == errno.EINVAL
    # a replay: events whose bodies were trimmed are counted, the rest kept
    t = Topic("news", keep_events=3)
    for seq in range(1, 6):
        t.publish(None if seq < 3 else b"e%d\n" % seq, "internal", seq)
    assert (t.count, t.oldest_seq) == (5, 3)
    assert t.since(0, "internal") == (2, 0, [b"e3\n", b"e4\n", b"e5\n"])


def test_a_bad_topics_toml_is_said_and_the_defaults_kept(mount):
    (mount.state / "topics.toml").write_text("keep_bytes = 12\n")
    mount.umount()
    mount.mount()
    errors = [line for line in mount.read("log/audit").splitlines()
              if '"kind":"topics_config_error"' in line]
    assert len(errors) == 1 and "keep_bytes must be a whole number" in errors[0]
    mount.sh("echo hello > topics/news", check=True)


def test_a_read_gets_the_events_after_its_place_whatever_is_kept():
    """Topic.since walks from the newest end: each place in and around the kept tail
    gives what a copy of the whole tail gives, withheld labels counted."""
    from fs9.kernel.bus.topic import Topic
    t = Topic("news", keep_events=5)
    for seq in range(1, 10):
        t.publish(b"e%d\n" % seq, "confidential" if seq == 8 else "internal", seq)
    kept = [(b"e%d\n" % s, "confidential" if s == 8 else "internal") for s in range(5, 10)]
    for n in range(0, 11):
        after = kept[max(0, n - 4):]
        shown = [data for data, label in after if label == "internal"]
        assert t.since(n, "internal") == (max(0, 4 - n), len(after) - len(shown), shown)
    assert t.since(7, "confidential") == (0, 0, [b"e8\n", b"e9\n"])
