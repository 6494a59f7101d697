"""What every kind of file answers to each system call, checked on a real mount against the
tables of docs/namespace.md ("System calls, file by file"), read from the doc itself: a
cell says `ok` or an errno, and the call made here must get exactly that, for every
example file of the kind. So the doc cannot drift from what fs9 does (issue 26, item 5).

One mount serves the whole module (agents, conversations and a vault set up once); a call
that changes or removes its file gets a file of its own (a fresh message, note, topic,
vault file or conversation). No read here can block: a stream is read after poll(2)
says so, or with O_NONBLOCK.
"""
import ctypes
import errno
import fcntl
import itertools
import mmap
import os
import re
import select
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO, WAIT_S, Mount, fuse_unavailable, wait_for

DOC = REPO / "docs" / "namespace.md"
SECTION = "## System calls, file by file"
SLOW_MODEL = """[models.slow]
provider = "scripted"
token_delay_s = 600   # its first word comes after the test: a reply with nothing yet
max_concurrent = 64
"""


# --- the doc's tables -------------------------------------------------------------------

def doc_cells() -> dict[tuple[str, str], tuple[str, ...]]:
    """(kind, column) -> the outcomes its cell states (`ok` or an errno name), one per
    call of the column, or one for all of them."""
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    cells = {}
    header: list[str] | None = None
    for line in section.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = row
        elif not set(line) <= set("|-: "):
            kind = re.fullmatch(r"\*\*(.+?)\*\*", row[0])
            assert kind, f"a row of the doc's tables names no **kind**: {line}"
            for column, cell in zip(header[1:], row[1:]):
                outcomes = tuple(re.findall(r"`(ok|E[A-Z0-9]+)`", cell.split(" — ")[0]))
                assert outcomes, f"cell {kind[1]} x {column} says no outcome: {cell!r}"
                cells[kind[1], column] = outcomes
    return cells


CELLS = doc_cells()


# --- the mount and its files --------------------------------------------------------------

class World:
    """The mount, with the objects the examples name: agent z (cat; a finished task),
    agent s (sleep; its task running, silent), a finished conversation."""

    def __init__(self, m: Mount) -> None:
        self.m = m
        self.names = itertools.count(1)

    def p(self, rel: str) -> Path:
        return self.m.path / rel

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self.names)}"

    def beside(self, rel: str) -> str:
        return str(Path(rel).parent / self.fresh("new"))

    # files made afresh for a call that changes them
    def conversation(self, model: str = "scripted") -> str:
        return f"models/{model}/{self.m.read(f'models/{model}/clone').strip()}"

    def message(self) -> str:
        """A new pending message to z (its name, as `ls` shows it)."""
        before = set(os.listdir(self.p("agents/z/mail")))
        self.m.write("agents/z/mail/new", "hello\n")
        return "agents/z/mail/" + (set(os.listdir(self.p("agents/z/mail"))) - before).pop()

    def note(self) -> str:
        rel = f"agents/z/memory/{self.fresh('k')}"
        self.m.write(rel, "a note\n")
        return rel

    def topic(self) -> str:
        rel = f"topics/{self.fresh('t')}"
        os.close(os.open(self.p(rel), os.O_WRONLY | os.O_CREAT, 0o644))
        return rel

    def vault_file(self) -> str:
        name = self.fresh("f")
        (self.m.vault / name).write_text("vault text\n")
        return f"vault/{name}"

    def vault_dir(self) -> str:
        name = self.fresh("d")
        (self.m.vault / name).mkdir()
        return f"vault/{name}"

    def in_flight(self) -> str:
        """A conversation whose turn is under way and has said nothing yet."""
        conv = self.conversation("slow")
        self.m.write(f"{conv}/request", "hello")
        return conv


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"cannot mount FUSE here: {reason}")
    root = tmp_path_factory.mktemp("syscalls")
    for p in [root, *root.parents]:  # agents run as their own uids (conftest's traversable_tmp)
        if str(p) in ("/", tempfile.gettempdir()):
            break
        p.chmod(p.stat().st_mode | 0o011)
    m = Mount(root)
    m.state.mkdir()
    (m.state / "models.toml").write_text(SLOW_MODEL)
    (m.vault / "docs").mkdir(parents=True)
    (m.vault / "docs/a.md").write_text("The orchard grows red apples.\n")
    m.mount()
    try:
        w = World(m)
        m.write("ctl", "spawn z cmd=cat unconfined=true provides='[\"echoing\"]'\n"
                       "spawn s cmd='sleep 600' unconfined=true\n")
        m.write("agents/z/ctl", "run hello\n")
        m.write("agents/s/ctl", "run x\n")
        wait_for(lambda: m.status("z")["done"] == "1", what="z's task done")
        wait_for(lambda: m.status("s")["state"] == "running", what="s's task running")
        w.z_task, w.s_task = m.status("z")["latest"], m.status("s")["task"]
        w.corr = dict(line.split("=", 1) for line in
                      m.read(f"agents/z/tasks/{w.z_task}/status").splitlines())["corr"]
        w.conv = w.conversation()
        m.write(f"{w.conv}/request", "hi")
        assert "you said: hi" in m.read(f"{w.conv}/reply")
        m.write("agents/z/mail/new", "deadline: +1\n\ngone soon\n")
        w.dead = "agents/z/mail/dead/" + wait_for(
            lambda: os.listdir(m.path / "agents/z/mail/dead"), what="a dead letter")[0]
        yield w
    finally:
        m.umount()
    assert not m.bugs(), "a handler hit an unexpected exception:\n" + "\n".join(m.bugs())


@dataclass
class Example:
    """A file of a kind, as the calls meet it."""
    path: Callable[[World], str]  # an existing one (afresh each call, where calls change it)
    payload: bytes = b"x\n"  # what a write says
    new: Callable[[World], str] | None = None  # a name not there yet (O_CREAT; in a dir)
    transient: bool = False  # named only while open: every open has O_CREAT
    feed: Callable[[World, str], None] | None = None  # makes data come to a reader of it
    waits: bool = False  # a read may wait: poll(2) decides whether to read


def fixed(rel: str, **kw) -> Example:
    return Example(lambda w: rel, **kw)


def at(fmt: str, **kw) -> Example:
    """A path naming the world's objects: {z_task}, {s_task}, {conv}, {corr}, {dead}."""
    return Example(lambda w: fmt.format(**vars(w)), **kw)


def in_dir(fmt: str, new: Callable[[World], str] | None = None) -> Example:
    """A directory (a path as `at` takes it); new: a name not there yet in it."""
    return Example(lambda w: fmt.format(**vars(w)),
                   new=new or (lambda w: f"{fmt.format(**vars(w))}/{w.fresh('n')}"))


def events_fed(w: World, rel: str) -> None:
    w.m.write("agents/s/ctl", "priority normal\n")  # a `priority` event


def published(w: World, rel: str) -> None:
    w.m.write(rel, "news\n")


KINDS: dict[str, list[Example]] = {
    "ctl": [fixed("ctl", payload=b"resume\n"), fixed("agents/s/ctl", payload=b"priority normal\n"),
            Example(lambda w: w.conversation() + "/ctl", payload=b"reset\n")],
    "report": [fixed("agents/s/steps", payload=b'{"kind": "note", "text": "probe"}\n'),
               at("agents/s/tasks/{s_task}/progress", payload=b"half way\n")],
    "input": [fixed("agents/z/in", payload=b"hi\n"), fixed("agents/z/mail/new", payload=b"hello\n"),
              Example(lambda w: w.conversation() + "/request", payload=b"hello\n")],
    "outbox": [Example(lambda w: "agents/s/outbox/z", payload=b"hello\n", transient=True,
                       new=lambda w: "agents/s/outbox/z"),
               Example(lambda w: f"agents/z/mail/{w.fresh('m')}", payload=b"hello\n",
                       transient=True, new=lambda w: f"agents/z/mail/{w.fresh('m')}")],
    "note": [Example(World.note, payload=b"new text\n",
                     new=lambda w: f"agents/z/memory/{w.fresh('k')}")],
    "status": [fixed(rel) for rel in (
        "status", "agents/z/status", "agents/z/manifest", "models/usage", "models/scripted/info",
        "registry/z", "registry/owners", "registry/by-capability/echoing")]
    + [at(rel) for rel in (
        "agents/z/tasks/{z_task}/status", "agents/z/tasks/{z_task}/input", "{dead}",
        "log/trace/{corr}", "{conv}/last", "{conv}/history", "{conv}/status")],
    "message": [Example(World.message)],
    "search": [fixed("search/apples"), fixed("search/status")],
    "clone": [fixed("models/scripted/clone")],
    "stream": [fixed("events", feed=events_fed, waits=True)]
    + [fixed(rel, waits=True) for rel in (
        "agents/s/out", "agents/s/err", "agents/s/mail/next", "mail/next")]
    + [at(f"agents/s/tasks/{{s_task}}/{fd}", waits=True) for fd in ("out", "err")]
    + [Example(lambda w: w.in_flight() + "/reply", waits=True)],
    "audit": [fixed("log/audit")],
    "topic": [Example(World.topic, payload=b"news\n", new=lambda w: f"topics/{w.fresh('t')}",
                      feed=published, waits=True)],
    "dir": [in_dir(rel) for rel in (
        "agents", "agents/z", "agents/z/tasks", "agents/z/tasks/{z_task}", "agents/z/mail/dead",
        "mail", "mail/dead", "log", "log/trace", "models", "models/scripted", "{conv}",
        "registry", "registry/by-capability")],
    "dir, takes files": [in_dir("agents/z/mail"), in_dir("agents/z/memory"), in_dir("topics"),
                         in_dir("agents/s/outbox", new=lambda w: "agents/s/outbox/z")],
    "vault file": [Example(World.vault_file, payload=b"more\n",
                           new=lambda w: f"vault/{w.fresh('f')}")],
    "vault dir": [Example(World.vault_dir, new=lambda w: f"{w.vault_dir()}/n")],
}
DIRS = {"dir", "dir, takes files", "vault dir"}


# --- the calls ------------------------------------------------------------------------------

def opened(w: World, ex: Example, rel: str, flags: int) -> int:
    return os.open(w.p(rel), flags | (os.O_CREAT if ex.transient else 0), 0o644)


def with_fd(w, ex, flags, use, rel=None):
    fd = opened(w, ex, rel or ex.path(w), flags)
    try:
        use(fd)
    finally:
        os.close(fd)


def just_open(flags):
    return lambda w, ex, kind: with_fd(w, ex, flags, lambda fd: None)


def create(flags):
    """O_CREAT: a name not there yet where the kind has such names, else the file itself."""
    def call(w, ex, kind):
        rel = ex.new(w) if ex.new else ex.path(w)
        os.close(os.open(w.p(rel), flags | os.O_CREAT, 0o644))
    return call


def write(flags=os.O_WRONLY):
    return lambda w, ex, kind: with_fd(w, ex, flags, lambda fd: os.write(fd, ex.payload))


def readable(fd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def read(w, ex, kind):
    """A blocking read once poll(2) says there is data; where the kind's read waits and
    nothing came, the wait itself is the answer (the read is not made)."""
    rel = ex.path(w)

    def use(fd):
        if ex.feed:
            ex.feed(w, rel)
        sure = ex.feed or not ex.waits  # data is there, or comes
        if readable(fd, WAIT_S if sure else 0.3):
            os.read(fd, 65536)
        elif sure:
            raise AssertionError(f"nothing to read in {WAIT_S:.0f} s")
    with_fd(w, ex, os.O_RDONLY, use, rel)


def read_nonblocking(w, ex, kind):
    with_fd(w, ex, os.O_RDONLY | os.O_NONBLOCK, lambda fd: os.read(fd, 65536))


def ftruncate(w, ex, kind):
    with_fd(w, ex, os.O_WRONLY, lambda fd: os.ftruncate(fd, 0))


def truncate(w, ex, kind):
    os.truncate(w.p(ex.path(w)), 0)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def mapped(share: int):
    """mmap(2) itself (Python's mmap refuses a length past the file's size): the mapping is
    made and unmade, never touched (past the size that would be SIGBUS)."""
    def use(fd):
        addr = _libc.mmap(None, 4096, mmap.PROT_READ, share, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        _libc.munmap(addr, 4096)
    return lambda w, ex, kind: with_fd(w, ex, os.O_RDONLY, use)


def poll(w, ex, kind):
    def use(fd):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLOUT)
        for _, events in poller.poll(0):
            if events & (select.POLLERR | select.POLLNVAL):
                raise AssertionError(f"poll says {events:#x}")
    with_fd(w, ex, os.O_RDONLY, use)


def made_name(w, ex, kind) -> str:
    """Where a call makes a name: inside a directory, beside a file."""
    return ex.new(w) if kind in DIRS else w.beside(ex.path(w))


def link(w, ex, kind):
    source = w.vault_file() if kind in DIRS else ex.path(w)
    os.link(w.p(source), w.p(made_name(w, ex, kind)))


def mkdir(w, ex, kind):
    os.mkdir(w.p(made_name(w, ex, kind) if kind in DIRS else ex.path(w)))


def chown(w, ex, kind):
    rel = ex.path(w)
    st = os.stat(w.p(rel))
    os.chown(w.p(rel), st.st_uid, st.st_gid)


def on_path(fn, *args):
    return lambda w, ex, kind: fn(w.p(ex.path(w)), *args)


# column of the doc -> its calls, in the order its cells list outcomes
COLUMNS: dict[str, list[Callable]] = {
    "`O_RDONLY`": [just_open(os.O_RDONLY)],
    "`O_WRONLY`": [just_open(os.O_WRONLY)],
    "`O_RDWR`": [just_open(os.O_RDWR)],
    "`O_CREAT` / `O_EXCL`": [create(os.O_WRONLY), create(os.O_WRONLY | os.O_EXCL)],
    "`O_TRUNC`": [just_open(os.O_WRONLY | os.O_TRUNC)],
    "`O_APPEND`": [write(os.O_WRONLY | os.O_APPEND)],
    "read": [read],
    "`O_NONBLOCK` read": [read_nonblocking],
    "write": [write()],
    "lseek": [lambda w, ex, kind: with_fd(w, ex, os.O_RDONLY, lambda fd: os.lseek(fd, 1, 0))],
    "`truncate` / `ftruncate`": [truncate, ftruncate],
    "mmap shared / private": [mapped(mmap.MAP_SHARED), mapped(mmap.MAP_PRIVATE)],
    "fsync": [lambda w, ex, kind: with_fd(w, ex, os.O_RDONLY, os.fsync)],
    "poll": [poll],
    "stat": [on_path(os.stat)],
    "chmod / chown": [on_path(os.chmod, 0o640), chown],
    "utimens": [on_path(os.utime)],
    "rename": [lambda w, ex, kind: os.rename(w.p(rel := ex.path(w)), w.p(w.beside(rel)))],
    "link": [link],
    "symlink": [lambda w, ex, kind: os.symlink("target", w.p(made_name(w, ex, kind)))],
    "unlink": [on_path(os.unlink)],
    "mkdir / rmdir": [mkdir, on_path(os.rmdir)],
    "getxattr / setxattr": [on_path(os.getxattr, "user.fs9.owner"),
                            on_path(os.setxattr, "user.test", b"1")],
}


def outcome(call, w, ex, kind) -> str:
    """`ok`, or the name of the errno the call got."""
    try:
        call(w, ex, kind)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def same(got: list[str], said: list[str]) -> bool:
    """Outcomes alike, errnos by number (ENOTSUP is EOPNOTSUPP on Linux)."""
    def number(name: str) -> int:
        return 0 if name == "ok" else getattr(errno, name)
    return [number(n) for n in got] == [number(n) for n in said]


def test_the_doc_and_this_test_name_the_same_kinds_and_calls():
    kinds = {kind for kind, _ in CELLS}
    assert kinds == set(KINDS), "kinds in the doc but not here, or here but not in the doc"
    for column in {column for _, column in CELLS}:
        assert column in COLUMNS, f"the doc's column {column!r} has no calls here"
    for kind in KINDS:
        missing = [c for c in COLUMNS if (kind, c) not in CELLS]
        assert not missing, f"{kind}: no cell in the doc for {missing}"
    for (kind, column), said in CELLS.items():
        assert len(said) in (1, len(COLUMNS[column])), (kind, column, said)
        unknown = [name for name in said if name != "ok" and not hasattr(errno, name)]
        assert not unknown, f"{kind} x {column}: no such errno {unknown}"


def _id(value: str) -> str:
    return value.replace(" ", "_").replace("`", "")


@pytest.mark.parametrize("kind, column", sorted(CELLS), ids=_id)
def test_each_call_gets_what_the_doc_says(world, kind, column):
    calls = COLUMNS[column]
    said = CELLS[kind, column]
    expected = list(said) * len(calls) if len(said) == 1 else list(said)
    for ex in KINDS[kind]:
        got = [outcome(call, world, ex, kind) for call in calls]
        where = ex.path(world) if not ex.transient else "(O_CREAT) " + ex.path(world)
        assert same(got, expected), \
            f"{kind} x {column} on {where}: got {got}, the doc says {expected}"
    assert world.m.alive()


def fallocate(fd: int) -> None:
    """fallocate(2) itself (glibc's posix_fallocate would write zeros where it fails)."""
    if _libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(4096)):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_the_calls_the_doc_names_outside_its_tables(world):
    """The section's prose: the calls its tables leave out, and its notes on kinds."""
    w = world
    err = lambda fn, *args: outcome(lambda *_: fn(*args), w, None, None)  # noqa: E731
    for rel, said in (("status", "EACCES"), ("events", "EACCES"), ("ctl", "ok")):
        assert err(lambda: os.close(os.open(w.p(rel), os.O_RDONLY | os.O_TRUNC))) == said, rel
    for rel in ("ctl", "status", "agents", "events"):
        assert err(os.listxattr, w.p(rel)) == "ok" and os.listxattr(w.p(rel)) == []
        assert err(os.readlink, w.p(rel)) == "EINVAL", rel
    for rel in ("agents/z", "topics", "agents/z/mail", "agents/z/memory"):
        assert err(os.mkfifo, w.p(f"{rel}/{w.fresh('fifo')}")) == "EACCES", rel
        assert err(os.mknod, w.p(f"{rel}/{w.fresh('node')}")) == "EACCES", rel
    for rel, flags in (("ctl", os.O_WRONLY), ("topics/news", os.O_WRONLY | os.O_CREAT),
                       (w.vault_file(), os.O_RDWR)):
        fd = os.open(w.p(rel), flags, 0o644)
        try:
            assert same([err(fallocate, fd)], ["EOPNOTSUPP"]), rel
        finally:
            os.close(fd)
    for rel in ("status", "events", "ctl"):
        fd = os.open(w.p(rel), os.O_RDONLY)
        try:
            assert err(fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB) == "ok", rel
        finally:
            os.close(fd)
    # outbox/TO has a name only while open: without O_CREAT there is none
    assert err(os.open, w.p("agents/s/outbox/z"), os.O_WRONLY) == "ENOENT"
    # a new name in outbox/ is an agent's
    assert err(os.open, w.p("agents/s/outbox/nobody"), os.O_WRONLY | os.O_CREAT) == "ENOENT"
    # every name in search/ is a query that exists
    for make in (os.mkdir, lambda p: os.symlink("target", p), lambda p: os.link(w.p("ctl"), p)):
        assert err(make, w.p(f"search/{w.fresh('q')}")) == "EEXIST"
    # a note written nothing is no note; an open writing nothing leaves one as it was
    assert err(lambda: os.close(os.open(w.p("agents/z/memory/empty"), os.O_WRONLY | os.O_CREAT,
                                        0o644))) == "ok"
    assert err(os.stat, w.p("agents/z/memory/empty")) == "ENOENT"
    note = w.note()
    os.close(os.open(w.p(note), os.O_WRONLY | os.O_TRUNC))
    assert w.m.read(note) == "a note\n"
