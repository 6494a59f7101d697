"""Search against hostile agents and hostile vaults (issue 20): real mounts, real
confined agents.

  - an agent owning vault/x swaps a folder the index knows for a symlink to the state
    directory (the models' API key) or to a root-only directory of the host: no search
    answer shows a line of either, and the folder's documents leave the index;
  - names Linux allows but text does not (not UTF-8, a newline, a tab, a backslash) are
    indexed and answered, escaped (`\\xHH`, `\\n`, `\\t`, `\\\\`), never a forged line;
  - a search over a dozen 4 MiB files does not hold the event loop (`cat status` answers
    meanwhile), stays within its budget and says so; an agent's concurrent searches are
    capped (EAGAIN), the operator's are not.
"""
import errno
import os
import re
import threading
import time

import pytest

from conftest import Mount, fuse_unavailable
from fs9.drivers import confine

SECRET_KEY = "sk-fs9-WOMBATKEY-4242"  # STATE/models.toml: the model's API key
ROOT_ONLY = "NARWHALROOT-7777"  # a root 0600 file in a root 0700 directory of the host
HIT = re.compile(r"\d+\.\d{3} vault/\S")  # every line of an answer but fs9's notes

ATTACK = r"""
cd "$FS9_MNT/vault/x" || exit 2
mkdir d d2
printf 'api_key = "decoy"\nwombatkey narwhalroot\n' > d/models.toml
printf 'zebracorn decoy\n' > d2/models.toml
i=0
until grep -q 'vault/x/d/models.toml' "$FS9_MNT/search/api_key" &&
      grep -q 'vault/x/d2/models.toml' "$FS9_MNT/search/zebracorn"; do
  i=$((i + 1))
  if [ $i -gt 300 ]; then echo "NEVER INDEXED"; cat "$FS9_MNT/search/status"; exit 3; fi
  sleep 0.1
done
echo INDEXED
rm -r d d2
ln -s "$STATE" d
ln -s "$HOSTDIR" d2
sleep 1
for q in api_key zebracorn wombatkey narwhalroot 'api_key zebracorn'; do
  echo "=== $q"
  cat "$FS9_MNT/search/$q"
done
echo DONE
"""


@pytest.fixture
def keyed_mount(tmp_path):
    """A mount whose state directory holds a models.toml with an API key in it."""
    reason = fuse_unavailable() or confine.unavailable()
    if reason:
        pytest.skip(f"needs FUSE and confinement: {reason}")
    m = Mount(tmp_path)
    m.state.mkdir(parents=True)
    (m.state / "models.toml").write_text(
        f'[models.remote]\nprovider = "openai"\napi_base = "http://127.0.0.1:9/v1"\n'
        f'api_key = "{SECRET_KEY}"\n')
    m.vault.mkdir()
    (m.vault / "x").mkdir()
    m.mount()
    yield m
    m.umount()
    assert not m.bugs(), m.bugs()


def search(mount, query: str, root: str = "") -> str:
    return mount.read(f"{root}search/{query}")


def status(mount, root: str = "") -> dict[str, str]:
    return dict(line.split("=", 1) for line in search(mount, "status", root).splitlines())


def run_task(mount, agent: str, data: str, timeout: float = 60) -> str:
    """Queue data as agent's task, wait for it to end, return its stdout (+ stderr)."""
    mount.write(f"agents/{agent}/in", data)
    mount.wait_for(lambda: (s := mount.status(agent))["done"] != "0" or s["failed"] != "0",
                   timeout=timeout, what=f"{agent}'s task")
    st = mount.status(agent)
    task = st["latest"]
    return (mount.read(f"agents/{agent}/tasks/{task}/out") +
            mount.read(f"agents/{agent}/tasks/{task}/err"))


def test_a_symlink_swapped_in_shows_nothing_outside_the_vault(keyed_mount, tmp_path):
    m = keyed_mount
    host = tmp_path / "hostroot"  # root 0700, its file root 0600
    host.mkdir(mode=0o700)
    (host / "models.toml").write_text(f"zebracorn {ROOT_ONLY}\napi_key {ROOT_ONLY}\n")
    (host / "models.toml").chmod(0o600)
    m.define("squatter", f'cmd = ["sh", "attack.sh"]\npledge = ["read", "write"]\n'
                         f'owns = ["vault/x"]\n'
                         f'env = {{ STATE = "{m.state}", HOSTDIR = "{host}" }}\n'
                         f'[unveil]\n"search" = "r"\n', {"attack.sh": ATTACK})
    m.write("ctl", "spawn squatter\n")
    out = run_task(m, "squatter", "go\n")
    assert "INDEXED" in out and "DONE" in out, out
    leaked = [line for line in out.splitlines() if SECRET_KEY in line or ROOT_ONLY in line]
    assert not leaked, f"the agent's searches showed files outside the vault: {leaked}"
    # the operator, and the agent's view read by the operator, see nothing of them either
    for root in ("", "agents/squatter/view/"):
        for query in ("api_key", "zebracorn", "wombatkey", "narwhalroot", "sk fs9 4242"):
            answer = search(m, query, root)
            assert SECRET_KEY not in answer and ROOT_ONLY not in answer, (root, query, answer)
            assert "vault/x/d" not in answer, (root, query, answer)
    # ... and the swapped folders' documents left the index
    m.wait_for(lambda: status(m)["docs"] == "0" and status(m)["pending"] == "0", timeout=5,
               what=f"the index to drop vault/x/d*: {status(m)}")
    assert status(m, "agents/squatter/view/")["docs"] == "0"
    # a restart (a full scan of the vault) does not bring them back
    m.umount()
    m.mount()
    m.wait_for(lambda: status(m)["ready"] == "yes", timeout=20, what="the index")
    assert status(m)["docs"] == "0"
    answer = search(m, "api_key zebracorn wombatkey narwhalroot")
    assert SECRET_KEY not in answer and ROOT_ONLY not in answer and answer == "", answer


NAMES = {  # name on disk -> as search prints it (after vault/)
    b"caf\xe9 ocelot.md": r"caf\xe9 ocelot.md",  # Latin-1: not UTF-8
    b"a\n9.999 forged.md:1 pwned.md": r"a\n9.999 forged.md:1 pwned.md",  # a forged line
    b"tab\there\\x.md": r"tab\there\\x.md",
    "d\u00e9j\u00e0 vu.md".encode(): "d\u00e9j\u00e0 vu.md",  # UTF-8: as it is
    b"bell\x07\xe2\x80\xa8.md": r"bell\x07\u2028.md",  # a control, a line separator
}


def test_any_name_is_answered_escaped(mount):
    vault = os.fsencode(mount.vault)
    sub = vault + b"/n\xff"  # a folder whose name is not UTF-8 either
    os.mkdir(sub)
    for name in NAMES:
        with open(vault + b"/" + name, "wb") as f:
            f.write(b"first line\nan ocelot \x1b[2Jhides here\tyes\n")
    with open(sub + b"/deep.md", "wb") as f:
        f.write(b"ocelot deep\n")
    expected = {r"vault/n\xff/deep.md:1"} | {f"vault/{shown}:2" for shown in NAMES.values()}

    def answer():
        with open(mount.path / "search" / "ocelot", "rb") as f:
            return f.read()
    mount.wait_for(lambda: answer().count(b"\n") == len(expected), timeout=20,
                   what="every name indexed")
    raw = answer()
    text = raw.decode("utf-8")  # valid UTF-8, no EIO
    lines = text.splitlines()
    assert len(lines) == len(expected) and all(HIT.match(line) for line in lines), lines
    for where in expected:  # each once, right after its score
        found = [line.split(" ", 1)[1] for line in lines
                 if line.split(" ", 1)[1].startswith(where + " ")]
        assert len(found) == 1, (where, lines)
        if where.endswith(":2"):  # the snippet's control character escaped, its tab kept
            assert found[0] == f"{where} an ocelot \\x1b[2Jhides here\tyes", found
    assert not any(line.startswith("9.999") for line in lines)
    # an agent's view searches them too
    mount.define("reader", 'cmd = ["cat"]\nunconfined = true\npledge = ["read"]\n'
                           '[unveil]\n"vault" = "r"\n"search" = "r"\n')
    mount.write("ctl", "spawn reader\n")
    assert mount.read("agents/reader/view/search/ocelot") == text
    assert status(mount)["docs"] == str(len(expected))


BIG = 12  # files
LINE = b"walrus " + b"-" * 56 + b"\n"  # 64 bytes, one term: cheap to index, not to snippet


def test_a_heavy_search_does_not_hold_the_event_loop(mount):
    (mount.vault / "big").mkdir()
    body = LINE * ((4 << 20) // len(LINE))
    for i in range(BIG):
        (mount.vault / "big" / f"b{i:02d}.md").write_bytes(body)
    mount.wait_for(lambda: status(mount).get("docs") == str(BIG) and
                   status(mount)["pending"] == "0", timeout=120, what="the big files indexed")
    mount.define("reader", 'cmd = ["cat"]\nunconfined = true\npledge = ["read"]\n'
                           '[unveil]\n"vault" = "r"\n"search" = "r"\n')
    mount.write("ctl", "spawn reader\n")

    answers, errors = {}, {}

    def query(key, path):
        """Read to EOF with read(2) itself (Python's buffered files take EAGAIN for
        "no data yet" and return None)."""
        try:
            fd = os.open(mount.path / path, os.O_RDONLY)
            try:
                data = b""
                while chunk := os.read(fd, 1 << 16):
                    data += chunk
            finally:
                os.close(fd)
            answers[key] = data.decode()
        except OSError as e:
            errors[key] = e.errno

    # the operator's cat status meanwhile: answered at once, again and again
    done, waits = threading.Event(), []

    def cat_status():
        while not done.is_set():
            t0 = time.monotonic()
            mount.read("status")
            waits.append(time.monotonic() - t0)
            time.sleep(0.05)
    t0 = time.monotonic()
    searches = [threading.Thread(target=query, args=(f"op{i}", f"search/walrus {i}"))
                for i in range(2)]
    searches += [threading.Thread(target=query, args=(f"ag{i}",
                                                      f"agents/reader/view/search/walrus {i}"))
                 for i in range(6)]
    watcher = threading.Thread(target=cat_status)
    watcher.start()
    for t in searches:
        t.start()
    for t in searches:
        t.join(timeout=120)
    took = time.monotonic() - t0
    done.set()
    watcher.join()
    assert len(waits) >= 3 and max(waits) < 1.0, \
        f"cat status waited {max(waits):.2f} s while searches ran ({took:.1f} s)"
    # the operator is never capped; an agent runs at most 4 searches at once
    assert "op0" in answers and "op1" in answers, errors
    assert set(errors.values()) <= {errno.EAGAIN} and 1 <= len(errors) <= 2, errors
    for key, text in answers.items():
        note, *hits = text.splitlines()
        assert note.startswith("fs9: ") and "budget" in note, text
        assert len(hits) == BIG and all(HIT.match(h) for h in hits), text
        assert any(h.split(" ", 2)[1].endswith(":1") and h.endswith("walrus " + "-" * 56)
                   for h in hits), text  # some got a snippet
        assert any(len(h.split(" ")) == 2 for h in hits), text  # and some did not
    print(f"searches: {took:.1f} s for {len(searches)}; cat status: max "
          f"{max(waits) * 1000:.0f} ms over {len(waits)}")
