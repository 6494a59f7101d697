"""Circuit breakers and retries of model calls (kernel/models/breaker.py, models.py):
a model server that fails is retried when the failure is transient, cut off after N
failures (calls refused at write(2), nothing sent), probed after its cool-down and
closed again once it answers; the state survives a remount."""
import errno

import pytest

from conftest import Events, Mount, errno_of, fuse_unavailable
from modelserver import ModelServer
from fs9.errors import Fs9Error
from fs9.kernel.models.breaker import Breaker

pytestmark = pytest.mark.skipif(bool(fuse_unavailable()),
                                reason=f"cannot mount FUSE: {fuse_unavailable()}")


def test_the_breakers_states_as_a_pure_machine():
    b = Breaker("m", failures=2, window_s=10, cooldown_s=5)
    assert b.admit(0) is None
    b.failed(0)
    assert not b.should_open(0)
    b.failed(11)  # the first is out of the window by now
    assert not b.should_open(11)
    b.failed(12)
    assert b.should_open(12)
    b.open(12, "down")
    with pytest.raises(Fs9Error) as refused:
        b.admit(16)
    assert refused.value.errno == errno.EHOSTDOWN and "down" in refused.value.text
    assert b.admit(17) == "probe"
    b.half_open()
    b.probing = object()
    with pytest.raises(Fs9Error):  # one probe at a time
        b.admit(17)
    assert b.should_open(18)  # a failure while half-open reopens it
    b.close()
    assert (b.state, b.recent(18), b.admit(18)) == ("closed", 0, None)
    assert Breaker("m", 0, 10, 5).should_open(0) is False  # 0 failures: no breaker


@pytest.fixture
def server():
    s = ModelServer()
    yield s
    s.stop()


@pytest.fixture
def configured(tmp_path):
    made = []

    def make(toml: str) -> Mount:
        m = Mount(tmp_path)
        m.state.mkdir(parents=True, exist_ok=True)
        (m.state / "models.toml").write_text(toml)
        made.append(m.mount())
        return m
    yield make
    for m in made:
        m.umount()
        assert not m.bugs(), m.bugs()


def model(server, **keys) -> str:
    return f'[models.local]\nprovider = "openai"\napi_base = "{server.url}/v1"\n' + \
        "".join(f"{k} = {v}\n" for k, v in keys.items())


def info(m: Mount) -> dict:
    return dict(line.split("=", 1) for line in m.read("models/local/info").splitlines())


def chats(server) -> int:
    return sum(p.endswith("/chat/completions") for p, _, _ in server.requests)


def ask(m: Mount, text: str) -> tuple[int, str]:
    """One call in a fresh conversation: (cat's exit status, the reply or the status
    that says why there is none)."""
    cid = m.read("models/local/clone").strip()
    m.write(f"models/local/{cid}/request", text)
    r = m.sh(f"cat models/local/{cid}/reply")
    return r.returncode, r.stdout if r.returncode == 0 else \
        m.read(f"models/local/{cid}/status")


def test_transient_failures_are_retried_others_are_not(configured, server):
    m = configured(model(server, retries=2, retry_wait_s=0.05, breaker_failures=0))
    ev = Events(m)
    code, said = ask(m, "FAIL 503 overloaded")
    assert code == 1 and "answered 503" in said
    assert chats(server) == 3  # the first try and two retries, then the error
    seen = ev.wait_kind("model_error")
    retries = [e for e in seen if e["kind"] == "model_retry"]
    assert [e["attempt"] for e in retries] == [1, 2] and "503" in retries[0]["reason"]
    assert [e["breaker"] for e in seen if e["kind"] == "model_error"] == [True]
    code, said = ask(m, "FAIL 400 malformed")  # the request's fault: no retry
    assert code == 1 and "answered 400" in said and chats(server) == 4
    assert ask(m, "fine now") == (0, "echo: fine now")
    assert info(m)["breaker"] == "none"
    ev.close()


def test_a_failing_model_is_cut_off_probed_and_closed_again(configured, server):
    m = configured(model(server, retries=0, breaker_failures=3, breaker_cooldown_s=8))
    ev = Events(m)
    for _ in range(3):
        assert ask(m, "FAIL 502 down")[0] == 1
    opened = [e for e in ev.wait_kind("breaker_opened") if e["kind"] == "breaker_opened"]
    assert opened[0]["failures"] == 3 and "502" in opened[0]["reason"]
    i = info(m)
    assert (i["breaker"], i["breaker_opened"]) == ("open", "1") and "502" in i["breaker_reason"]
    sent = chats(server)
    # refused at write(2), at once, with the reason; nothing reaches the server
    cid = m.read("models/local/clone").strip()
    assert errno_of(m.write, f"models/local/{cid}/request", "hello") == errno.EHOSTDOWN
    r = m.sh(f"echo hello > models/local/{cid}/request")
    assert r.returncode != 0 and "circuit breaker open" in m.read("err") + r.stderr
    assert chats(server) == sent
    assert "refused=2" in m.read("models/usage").splitlines()[-1]
    # after the cool-down one call probes; its failure opens the breaker again
    m.wait_for(lambda: errno_of(m.write, f"models/local/{cid}/request", "FAIL 503 still")
               is None, what="the cool-down to end")
    assert m.sh(f"cat models/local/{cid}/reply").returncode == 1
    ev.wait_kind("breaker_opened", count=1)
    assert info(m)["breaker"] == "open" and info(m)["breaker_opened"] == "2"
    # the next probe succeeds: closed, counts reset
    cid = m.read("models/local/clone").strip()
    m.wait_for(lambda: errno_of(m.write, f"models/local/{cid}/request", "back?") is None,
               what="the second cool-down to end")
    assert m.read(f"models/local/{cid}/reply") == "echo: back?"
    ev.wait_kind("breaker_closed")
    i = info(m)
    assert (i["breaker"], i["breaker_failures"]) == ("closed", "0/3")
    assert ask(m, "and again") == (0, "echo: and again")
    ev.close()
    log = m.read("log/audit")
    assert log.count('"breaker_half_open"') == 2 and log.count('"breaker_closed"') == 1


def test_an_open_breaker_stays_open_across_a_remount(configured, server):
    m = configured(model(server, retries=0, breaker_failures=2, breaker_cooldown_s=600))
    for _ in range(2):
        assert ask(m, "FAIL 500 broken")[0] == 1
    m.wait_for(lambda: info(m)["breaker"] == "open", what="the breaker to open")
    m.umount()
    m.mount()
    i = info(m)
    assert (i["breaker"], i["breaker_opened"], i["breaker_failures"]) == ("open", "1", "2/2")
    sent = chats(server)
    cid = m.read("models/local/clone").strip()
    assert errno_of(m.write, f"models/local/{cid}/request", "hello") == errno.EHOSTDOWN
    assert chats(server) == sent


AGENT = """cmd = ["sh", "ask.sh"]
[unveil]
"models/local" = "rw"
"""
ASK = """m=$FS9_MNT/models/local
for q in hello "FAIL 503 down" "FAIL 503 down" "anyone?"; do
  id=$(cat $m/clone)
  echo "$q" > $m/$id/request || { echo "refused: $q"; continue; }
  cat $m/$id/reply; echo
done
"""


def test_an_agent_sees_the_breaker_in_its_status_and_metrics(configured, server):
    m = configured(model(server, retries=0, breaker_failures=2, breaker_cooldown_s=600))
    m.define("asker", AGENT, {"ask.sh": ASK})
    m.write("ctl", "spawn asker\n")
    m.write("agents/asker/in", "go\n")
    out = m.read("agents/asker/out")  # blocks until the task ends
    assert "echo: hello" in out and "refused: anyone?" in out, out
    st = m.status("asker")
    assert (st["model_refused"], st["breakers_open"]) == ("1", "local")
    assert "circuit breaker open" in m.read("agents/asker/err")
    metrics = m.read("metrics")
    assert 'fs9_model_breaker{model="local",state="open"} 1.0' in metrics
    assert chats(server) == 3
