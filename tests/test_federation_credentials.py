"""Per-member NATS credentials (issue 13): `fs9 federation-keys` makes each member an
nkey and the nats-server's users; a member joins with `key=FILE`, and the server lets
it publish only as itself. The attacker here is a client of the same nats-server (as an
agent with `inet` reaching it would be) holding one member's key or none; what it tried
is judged on the member it aimed at (its log and mailboxes), never by its own errors."""
import asyncio
import errno
import os
import subprocess
import sys

import pytest

from conftest import Mount, errno_of, wait_for
from natsserver import NatsServer, binary
from test_federation import connected, log_rows, mails, mounted, status

ATTACK_S = 5  # how long one attacking call may take before it counts as refused


@pytest.fixture
def keys(tmp_path):
    """alpha, beta and gamma's keys, made by the command an operator runs."""
    folder = tmp_path / "keys"
    out = subprocess.run([sys.executable, "-m", "fs9", "federation-keys", str(folder),
                          "alpha", "beta", "gamma"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == ["alpha", "beta", "gamma"]
    assert all(os.stat(folder / f).st_mode & 0o077 == 0
               for f in ("alpha.nk", "beta.nk", "gamma.nk", "auth.conf"))
    return folder


@pytest.fixture
def nats(tmp_path, keys):
    if binary() is None:
        pytest.skip("no nats-server: `make deps` installs the pinned one "
                    "(scripts/nats-server.sh)")
    server = NatsServer(tmp_path / "nats", more=(keys / "auth.conf").read_text())
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def members(tmp_path):
    yield from mounted(tmp_path, ("alpha", "beta"))


def attack(url: str, seed: str | None, what, inbox: str = "_INBOX.alpha") -> str:
    """Run what(nc) as a client signed in with seed (or none), its replies under alpha's
    prefix (the one alpha's key may read): "ok", or why it failed."""
    import nats

    async def go():
        try:
            nc = await nats.connect(url, nkeys_seed_str=seed, allow_reconnect=False,
                                    inbox_prefix=inbox,
                                    connect_timeout=ATTACK_S, max_reconnect_attempts=0)
        except Exception as e:
            return f"connect: {e}"
        try:
            await what(nc)
            await nc.flush(timeout=ATTACK_S)
            return "ok"
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        finally:
            await nc.close()
    return asyncio.run(go())


def forged(body: bytes):
    async def publish(nc):  # a message as gamma's, to beta's echo
        await nc.jetstream().publish("fs9.fed.beta.gamma", b"id: 00000000000000f1\nfrom: "
                                     b"operator@gamma\nto: echo@beta\nclassification: public"
                                     b"\n\n" + body, timeout=ATTACK_S)
    return publish


def send(m: Mount, text: str) -> None:
    m.sh(f"printf 'classification: public\\n\\n{text}\\n' > federation/outbox/echo@beta",
         check=True)


def test_each_member_publishes_only_as_itself(nats, keys, members):
    a, b = members
    b.sh("echo 'spawn echo' > ctl", check=True)
    for m, me, peers in ((a, "alpha", ("beta",)), (b, "beta", ("alpha", "gamma"))):
        m.sh(f"echo 'join {nats.url} AS {me} key={keys / me}.nk' > federation/ctl", check=True)
        for peer in peers:  # (beta would take gamma's mail: only the key keeps it out)
            m.sh(f"echo 'peer {peer} ceiling=internal' > federation/ctl", check=True)
    connected(a, b)
    assert status(a)["key"] == f"{keys}/alpha.nk"
    alpha_seed = (keys / "alpha.nk").read_text().strip()

    # no key: not even signed in; alpha's key: not as gamma
    assert "Authorization Violation" in attack(nats.url, None, forged(b"anonymous"))
    assert "timeout" in attack(nats.url, alpha_seed, forged(b"as gamma")).lower()

    # alpha's key reads nothing of beta's: no raw subscription, no consumer of its own
    # on beta's mail, no fetch from beta's, no reply subject of beta's
    seen = []

    async def saw(msg):
        seen.append(msg.subject)

    async def snoop(nc):
        for subject in ("fs9.fed.>", "_INBOX.beta.>", "_INBOX.>"):
            await nc.subscribe(subject, cb=saw)
        await nc.flush(timeout=ATTACK_S)
        send(a, "hello")
        await asyncio.sleep(1)  # (the legit send below proves delivery went on meanwhile)

    async def steal(nc):
        js = nc.jetstream(timeout=ATTACK_S)
        await js.pull_subscribe("fs9.fed.beta.*", durable="fs9-beta", stream="FS9FED")

    async def fetch(nc):
        msg = await nc.request("$JS.API.CONSUMER.MSG.NEXT.FS9FED.fs9-beta", b'{"batch":1}',
                               timeout=ATTACK_S)
        raise AssertionError(f"fetched from beta's consumer: {msg.data!r}")

    results = [attack(nats.url, alpha_seed, f) for f in (snoop, steal, fetch)]
    assert "fetched" not in results[2] and results[1] != "ok" and results[2] != "ok"
    assert seen == []
    log = (nats.root / "nats.log").read_text()
    for subject in ("fs9.fed.>", "_INBOX.beta.>", "_INBOX.>"):
        assert f'Subscription Violation - Subject "{subject}"' in log
    assert 'Publish Violation - Subject "$JS.API.CONSUMER.MSG.NEXT.FS9FED.fs9-beta"' in log

    # beta took alpha's mail, sent with alpha's key, and nothing from gamma: FS9FED is
    # read in order, so had the forgery been stored it would be judged before the last
    send(a, "last")
    wait_for(lambda: len(mails(b, "agents/echo/mail")) == 2, timeout=60,
             what="alpha's two messages on beta")
    assert [m.split("\n\n", 1)[1] for m in mails(b, "agents/echo/mail")] == \
        ["hello\n", "last\n"]
    assert [r for r in log_rows(b, "mail_sent") if "gamma" in r.get("fed", "")] == []
    assert [r for r in log_rows(b, "fed_rejected") if r.get("origin") == "gamma"] == []
    assert 'Publish Violation - Subject "fs9.fed.beta.gamma"' in log


def test_key_files_others_could_touch_are_refused(nats, keys, members, tmp_path):
    a, _ = members
    seed = (keys / "alpha.nk").read_text()
    cases = {}  # file -> the errno join with it fails with

    def made(name: str, text: str, mode: int = 0o600, folder=None) -> str:
        path = (folder or keys) / name
        path.write_text(text)
        os.chmod(path, mode)
        return str(path)
    cases[made("open.nk", seed, 0o644)] = errno.EACCES  # others may read it
    os.symlink(keys / "alpha.nk", keys / "link.nk")
    cases[str(keys / "link.nk")] = errno.EACCES  # a symlink
    cases[made("junk.nk", "not a seed\n")] = errno.EINVAL
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # (umask): a folder anyone may swap files in
    cases[made("alpha.nk", seed, folder=shared)] = errno.EACCES
    cases["keys/alpha.nk"] = errno.EINVAL  # not absolute
    cases[str(keys / "none.nk")] = errno.ENOENT
    for path, expected in cases.items():
        got = errno_of(a.write, "federation/ctl", f"join {nats.url} AS alpha key={path}\n")
        assert got == expected, (path, got)
    assert status(a)["connection"] == "off"

    # joined with no key, the server does not let it in, and status says so
    a.write("federation/ctl", f"join {nats.url} AS alpha\n")
    wait_for(lambda: "Authorization" in status(a)["last_error"], timeout=60,
             what="the refusal in federation/status")
    assert status(a)["connection"] == "connecting" and status(a)["key"] == "none"
    # the same OS joined again with its key: in
    a.write("federation/ctl", f"join {nats.url} AS alpha key={keys}/alpha.nk\n")
    connected(a)
