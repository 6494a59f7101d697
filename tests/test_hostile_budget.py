"""Model budgets hold under concurrency (issue 20, item 6): an admitted call reserves
its prompt plus its max_tokens until it ends, so concurrent requests cannot all be
admitted against the same room; and an agent working for a sender spends the
sender's budget too."""
import errno
import threading

import pytest

from conftest import Mount, errno_of, fuse_unavailable

pytestmark = pytest.mark.skipif(bool(fuse_unavailable()),
                                reason=f"cannot mount FUSE: {fuse_unavailable()}")
PROMPT = " ".join(f"word{i}" for i in range(30)) + "\n"


@pytest.fixture
def slow_model(tmp_path):
    m = Mount(tmp_path)
    m.state.mkdir(parents=True, exist_ok=True)
    (m.state / "models.toml").write_text(
        '[limits]\ntokens_per_day = 400\n'
        '[models.slow]\nprovider = "scripted"\ntoken_delay_s = 0.02\n')
    m.mount()
    yield m
    m.umount()
    assert not m.bugs(), m.bugs()


def usage_total(m: Mount) -> int:
    line = [x for x in m.read("models/usage").splitlines() if x.startswith("total ")][0]
    fields = dict(w.split("=", 1) for w in line.split()[1:])
    return int(fields["tokens_in"]) + int(fields["tokens_out"])


def test_eight_concurrent_requests_stay_within_the_daily_budget(slow_model):
    m = slow_model
    convs = [m.read("models/slow/clone").strip() for _ in range(8)]
    errors: dict[str, int | None] = {}
    start = threading.Barrier(8)

    def ask(cid):
        start.wait()
        errors[cid] = errno_of(m.write, f"models/slow/{cid}/request", PROMPT)
    threads = [threading.Thread(target=ask, args=(c,)) for c in convs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    admitted = [c for c, e in errors.items() if e is None]
    assert admitted and all(errors[c] == errno.EDQUOT for c in convs if c not in admitted)
    assert len(admitted) < 8  # the room was reserved by the first ones
    for cid in admitted:
        m.read(f"models/slow/{cid}/reply")  # to its end
    m.wait_for(lambda: all("state=done" in m.read(f"models/slow/{c}/status")
                           or "state=failed" in m.read(f"models/slow/{c}/status")
                           for c in admitted), 30, "the calls to end")
    # the estimate (4 characters a token) may differ from the model's count a little;
    # before reservations, 8 calls spent 1,768 tokens of a 400 budget
    assert usage_total(m) <= 400 * 1.25, m.read("models/usage")


def test_work_mailed_to_an_llm_agent_spends_the_senders_budget(tmp_path):
    from fs9.drivers import confine
    if confine.unavailable():
        pytest.skip(f"llm agents are confined: {confine.unavailable()}")
    m = Mount(tmp_path)
    m.define("asker", 'cmd = ["cat"]\nunconfined = true\npledge = ["read", "send"]\n'
                      '[budget]\ntokens_per_day = 5\n[unveil]\n"agents/helper/mail" = "rw"\n')
    m.define("helper", 'driver = "llm"\nmodel = "scripted"\n')
    m.mount()
    try:
        m.sh("echo 'spawn asker' > ctl; echo 'spawn helper' > ctl", check=True)
        m.write("agents/asker/view/agents/helper/mail/new",
                "type: work_request\n\n" + PROMPT)
        refused = m.wait_for(lambda: [line for line in m.read("log/audit").splitlines()
                                      if '"kind":"model_refused"' in line], 60,
                             "the helper's call refused on the asker's budget")
        assert "agent asker" in refused[0]
        assert m.status("helper")["model_refused"] == "1"
    finally:
        m.umount()
    assert not m.bugs(), m.bugs()
