"""The peers and baselines bench/bus.py measures fs9's mail beside, in the same run.

Each has send(i), called in the benchmark's own process (it returns once the message is
acknowledged, where the peer acknowledges), and receiver(n, each) -> Child, a forked
process that takes messages 0..n-1 in order, acknowledging each the peer's way (bus.py
says what `each` changes). Every message is MSG_BYTES bytes ending in its number.

Peers, a system a user could pick instead of fs9's mail (servers started here on
127.0.0.1 at a free port, in a temporary directory, stopped at the end):
- NATS JetStream: the pinned nats-server (`make deps`: .venv/bin/nats-server), a file
  stream with its default sync settings (fsync every 2 minutes: an acknowledged message
  survives a crash of the server process, not a power cut). nats-py: the sender awaits
  each publish's PubAck; the receiver is an explicit-ack push consumer that acks each
  message (msg.ack(), as JetStream's clients do by default: not awaited).
- Redis Streams: redis-server (apt package redis-server; `make bench` installs it), AOF
  with appendfsync everysec (a reply follows the AOF write: a crash of the server
  process loses nothing acknowledged, a power cut up to about a second). redis-py: the
  sender's XADD returns with the entry's id; the receiver takes each with XREADGROUP
  (COUNT 1, BLOCK) and acknowledges it with XACK.
- autogen-core's SingleThreadedAgentRuntime: one agent awaiting send_message to
  another, in one process, nothing durable.
Baselines (no acknowledgement, nothing durable): a named pipe; a Maildir on tmpfs.

A peer that cannot run here (no server binary, no client library) is left out, saying
why (`missing`).
"""
import asyncio
import collections
import ctypes
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
from foundation import BlockedReader  # noqa: E402
import natsserver  # noqa: E402  (tests/natsserver.py: the pinned server, on 127.0.0.1)

MSG_BYTES = 200  # every message, fs9's bodies too
MAIL_TIMEOUT_S = 120  # one throughput run
READY_S = 30  # a server starting on a busy machine

# What an acknowledged message survives, per kind (printed beside the figures)
GUARANTEES = {
    "fs9": "in the log: survives kill -9 of the server; a power cut may take the last "
           "second (durability=process)",
    "NATS JetStream": "in the file store: survives kill -9 of the server; a power cut may "
                      "take up to 2 minutes (default sync_interval)",
    "Redis Streams": "in the AOF: survives kill -9 of the server; a power cut may take "
                     "about a second (appendfsync everysec)",
    "autogen-core": "in memory of one process: nothing survives its end",
    "fifo": "in a pipe: nothing survives, no acknowledgement",
    "Maildir+inotify": "on tmpfs: nothing survives a reboot, no acknowledgement",
}


def message(i: int) -> bytes:
    """Message i: MSG_BYTES bytes ending in its number."""
    return b"m" * (MSG_BYTES - 10) + b" %08d\n" % i


def ends(data: bytes, i: int) -> bool:
    return data.endswith(b" %08d\n" % i)


# --- child processes --------------------------------------------------------------

class Child(BlockedReader):
    """A forked process running loop(ready_w, result_w), with BlockedReader's protocol:
    a byte on `ready` before each wait, packed results on `result`; `close` kills it."""

    live: set = set()

    def __init__(self, loop) -> None:  # not BlockedReader's: that forks its own read loop
        ready_r, ready_w = os.pipe()
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(ready_r)
                os.close(result_r)
                loop(ready_w, result_w)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        self.pid = pid
        os.close(ready_w)
        os.close(result_w)
        self.ready, self.result = ready_r, result_r
        Child.live.add(self)

    def announced(self, timeout: float = 30) -> None:
        self._take(self.ready, 1, timeout)

    def report(self, fmt: str, timeout: float = MAIL_TIMEOUT_S) -> tuple:
        return struct.unpack(fmt, self._take(self.result, struct.calcsize(fmt), timeout))

    def close(self, wake=None) -> None:
        if self in Child.live:
            Child.live.discard(self)
            super().close(wake)


# --- mail: fs9 and the baselines ----------------------------------------------------
# Each kind has send(i) and receiver(n, each) -> Child. The receiver takes n
# messages, numbered 0..n-1, checks their order, and reports (end time, sum of
# backlogs seen, messages out of order) when done. each=True: it announces itself
# before every blocking wait and reports the time every wait returned (latency);
# each=False: it announces itself once (throughput).

class Fifo:
    name = "fifo"

    def __init__(self, tmp: Path) -> None:
        path = tmp / "fifo"
        os.mkfifo(path)
        # open(2) of one end blocks until the other is opened: read end non-blocking first
        self.rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.wfd = os.open(path, os.O_WRONLY)
        os.set_blocking(self.rfd, True)

    def send(self, i: int) -> None:
        os.write(self.wfd, message(i))

    def receiver(self, n: int, each: bool) -> Child:
        rfd = self.rfd

        def loop(ready_w, result_w):
            want, got, buf, bad = n * MSG_BYTES, 0, b"", 0
            if not each:
                os.write(ready_w, b"r")
            while got < want:
                if each:
                    os.write(ready_w, b"r")
                data = os.read(rfd, 65536)
                t1 = time.perf_counter_ns()
                if each:
                    os.write(result_w, struct.pack("q", t1))
                buf += data
                while len(buf) >= MSG_BYTES:
                    bad += not ends(buf[:MSG_BYTES], got // MSG_BYTES)
                    buf, got = buf[MSG_BYTES:], got + MSG_BYTES
            os.write(result_w, struct.pack("qqq", time.perf_counter_ns(), 0, bad))
        return Child(loop)

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


class Inotify:
    """IN_MOVED_TO events of one directory: inotify_simple if installed, else ctypes."""
    IN_MOVED_TO, IN_Q_OVERFLOW = 0x80, 0x4000

    def __init__(self, path: str) -> None:
        try:
            import inotify_simple
            self.lib = inotify_simple.INotify()
            self.lib.add_watch(path, inotify_simple.flags.MOVED_TO)
        except ImportError:
            self.lib = None
            libc = ctypes.CDLL(None, use_errno=True)
            self.fd = libc.inotify_init1(0)
            if self.fd < 0 or libc.inotify_add_watch(self.fd, os.fsencode(path),
                                                     self.IN_MOVED_TO) < 0:
                raise OSError(ctypes.get_errno(), "inotify")

    def read(self) -> tuple[list[str], bool]:
        """Block for events: (names moved in, whether the queue overflowed)."""
        if self.lib is not None:
            events = self.lib.read()
            return ([e.name for e in events if e.name],
                    any(e.mask & self.IN_Q_OVERFLOW for e in events))
        data, off, names, overflow = os.read(self.fd, 65536), 0, [], False
        while off < len(data):
            _, mask, _, n = struct.unpack_from("iIII", data, off)
            name = data[off + 16:off + 16 + n].rstrip(b"\0")
            off += 16 + n
            overflow |= bool(mask & self.IN_Q_OVERFLOW)
            if name:
                names.append(os.fsdecode(name))
        return names, overflow


class Maildir:
    name = "Maildir+inotify"

    def __init__(self) -> None:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.root = tempfile.mkdtemp(prefix="fs9-bench-maildir-", dir=shm)
        self.tmp, self.new = (os.path.join(self.root, d) for d in ("tmp", "new"))
        for d in ("tmp", "new", "cur"):
            os.mkdir(os.path.join(self.root, d))
        self.tag = f"{os.getpid()}.bench"

    def send(self, i: int) -> None:
        name = f"{i:08d}.{self.tag}"
        tmp = os.path.join(self.tmp, name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, message(i))
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.new, name))

    def receiver(self, n: int, each: bool) -> Child:
        new = self.new

        def loop(ready_w, result_w):
            ino = Inotify(new)
            queue = collections.deque(sorted(os.listdir(new)))
            got = bad = 0
            if not each:
                os.write(ready_w, b"r")
            while got < n:
                if not queue:
                    if each:
                        os.write(ready_w, b"r")
                    names, overflow = ino.read()  # blocks until a rename into new/
                    queue = collections.deque(sorted(os.listdir(new)) if overflow else names)
                    continue
                path = os.path.join(new, queue.popleft())
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:  # named twice (listed after an overflow, then
                    continue  # its event came): taken already
                try:
                    data = os.read(fd, 65536)
                finally:
                    os.close(fd)
                t1 = time.perf_counter_ns()
                os.unlink(path)
                if each:
                    os.write(result_w, struct.pack("q", t1))
                bad += not ends(data, got)
                got += 1
            os.write(result_w, struct.pack("qqq", time.perf_counter_ns(), 0, bad))
        return Child(loop)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def autogen_missing() -> str | None:
    """Why autogen-core cannot be used (None: it can)."""
    try:
        import autogen_core  # noqa: F401
        return None
    except Exception as e:  # not installed, or broken
        return f"{type(e).__name__}: {e}"


_AUTOGEN = None


def _autogen_classes():
    global _AUTOGEN
    if _AUTOGEN is None:
        from autogen_core import (AgentId, MessageContext, RoutedAgent,
                                  SingleThreadedAgentRuntime, message_handler)

        @dataclass
        class Msg:
            i: int
            body: str
            t0: int

        @dataclass
        class Go:
            n: int

        class Receiver(RoutedAgent):
            def __init__(self, delivered: list) -> None:
                super().__init__("receives the messages")
                self.delivered = delivered

            @message_handler
            async def on_msg(self, message: Msg, ctx: MessageContext) -> None:
                self.delivered.append((message.i, time.perf_counter_ns() - message.t0))

        class Sender(RoutedAgent):
            def __init__(self, sent: list) -> None:
                super().__init__("sends the messages")
                self.sent = sent

            @message_handler
            async def on_go(self, message: Go, ctx: MessageContext) -> None:
                to = AgentId("receiver", "default")
                text = "m" * (MSG_BYTES - 10)
                for i in range(message.n):
                    t0 = time.perf_counter_ns()
                    await self.send_message(Msg(i, text, t0), to)
                    self.sent.append(time.perf_counter_ns() - t0)

        _AUTOGEN = (SingleThreadedAgentRuntime, AgentId, Receiver, Sender, Go)
    return _AUTOGEN


def autogen_run(n: int) -> dict:
    """One agent awaits send_message of n messages to another, in a fresh runtime:
    elapsed seconds, delivery ms (until the receiver's handler runs), send ms."""
    import asyncio
    Runtime, AgentId, Receiver, Sender, Go = _autogen_classes()

    async def session():
        delivered, sent = [], []
        rt = Runtime()
        await Receiver.register(rt, "receiver", lambda: Receiver(delivered))
        await Sender.register(rt, "sender", lambda: Sender(sent))
        rt.start()
        try:
            t0 = time.perf_counter_ns()
            await rt.send_message(Go(n), AgentId("sender", "default"))
            t1 = time.perf_counter_ns()
        finally:
            await rt.stop()
        if [i for i, _ in delivered] != list(range(n)):
            raise RuntimeError("autogen-core: messages lost or out of order")
        return {"elapsed_s": (t1 - t0) / 1e9, "lat_ms": [d / 1e6 for _, d in delivered],
                "send_ms": [s / 1e6 for s in sent]}
    return asyncio.run(session())


# --- NATS JetStream ---------------------------------------------------------------

class NatsPeer:
    name = "NATS JetStream"
    SUBJECT = "bus.mail"

    @staticmethod
    def missing() -> str | None:
        if natsserver.binary() is None:
            return "no nats-server (make deps installs the pinned one)"
        try:
            import nats  # noqa: F401
        except ImportError as e:
            return f"nats-py: {e}"
        return None

    def __init__(self, tmp: Path) -> None:
        self.server = natsserver.NatsServer(tmp / "nats")
        # the server's defaults: no sync_interval (the helper's `always` is for the tests)
        self.server.conf.write_text(f'listen: "127.0.0.1:{self.server.port}"\n'
                                    f'jetstream {{\n  store_dir: "{tmp / "nats" / "js"}"\n}}\n')
        self.server.start()
        self.loop = asyncio.new_event_loop()
        self.nc = self.js = None
        self.loop.run_until_complete(self._connect())

    async def _connect(self) -> None:
        import nats
        from nats.js.api import StorageType
        self.nc = await nats.connect(self.server.url)
        self.js = self.nc.jetstream()
        await self.js.add_stream(name="BUS", subjects=[self.SUBJECT], storage=StorageType.FILE)

    def send(self, i: int) -> None:
        self.loop.run_until_complete(self.js.publish(self.SUBJECT, message(i)))  # PubAck

    def receiver(self, n: int, each: bool) -> "Child":
        url, subject = self.server.url, self.SUBJECT

        async def run(ready_w, result_w):
            import nats
            from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
            nc = await nats.connect(url)
            js = nc.jetstream()
            # a consumer of this run's messages only (those published after it exists)
            sub = await js.subscribe(subject, manual_ack=True, config=ConsumerConfig(
                deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.EXPLICIT))
            bad = 0
            if not each:
                os.write(ready_w, b"r")
            for i in range(n):
                if each:
                    os.write(ready_w, b"r")
                msg = await sub.next_msg(timeout=MAIL_TIMEOUT_S)
                t1 = time.perf_counter_ns()
                await msg.ack()
                if each:
                    os.write(result_w, struct.pack("q", t1))
                bad += not ends(msg.data, i)
            await nc.flush()  # the last ack has reached the server
            os.write(result_w, struct.pack("qqq", time.perf_counter_ns(), 0, bad))
            await nc.close()

        return Child(lambda ready_w, result_w: asyncio.run(run(ready_w, result_w)))

    def close(self) -> None:
        try:
            if self.nc is not None:
                self.loop.run_until_complete(self.nc.close())
            self.loop.close()
        finally:
            self.server.stop()


# --- Redis Streams ------------------------------------------------------------------

class RedisPeer:
    name = "Redis Streams"
    STREAM, GROUP = "bus", "box"

    @staticmethod
    def missing() -> str | None:
        if shutil.which("redis-server") is None:
            return "no redis-server (make bench installs the apt package redis-server)"
        try:
            import redis  # noqa: F401
        except ImportError as e:
            return f"redis-py: {e} (pip install -e '.[bench]')"
        return None

    def __init__(self, tmp: Path) -> None:
        import redis
        self.dir = tmp / "redis"
        self.dir.mkdir()
        self.port = natsserver.free_port()
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", "", "--daemonize", "no"], stdout=log, stderr=log)
        log.close()
        self.db = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + READY_S
        while True:
            try:
                self.db.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("redis-server did not start: " +
                                       (self.dir / "redis.log").read_text()[-2000:])
                time.sleep(0.05)
        self.db.xgroup_create(self.STREAM, self.GROUP, id="$", mkstream=True)

    def send(self, i: int) -> None:
        self.db.xadd(self.STREAM, {"m": message(i)})  # returns once the AOF has it

    def send_batch(self, first: int, k: int) -> None:
        """k messages in one round trip (a pipeline of XADDs, not a transaction)."""
        pipe = self.db.pipeline(transaction=False)
        for i in range(first, first + k):
            pipe.xadd(self.STREAM, {"m": message(i)})
        pipe.execute()

    def receiver(self, n: int, each: bool) -> "Child":
        port, stream, group = self.port, self.STREAM, self.GROUP

        def loop(ready_w, result_w):
            import redis
            db = redis.Redis(host="127.0.0.1", port=port)
            db.ping()
            bad = 0
            if not each:
                os.write(ready_w, b"r")
            for i in range(n):
                if each:
                    os.write(ready_w, b"r")
                got = db.xreadgroup(group, "reader", {stream: ">"}, count=1, block=0)
                t1 = time.perf_counter_ns()
                entry_id, fields = got[0][1][0]
                db.xack(stream, group, entry_id)
                if each:
                    os.write(result_w, struct.pack("q", t1))
                bad += not ends(fields[b"m"], i)
            os.write(result_w, struct.pack("qqq", time.perf_counter_ns(), 0, bad))
        return Child(loop)

    def batch_receiver(self, n: int) -> "Child":
        """Takes what is pending (XREADGROUP COUNT 1000) and acknowledges it in one XACK."""
        port, stream, group = self.port, self.STREAM, self.GROUP

        def loop(ready_w, result_w):
            import redis
            db = redis.Redis(host="127.0.0.1", port=port)
            db.ping()
            got = bad = 0
            os.write(ready_w, b"r")
            while got < n:
                entries = db.xreadgroup(group, "reader", {stream: ">"}, count=1000,
                                        block=0)[0][1]
                for _, fields in entries:
                    bad += not ends(fields[b"m"], got)
                    got += 1
                db.xack(stream, group, *(entry_id for entry_id, _ in entries))
            os.write(result_w, struct.pack("qqq", time.perf_counter_ns(), 0, bad))
        return Child(loop)

    def close(self) -> None:
        self.db.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
