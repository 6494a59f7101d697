"""Human approval as files (kernel/approvals.py): an agent's model call over its
manifest's `approval.model_tokens` waits for the operator's answer in approvals/ID,
granted, denied and timed out from a shell; kept across a remount; never visible to
an agent."""
import errno
import os

import pytest

from conftest import Events, errno_of, fuse_unavailable
from fs9.drivers import confine

pytestmark = pytest.mark.skipif(bool(fuse_unavailable()),
                                reason=f"cannot mount FUSE: {fuse_unavailable()}")

AGENT = """cmd = ["sh", "ask.sh"]
[unveil]
"models/scripted" = "rw"
"approvals" = "rw"
[approval]
model_tokens = 50
timeout_s = {timeout}
"""
# each task: one question, tried until it goes through or is denied (bounded); coreutils'
# printf names the errno of a failed write (dash's echo says "I/O error" for all)
ASK = """m=$FS9_MNT/models/scripted
id=$(cat $m/clone)
read q
i=0
while [ $i -lt 1500 ]; do
  said=$( { /usr/bin/printf '%s\n' "$q" > $m/$id/request; } 2>&1 ) && { cat $m/$id/reply; exit 0; }
  case "$said" in *"ermission denied"*) echo "denied"; exit 0;; esac
  i=$((i + 1)); sleep 0.2
done
echo "gave up"
"""


def status(m, aid: str) -> dict:
    return dict(line.split("=", 1) for line in m.read(f"approvals/{aid}/status").splitlines())


def test_approve_deny_and_time_out_through_the_files(mount):
    m = mount
    m.define("asker", AGENT.format(timeout=600), {"ask.sh": ASK})
    m.define("waiter", AGENT.format(timeout=1), {"ask.sh": ASK})
    ev = Events(m)
    m.write("ctl", "spawn asker\n")
    m.write("agents/asker/in", "hello\n")
    m.wait_for(lambda: "1" in m.sh("ls approvals").stdout.split(), what="approval 1")
    s = status(m, "1")
    assert (s["state"], s["agent"], s["action"], s["data"]) == \
        ("pending", "asker", "model_tokens", "scripted")
    assert "over approval.model_tokens = 50" in s["what"] and s["corr"]
    assert m.status("asker")["approvals_pending"] == "1"
    assert 'fs9_approvals_pending{agent="asker"} 1.0' in m.read("metrics")
    # the agent never sees an approval, though it unveils approvals/
    assert errno_of(m.read, "agents/asker/view/approvals/1/status") == errno.ENOENT
    # answered from a shell: the agent's next try goes through, once
    assert m.sh("echo approve looks fine > approvals/1/ctl").returncode == 0
    out = m.read("agents/asker/out")  # blocks until the task ends
    assert "you said: hello" in out, out
    s = status(m, "1")
    assert (s["state"], s["reason"], s["used"]) == ("approved", "looks fine", "yes")
    r = m.sh("echo deny > approvals/1/ctl")  # answered once
    assert r.returncode != 0
    # denied: the agent is told so (EACCES) and the request is spent
    m.write("agents/asker/in", "again\n")
    m.wait_for(lambda: "2" in m.sh("ls approvals").stdout.split(), what="approval 2")
    assert m.sh("echo deny too costly > approvals/2/ctl").returncode == 0
    m.wait_for(lambda: m.status("asker")["done"] == "2", what="the second task")
    assert m.read("agents/asker/out").strip() == "denied"
    assert status(m, "2")["state"] == "denied" and m.status("asker")["approvals_pending"] == ""
    # nobody answers: the deadline denies it
    m.write("ctl", "spawn waiter\n")
    m.write("agents/waiter/in", "anyone?\n")
    m.wait_for(lambda: m.status("waiter")["done"] == "1", what="the waiter's task")
    assert m.read("agents/waiter/out").strip() == "denied"
    assert status(m, "3")["state"] == "expired"
    seen = ev.until(lambda s: sum(e["kind"] == "approval_answered" for e in s) >= 3)
    ev.close()
    answers = [(e["id"], e["answer"]) for e in seen if e["kind"] == "approval_answered"]
    assert answers == [("1", "approved"), ("2", "denied"), ("3", "expired")]


# a first request small, then, once asked, the same call grown a hundred-fold
GROW = """m=$FS9_MNT/models/scripted
id=$(cat $m/clone)
read q
/usr/bin/printf '%s\\n' "$q" > $m/$id/request 2>/dev/null
big=$(yes "$q" | head -n 200 | tr '\\n' ' ')
i=0
while [ $i -lt 1500 ]; do
  said=$( { /usr/bin/printf '%s\\n' "$big" > $m/$id/request; } 2>&1 ) && { cat $m/$id/reply > /dev/null; echo went; exit 0; }
  case "$said" in *"ermission denied"*) echo "denied"; exit 0;; esac
  i=$((i + 1)); sleep 0.2
done
echo "gave up"
"""


def test_a_yes_covers_a_call_up_to_the_size_it_was_asked_for(mount):
    """A yes for a small call does not let a larger one through: the larger call retires
    it and is asked for anew, with its own size."""
    m = mount
    m.define("grower", AGENT.format(timeout=600), {"ask.sh": GROW})
    m.write("ctl", "spawn grower\n")
    m.write("agents/grower/in", "tell me about apples\n")
    m.wait_for(lambda: "1" in m.sh("ls approvals").stdout.split(), what="approval 1")
    small = int(status(m, "1")["what"].split("for up to ")[1].split()[0])
    assert m.sh("echo approve > approvals/1/ctl").returncode == 0
    m.wait_for(lambda: "2" in m.sh("ls approvals").stdout.split(),
               what="approval 2, for the grown call")
    s1, s2 = status(m, "1"), status(m, "2")
    assert (s1["state"], s1["used"]) == ("approved", "yes")
    big = int(s2["what"].split("for up to ")[1].split()[0])
    assert s2["state"] == "pending" and big > small + 500, (small, big)
    assert m.status("grower")["done"] == "0"  # nothing went through on the small yes
    # yes to each question asked (a request written in several writes is asked about at
    # its first write, its size so far, and again at close if it grew past that)
    def answered() -> bool:
        for aid in m.sh("ls approvals").stdout.split():
            if status(m, aid)["state"] == "pending":
                m.sh(f"echo approve > approvals/{aid}/ctl")
        return m.status("grower")["done"] == "1"
    m.wait_for(answered, what="the grown call done")
    assert m.read("agents/grower/out").strip() == "went"
    used = [status(m, a) for a in m.sh("ls approvals").stdout.split()]
    last = max(used, key=lambda s: int(s["id"]))
    assert last["used"] == "yes" and \
        int(last["what"].split("for up to ")[1].split()[0]) >= big


def test_a_pending_approval_survives_a_remount(mount):
    m = mount
    m.define("asker", AGENT.format(timeout=600), {"ask.sh": ASK})
    m.write("ctl", "spawn asker\n")
    m.write("agents/asker/in", "hello\n")
    m.wait_for(lambda: "1" in m.sh("ls approvals").stdout.split(), what="approval 1")
    before = status(m, "1")
    m.umount()
    m.mount()
    assert status(m, "1") == before and before["state"] == "pending"
    assert m.sh("echo approve > approvals/1/ctl").returncode == 0
    assert status(m, "1")["state"] == "approved"
    assert '"approval_answered"' in m.read("log/audit")


BOSS = ('cmd = ["cat"]\nunconfined = true\npledge = ["read", "spawn", "send"]\n'
        'spawns = ["echo"]\n[unveil]\n"ctl" = "w"\n[approval]\nspawn = true\n')


def test_an_agents_spawn_waits_for_a_yes(mount):
    m = mount
    m.define("boss", BOSS)
    m.sh("echo 'spawn boss' > ctl", check=True)
    ctl = "agents/boss/view/ctl"  # written as boss
    assert errno_of(m.write, ctl, "spawn e1 def=echo\n") == errno.EAGAIN
    s = status(m, "1")
    assert (s["state"], s["agent"], s["action"], s["data"]) == \
        ("pending", "boss", "spawn", "e1 def=echo")
    assert errno_of(m.write, ctl, "spawn e1 def=echo\n") == errno.EAGAIN  # still asked once
    assert m.sh("ls approvals").stdout.split() == ["1"]
    assert "e1" not in m.sh("ls agents").stdout.split()
    m.sh("echo approve > approvals/1/ctl", check=True)
    m.write(ctl, "spawn e1 def=echo\n")
    assert "e1" in m.sh("ls agents").stdout.split() and status(m, "1")["used"] == "yes"
    # one yes, one spawn; a denial is said once
    assert errno_of(m.write, ctl, "spawn e2 def=echo\n") == errno.EAGAIN
    m.sh("echo deny not now > approvals/2/ctl", check=True)
    # (a shell's write: Python's close would flush the refused bytes a second time)
    r = m.sh(f"/usr/bin/printf 'spawn e2 def=echo\\n' > {ctl}")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert "not now" in m.read("agents/boss/err")
    assert "e2" not in m.sh("ls agents").stdout.split()


# --- mail above a label, vault writes, llm tools; the index --------------------------

def pending_mail(m, agent: str) -> list[str]:
    return [n for n in os.listdir(m.path / f"agents/{agent}/mail")
            if n not in ("new", "next", "dead")]


def test_mail_above_a_label_waits_for_a_yes(mount):
    m = mount
    m.define("teller", 'cmd = ["cat"]\nclearance = "confidential"\n'
                       'pledge = ["read", "write", "send", "declassify"]\n'
                       '[approval]\nmail_above = "internal"\n')
    m.define("keeper", 'cmd = ["cat"]\nclearance = "confidential"\n')
    m.sh("echo 'spawn teller' > ctl && echo 'spawn keeper' > ctl", check=True)
    out = "agents/teller/outbox/keeper"  # sent as teller
    m.write(out, "classification: internal\n\nthe weather\n")  # at the label: no question
    assert len(pending_mail(m, "keeper")) == 1
    secret = "classification: confidential\n\nthe plans\n"
    assert errno_of(m.write, out, secret) == errno.EAGAIN
    s = status(m, "1")
    assert (s["state"], s["agent"], s["action"], s["data"]) == \
        ("pending", "teller", "mail_above", "to keeper confidential")
    assert "pending approval 1" in m.read("agents/teller/err")
    assert len(pending_mail(m, "keeper")) == 1  # nothing reached the recipient
    m.sh("echo approve > approvals/1/ctl", check=True)
    m.write(out, secret)
    names = pending_mail(m, "keeper")
    assert len(names) == 2 and any("the plans" in m.read(f"agents/keeper/mail/{n}")
                                   for n in names)
    assert status(m, "1")["used"] == "yes"
    assert errno_of(m.write, out, secret) == errno.EAGAIN  # one yes, one message
    m.sh("echo deny >> approvals/2/ctl", check=True)
    assert errno_of(m.write, out, secret) == errno.EACCES
    assert len(pending_mail(m, "keeper")) == 2


WRITER = 'cmd = ["cat"]\nowns = ["vault/reports"]\n[approval]\nvault_write = ["vault/reports/final"]\n'


@pytest.mark.skipif(confine.unavailable() is not None,
                    reason=f"cannot confine here: {confine.unavailable()}")
def test_a_confined_owner_writes_a_listed_path_only_through_the_question(mount):
    """An owned subtree is bound read-write from disk into its sandbox, past fs9: one
    holding a listed path is served by fs9 instead, so the agent's own program, writing
    natively, meets the question too."""
    m = mount
    (m.vault / "reports/final").mkdir(parents=True)
    m.define("writer", 'cmd = ["sh", "-c", "echo via-sandbox > '
             '\\"$FS9_MNT/vault/reports/final/q4.md\\"; echo wrote $?"]\n'
             'owns = ["vault/reports"]\n[approval]\nvault_write = ["vault/reports/final"]\n')
    m.sh("echo 'spawn writer' > ctl && echo go > agents/writer/in", check=True)
    m.wait_for(lambda: "wrote" in m.read("agents/writer/out"), what="the writer's try")
    assert "wrote 0" not in m.read("agents/writer/out")
    assert not (m.vault / "reports/final/q4.md").exists()
    s = status(m, "1")
    assert (s["state"], s["action"], s["data"]) == \
        ("pending", "vault_write", "vault/reports/final/q4.md")


def test_a_vault_write_under_a_listed_path_waits_for_a_yes(mount):
    m = mount
    (m.vault / "reports/final").mkdir(parents=True)
    m.define("writer", WRITER)
    m.sh("echo 'spawn writer' > ctl", check=True)
    v = "agents/writer/view/vault/reports"
    m.write(f"{v}/draft.md", "free to write\n")  # not under the listed path
    assert (m.vault / "reports/draft.md").read_text() == "free to write\n"
    assert errno_of(m.write, f"{v}/final/q4.md", "numbers\n") == errno.EAGAIN
    assert not (m.vault / "reports/final/q4.md").exists()
    s = status(m, "1")
    assert (s["action"], s["data"]) == ("vault_write", "vault/reports/final/q4.md")
    # from a shell, as the agent's program would: the same refusal, the same request
    r = m.sh(f"echo numbers > {v}/final/q4.md")
    assert r.returncode != 0 and m.sh("ls approvals").stdout.split() == ["1"]
    m.sh("echo approve > approvals/1/ctl", check=True)
    m.write(f"{v}/final/q4.md", "numbers\n")
    assert (m.vault / "reports/final/q4.md").read_text() == "numbers\n"
    assert errno_of(os.unlink, m.path / f"{v}/final/q4.md") == errno.EAGAIN  # a new change
    assert (m.vault / "reports/final/q4.md").exists()
    m.write("approvals/2/ctl", "deny keep it\n")
    assert errno_of(os.unlink, m.path / f"{v}/final/q4.md") == errno.EACCES
    assert (m.vault / "reports/final/q4.md").exists()
    assert "keep it" in m.read("agents/writer/err")
    # the operator writes there freely
    m.write("vault/reports/final/q4.md", "operator's\n")


def test_a_tool_call_of_the_llm_driver_asks_first(mount):
    m = mount
    m.define("tooler", 'cmd = ["cat"]\n[approval]\ntools = ["write"]\n')
    m.define("other", 'cmd = ["cat"]\n[unveil]\n"agents" = "rw"\n')
    m.sh("echo 'spawn tooler' > ctl && echo 'spawn other' > ctl", check=True)
    ask = "agents/tooler/view/agents/tooler/approve"
    m.write(ask, '{"tool": "read", "args": {"path": "vault/a"}}')  # needs no yes
    call = '{"tool": "write", "args": {"path": "vault/a", "content": "x"}}'
    assert errno_of(m.write, ask, call) == errno.EAGAIN
    s = status(m, "1")
    assert (s["action"], s["data"]) == ("tool", 'write {"content": "x", "path": "vault/a"}')
    assert errno_of(m.write, ask, "not json") == errno.EINVAL
    # another agent may not use tooler's yes, whatever it unveils
    m.sh("echo approve > approvals/1/ctl", check=True)
    assert errno_of(m.write, "agents/other/view/agents/tooler/approve", call) in \
        (errno.EPERM, errno.EACCES, errno.ENOENT)
    assert status(m, "1")["used"] == "no"
    m.write(ask, call)
    assert status(m, "1")["used"] == "yes"
    assert errno_of(m.write, ask, call) == errno.EAGAIN  # one yes, one call


def test_used_approvals_leave_memory_but_not_the_log(tmp_path):
    """The index: a gated action is one lookup; used ones are pruned to RECENT."""
    from fs9.kernel import approvals as approvals_mod
    from fs9.kernel.kernel import Kernel
    from fs9.errors import Fs9Error

    k = Kernel(str(tmp_path / "state"), str(tmp_path / "agents"))

    class Asker:  # what gate reads of an agent
        name, manifest, current = "asker", {"approval": {"spawn": True}}, None
    n = approvals_mod.RECENT + 50
    for i in range(n):
        with pytest.raises(Fs9Error) as e:
            k.approvals.gate(Asker, "spawn", f"e{i}", f"spawn e{i}", None, True)
        assert e.value.errno == errno.EAGAIN
        k.approvals.ctl(k.approvals.get(str(i + 1)), b"approve\n")
        k.approvals.gate(Asker, "spawn", f"e{i}", f"spawn e{i}", None, True)
    a = k.approvals
    assert not a.live and not a.by_action and not a.pending
    assert len(a.recent) == approvals_mod.RECENT and a.ids()[-1] == str(n)
    assert a.get("1") is None and a.get(str(n)).used
    assert sum(e.kind == "approval_used" for e in k.log.events_after(0, limit=10 * n)) == n
    # an agent asking and asking: PENDING_MAX at once, then EDQUOT, nothing logged
    for i in range(approvals_mod.PENDING_MAX):
        with pytest.raises(Fs9Error):
            k.approvals.gate(Asker, "spawn", f"x{i}", f"spawn x{i}", None, True)
    seq = k.log.last_seq
    with pytest.raises(Fs9Error) as e:
        k.approvals.gate(Asker, "spawn", "one more", "spawn one more", None, True)
    assert e.value.errno == errno.EDQUOT and k.log.last_seq == seq
    assert len(a.pending["asker"]) == approvals_mod.PENDING_MAX
    # answered no and never tried again: they do not pile up (the oldest no goes first)
    first = int(min(a.pending["asker"], key=int))
    for i in range(approvals_mod.PENDING_MAX):
        k.approvals.ctl(a.get(str(first + i)), b"deny\n")
    for i in range(approvals_mod.PENDING_MAX):
        with pytest.raises(Fs9Error) as e:
            k.approvals.gate(Asker, "spawn", f"y{i}", f"spawn y{i}", None, True)
        assert e.value.errno == errno.EAGAIN  # asked: a no of before went
    assert a.unused["asker"] == approvals_mod.PENDING_MAX == len(a.pending["asker"])
    assert all(a.get(str(first + i)).used for i in range(approvals_mod.PENDING_MAX))


def test_a_batch_carries_no_mail_that_needs_a_yes(mount):
    """mail/batch sends many messages on one write: one that needs the operator's yes
    refuses the whole write (EPERM, saying to send it through mail/new), so no batch
    sends past the question."""
    m = mount
    m.define("teller", 'cmd = ["cat"]\nclearance = "internal"\n'
                       'pledge = ["read", "write", "send"]\n[approval]\nmail_above = "internal"\n'
                       '[unveil]\n"agents/keeper/mail" = "w"\n')
    m.define("keeper", 'cmd = ["cat"]\nclearance = "confidential"\n')
    m.sh("echo 'spawn keeper' > ctl && echo 'spawn teller' > ctl", check=True)
    batch = "agents/teller/view/agents/keeper/mail/batch"
    assert errno_of(m.write, batch, "one\ntwo\n") is None  # internal: no question
    sent = len(pending_mail(m, "keeper"))
    assert errno_of(m.write, batch, "classification: confidential\n\nthree\nfour\n") \
        == errno.EPERM
    assert len(pending_mail(m, "keeper")) == sent
    assert "through mail/new" in m.read("agents/teller/err")
    assert not os.listdir(m.path / "approvals")  # (nobody was asked: nothing to approve)


# a call whose messages are a word and whose tools are thousands of tokens
TOOLED = """m=$FS9_MNT/models/scripted
id=$(cat $m/clone)
if python3 - $m/$id/request <<'PY'
import json, sys
tools = [{"type": "function", "function": {"name": f"t{i}", "description": "word " * 400,
          "parameters": {"type": "object", "properties": {}}}} for i in range(8)]
with open(sys.argv[1], "w") as f:
    f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                        "tools": tools}) + "\\n")
PY
then cat $m/$id/reply > /dev/null; echo went
else echo held; fi
"""


def test_a_calls_tools_count_toward_its_size(mount):
    """Tool definitions are prompt the provider bills: a call of a word and 3000 tokens
    of tools is over approval.model_tokens = 200, and is asked about, at its full size."""
    m = mount
    m.define("tooled", AGENT.format(timeout=600).replace("model_tokens = 50",
                                                          "model_tokens = 200"),
             {"ask.sh": TOOLED})
    m.write("ctl", "spawn tooled\n")
    m.write("agents/tooled/in", "go\n")
    m.wait_for(lambda: m.status("tooled")["done"] == "1", what="the task done")
    assert m.read("agents/tooled/out").strip() == "held", m.read("agents/tooled/err")
    asked = m.sh("ls approvals").stdout.split()
    assert len(asked) == 1, (m.read("agents/tooled/err"), m.read("err")[-800:])
    [aid] = asked
    assert int(status(m, aid)["what"].split("for up to ")[1].split()[0]) > 3000


def test_a_killed_agents_approvals_go_with_it(mount):
    """A yes is for the agent that asked: a killed agent's unused yes and its pending
    question end with it, and whoever holds its name next asks anew."""
    m = mount
    m.define("tooler", 'cmd = ["cat"]\n[approval]\ntools = ["write", "delete"]\n')
    m.write("ctl", "spawn tooler\n")
    ask = "agents/tooler/view/agents/tooler/approve"
    call = '{"tool": "write", "args": {"path": "vault/a", "content": "x"}}'
    pend = '{"tool": "delete", "args": {"path": "vault/a"}}'
    assert errno_of(m.write, ask, call) == errno.EAGAIN
    assert errno_of(m.write, ask, pend) == errno.EAGAIN
    m.sh("echo approve > approvals/1/ctl", check=True)
    m.write("ctl", "kill tooler\n")
    assert [status(m, a)["used"] for a in ("1", "2")] == ["yes", "yes"]
    assert status(m, "2")["state"] == "expired"
    m.write("ctl", "spawn tooler\n")
    assert errno_of(m.write, ask, call) == errno.EAGAIN  # asked anew: approval 3
    assert status(m, "3")["data"].startswith("write ")
    assert errno_of(m.write, "approvals/2/ctl", "approve\n") == errno.EINVAL
    assert errno_of(m.write, ask, pend) == errno.EAGAIN  # not the old one's answer
    assert m.status("tooler")["approvals_pending"] == "3,4"
