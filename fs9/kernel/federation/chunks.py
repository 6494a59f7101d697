"""Large messages cross in chunks, resumed where they stopped and checked by digest.

A message over CHUNK bytes (a task's large result, typically) is published as N
JetStream messages of CHUNK bytes at most, each with the header
    Fs9-Chunk: ID I N SHA256
(the message's id, the chunk's place from 0, how many, the digest of the whole). The
sender logs `fed_chunk_sent` (id, i) at each chunk's ack, so after a crash it resumes
from the first chunk not acked (outbox.py, link.py). The receiver records each chunk
in its log (`fed_chunk`: origin, id, i, n, digest; the bytes in the blob, kept apart
and trimmed once the message is whole) before acking it, so a receiver killed half way
resumes from what it holds; when all N are in, the whole is checked against the digest
and judged as one message (federation.receive).

Nothing in a chunk header is trusted: its fields are checked, a chunk that disagrees
with the first one seen of its message (N, digest), a size out of place, more than
MAX_CHUNKS, or more than MAX_PARTIAL messages being reassembled from one peer at once
rejects the whole message (a `fed_rejected` event, like any refusal). A message whose
chunks stopped coming (none for the peer's `wait`) gives its place up to a new one once
the peer's places are all taken: rejected then, so a peer that died half way, or one
that starts large messages it never finishes, does not block its large results forever.
"""
import hashlib
import re
from dataclasses import dataclass, field

CHUNK = 256 << 10  # bytes of one chunk; a message larger than this crosses in chunks
MAX_CHUNKED = 16 << 20  # bytes of a whole chunked message (a task's input is as large)
MAX_CHUNKS = MAX_CHUNKED // CHUNK
MAX_PARTIAL = 4  # messages from one peer being reassembled at once
HEADER = "Fs9-Chunk"
HEADER_RE = re.compile(r"([0-9a-f]{16}) ([0-9]{1,3}) ([0-9]{1,3}) ([0-9a-f]{64})")


def split(mid: str, data: bytes) -> list[tuple[bytes, dict[str, str]]]:
    """data as it crosses: one message (no header), or its chunks with their headers."""
    if len(data) <= CHUNK:
        return [(data, {})]
    digest = hashlib.sha256(data).hexdigest()
    pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    return [(piece, {HEADER: f"{mid} {i} {len(pieces)} {digest}"})
            for i, piece in enumerate(pieces)]


@dataclass
class Chunk:
    id: str
    i: int
    n: int
    digest: str


def parse(value: str, size: int) -> Chunk | str:
    """A chunk header as a remote wrote it: the Chunk, or why it is refused."""
    m = HEADER_RE.fullmatch(value)
    if m is None:
        return f"bad {HEADER} header {value[:120]!r}"
    chunk = Chunk(m[1], int(m[2]), int(m[3]), m[4])
    if not 2 <= chunk.n <= MAX_CHUNKS or not 0 <= chunk.i < chunk.n:
        return f"bad chunk {chunk.i} of {chunk.n} (2 to {MAX_CHUNKS} chunks)"
    if size > CHUNK or (chunk.i < chunk.n - 1 and size != CHUNK) or size == 0:
        return f"chunk {chunk.i} of {chunk.n} has {size} bytes"
    return chunk


@dataclass
class Partial:
    n: int
    digest: str
    seqs: dict[int, int] = field(default_factory=dict)  # chunk -> its fed_chunk event
    last: float = 0.0  # when its latest chunk was recorded (epoch seconds)

    @property
    def whole(self) -> bool:
        return len(self.seqs) == self.n


class Reassembly:
    """What is being reassembled, per (origin, id): the log's events holding the chunks
    (their bytes are read back from the log when the message is whole)."""

    def __init__(self) -> None:
        self.partial: dict[tuple[str, str], Partial] = {}

    def admit(self, origin: str, chunk: Chunk) -> str | None:
        """Why this chunk cannot join what is held (None: it can)."""
        held = self.partial.get((origin, chunk.id))
        if held is None:
            if sum(1 for o, _ in self.partial if o == origin) >= MAX_PARTIAL:
                return f"more than {MAX_PARTIAL} large messages from {origin} at once"
            return None
        if (held.n, held.digest) != (chunk.n, chunk.digest):
            return f"chunk {chunk.i} disagrees with the chunks before it (count, digest)"
        return None

    def stale(self, origin: str, before: float) -> list[str]:
        """The ids of origin's partial messages, oldest first, if all its places are
        taken: those whose latest chunk came before `before` (their chunks stopped)."""
        mine = [(p.last, mid) for (o, mid), p in self.partial.items() if o == origin]
        if len(mine) < MAX_PARTIAL:
            return []
        return [mid for last, mid in sorted(mine) if last < before]

    def held(self, origin: str, mid: str) -> Partial | None:
        return self.partial.get((origin, mid))

    def whole(self, origin: str, mid: str, blob) -> bytes | str:
        """The message whole (blob(seq) reads a chunk back), or why it is refused."""
        p = self.partial[(origin, mid)]
        data = b"".join(blob(p.seqs[i]) for i in range(p.n))
        if hashlib.sha256(data).hexdigest() != p.digest:
            return "its chunks do not match their digest"
        return data

    def drop(self, origin: str, mid: str) -> None:
        self.partial.pop((origin, mid), None)

    def on_chunk(self, e) -> None:
        d = e.data
        key = (d["origin"], d["id"])
        if key not in self.partial:
            self.partial[key] = Partial(d["n"], d["digest"])
        self.partial[key].seqs[d["i"]] = e.seq
        self.partial[key].last = e.ts
