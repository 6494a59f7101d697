"""A thin Python client of a mounted fs9: plain file I/O, no protocol of its own.

Every call is one file operation a shell user could do (the docstrings say which, from
the mount point); README "Use fs9 from Python". `Mount(path).as_agent(NAME)` acts
through `agents/NAME/view/` (the operator's window on NAME's view), so fs9 treats each
call as NAME's: what NAME's view hides is ENOENT, a missing pledge EACCES.

Paths are resolved beneath the mount's directory with no symlink followed (ELOOP),
as fs9 does for the vault: a program acting as root for an agent (`fs9 mcp`) must not
follow a link the agent planted to a host file. Blocking reads (streams) poll a
non-blocking descriptor, so every wait has a timeout. OSError only.
"""
import codecs
import errno
import json
import os
import select
import stat
import threading
import time
from dataclasses import dataclass

from . import resolve

_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def _names(rel: str) -> list[bytes]:
    """rel as names beneath the root: EINVAL for "..", "." or an empty name."""
    names = [os.fsencode(n) for n in rel.strip("/").split("/")] if rel.strip("/") else []
    if any(n in (b"", b".", b"..") or b"\0" in n for n in names):
        raise OSError(errno.EINVAL, "a path beneath the mount: no '', '.', '..' or NUL", rel)
    return names


@dataclass
class Message:
    """One mail message: its file name, headers and body."""
    name: str
    headers: dict[str, str]
    body: str


def parse_message(name: str, text: str) -> Message:
    head, sep, body = text.partition("\n\n")
    if not sep:
        return Message(name, {}, text)
    headers = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
    return Message(name, headers, body)


class Mount:
    """A mounted fs9 (the operator's), or one agent's view of it (`as_agent`)."""

    def __init__(self, path: str, agent: str | None = None) -> None:
        self.root = os.path.abspath(path)
        self.agent = agent  # None: the operator
        self._submitting = threading.Lock()  # one `run` at a time finds its own task

    def as_agent(self, name: str) -> "Mount":
        """The same mount as NAME sees it: `cd agents/NAME/view`."""
        if len(_names(name)) != 1:
            raise OSError(errno.EINVAL, "an agent's name is one file name", name)
        return Mount(os.path.join(self.root, "agents", name, "view"), agent=name)

    # --- files: open, read, write, list ------------------------------------------
    def open(self, rel: str, flags: int, mode: int = 0o644) -> int:
        """An fd of rel beneath the root, no symlink followed on the way or at the end."""
        names = _names(rel)
        rootfd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not names:
                return os.open(".", flags | _FLAGS, dir_fd=rootfd)
            parent = resolve.directory_beneath(rootfd, b"/".join(names[:-1])) \
                if len(names) > 1 else os.dup(rootfd)
            try:
                return os.open(names[-1], flags | _FLAGS, mode, dir_fd=parent)
            finally:
                os.close(parent)
        except OSError as e:  # name the path asked for, not the part that failed
            raise OSError(e.errno, os.strerror(e.errno), rel) from None
        finally:
            os.close(rootfd)

    def read(self, rel: str) -> str:
        """`cat REL`: a status, ctl or vault file (a stream: EAGAIN; use `stream`)."""
        fd = self.open(rel, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO would block; a device...
                raise OSError(errno.EINVAL, "not a regular file", rel)
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="replace")
        finally:
            os.close(fd)

    def write(self, rel: str, data: str | bytes, append: bool = False) -> None:
        """`printf %s DATA > REL` (`>>` with append): one write, then close."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | (os.O_APPEND if append else os.O_TRUNC)
        # (O_NONBLOCK: a FIFO planted under the name answers ENXIO instead of blocking)
        fd = self.open(rel, flags)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", rel)
            data = data.encode() if isinstance(data, str) else data
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)

    def listdir(self, rel: str = "") -> list[str]:
        """`ls REL`."""
        fd = self.open(rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def stream(self, rel: str, timeout: float = 60) -> "Stream":
        """`cat REL` of a stream (out, err, events, topics/T, mail/next), opened now (a
        topic subscribes at open): its chunks as they come, until EOF."""
        fd = self.open(rel, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", rel)
        except BaseException:
            os.close(fd)
            raise
        return Stream(fd, rel, timeout)

    def last_note(self, agent: str) -> str:
        """`grep '^fs9: ' agents/AGENT/err | tail -n 1`: fs9's latest note on a command of
        AGENT's it refused (the reason in words), or "" (none, or a task is running:
        the notes come after its stderr, once it ends). Its own program may write such
        lines too: this is the agent's to read, not proof of anything."""
        with self.stream(f"agents/{agent}/err", timeout=0) as err:
            try:
                text = "".join(err)
            except TimeoutError:
                return ""
        notes = [line for line in text.splitlines() if line.startswith("fs9: ")]
        return notes[-1] if notes else ""

    # --- agents, the registry --------------------------------------------------
    def agents(self) -> list[str]:
        """`ls agents`."""
        return self.listdir("agents")

    def spawn(self, name: str, **overrides: str) -> None:
        """`echo 'spawn NAME KEY=VALUE...' > ctl`."""
        self.write("ctl", " ".join(["spawn", name, *(f"{k}={v}" for k, v in overrides.items())])
                   + "\n")

    def registry(self, name: str) -> dict[str, list[str]]:
        """`cat registry/NAME`: each key with its values (provides, accepts... repeat)."""
        entry: dict[str, list[str]] = {}
        for line in self.read(f"registry/{name}").splitlines():
            key, _, value = line.partition("=")
            entry.setdefault(key, []).append(value)
        return entry

    def card(self, name: str) -> dict:
        """`cat registry/cards/NAME`: the agent as an A2A AgentCard."""
        return json.loads(self.read(f"registry/cards/{name}"))

    # --- tasks -------------------------------------------------------------------
    def run(self, agent: str, text: str | bytes) -> "Task":
        """`printf %s TEXT > agents/AGENT/in`: one task; its id is the newest of
        `ls agents/AGENT/tasks` whose `input` is TEXT (ids only grow)."""
        data = text.encode() if isinstance(text, str) else text
        with self._submitting:
            before = {int(t) for t in self.listdir(f"agents/{agent}/tasks")}
            self.write(f"agents/{agent}/in", data)
            for tid in sorted({int(t) for t in self.listdir(f"agents/{agent}/tasks")} - before):
                task = Task(self, agent, tid)
                if self.read(f"{task.dir}/input").encode() == data:
                    return task
        raise OSError(errno.ESRCH, "the task written to `in` is not in tasks/", agent)

    # --- mail, topics, search, traces --------------------------------------------
    def mailbox(self) -> str:
        return f"agents/{self.agent}/mail" if self.agent else "mail"

    def send(self, to: str, body: str, **headers: str) -> None:
        """`printf 'type: work_request\\n\\nBODY' > agents/TO/mail/new` (header keys
        with `-` for `_`)."""
        if any("\n" in f"{k}{v}" for k, v in headers.items()):
            raise OSError(errno.EINVAL, "a header is one line", to)
        head = "".join(f"{k.replace('_', '-')}: {v}\n" for k, v in headers.items())
        self.write(f"agents/{to}/mail/new", head + "\n" + body if head else body)

    def mail(self) -> list[Message]:
        """`ls MAILBOX; cat MAILBOX/*` (agents/NAME/mail, or mail/ for the operator):
        the pending messages in delivery order."""
        box = self.mailbox()
        return [parse_message(n, self.read(f"{box}/{n}"))
                for n in self.listdir(box) if n not in ("new", "next", "dead")]

    def ack(self, message: Message) -> None:
        """`rm MAILBOX/NAME`."""
        if len(_names(message.name)) != 1:
            raise OSError(errno.EINVAL, "a message's name is one file name", message.name)
        box = self.open(self.mailbox(), os.O_PATH | os.O_DIRECTORY)
        try:
            os.unlink(message.name, dir_fd=box)
        finally:
            os.close(box)

    def wait_mail(self, match, timeout: float = 60) -> Message:
        """The first pending message for which match(message) holds (`ls` until then)."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.mail():
                if match(m):
                    return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching message in {self.mailbox()} in {timeout} s")
            time.sleep(0.05)

    def publish(self, topic: str, text: str) -> None:
        """`echo TEXT >> topics/TOPIC`: one event."""
        self.write(f"topics/{topic}", text, append=True)

    def search(self, query: str) -> list[str]:
        """`cat "search/QUERY"`: hits, best first (`SCORE PATH:LINE snippet`)."""
        return self.read(f"search/{query.replace('/', ' ')}").splitlines()

    def trace(self, corr: str) -> list[dict]:
        """`cat log/trace/CORR`: every event of that correlation id."""
        return [json.loads(line) for line in self.read(f"log/trace/{corr}").splitlines()]


class Stream:
    """An open stream: iterate for its chunks (text) until EOF; TimeoutError if nothing
    comes for `timeout` seconds. A context manager; close() ends it."""

    def __init__(self, fd: int, rel: str, timeout: float) -> None:
        self.fd, self.rel, self.timeout = fd, rel, timeout
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span chunks

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        if self.fd < 0:
            raise StopIteration
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                if not self._poller.poll(self.timeout * 1000):
                    raise TimeoutError(f"nothing on {self.rel} for {self.timeout} s") from None
                continue
            if not chunk:
                self.close()
                raise StopIteration
            text = self._text.decode(chunk)
            if text:
                return text

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    __del__ = close


@dataclass
class Task:
    """One task of an agent: `agents/AGENT/tasks/ID/`."""
    mount: Mount
    agent: str
    id: int

    @property
    def dir(self) -> str:
        return f"agents/{self.agent}/tasks/{self.id}"

    def status(self) -> dict[str, str]:
        """`cat tasks/ID/status`."""
        return dict(line.split("=", 1) for line in self.mount.read(f"{self.dir}/status").splitlines()
                    if "=" in line)

    def out(self, timeout: float = 60) -> Stream:
        """`cat tasks/ID/out`: its stdout as it comes, until the task ends."""
        return self.mount.stream(f"{self.dir}/out", timeout)

    def wait(self, timeout: float = 60) -> str:
        """Its whole stdout, once it has ended (`cat tasks/ID/out`)."""
        with self.out(timeout) as out:
            return "".join(out)
