r"""Ranked search over the vault: BM25, offline, no model (llama-index's BM25Retriever
over bm25s). `search/QUERY` renders `SCORE PATH:LINE snippet` lines, best first.

Contract (the index itself, how and when it is built: index.py):
  - an agent searches only what its view sees: its hits come from an index built
    over the files its view shows, so no hidden file shapes a snippet, a count or
    even a score (BM25's document frequencies are those of the visible files).
  - a hit's file is read for its snippet beneath the vault root's fd (kernel.vault_root,
    beneath.py), never through a symlink: a hit whose file cannot be read so (gone
    since the build, or a folder on its path swapped for a symlink) is left out.
  - PATH is `vault/` and the file's names joined by `/`, each name escaped
    (`shown_path`): a backslash is written `\\`, a newline `\n`, a tab `\t`, a carriage
    return `\r`, any other ASCII control character and any byte that is not UTF-8
    `\xHH`, a C1 control and U+2028/U+2029 `\uHHHH`; all else as it is (spaces, `:`).
    A snippet is one line of the file (no line break of any kind), stripped, trimmed to
    SNIPPET characters, its control characters but tab written `\xHH` (backslashes as
    they are). So each line of an answer is one hit, whatever the names, and an
    answer is always UTF-8.
  - STATE/search.toml may switch on semantic ranking with an embedding model served
    by any OpenAI-compatible /v1/embeddings endpoint (llama-index's
    OpenAILikeEmbedding): each file's first EMBED_CHUNKS chunks are embedded in
    worker threads, in batches, only for files whose mtime or size changed, and kept
    in STATE/search/vectors.pickle; a query then merges BM25's best files with the
    nearest ones by cosine similarity (relative-score fusion). A model that cannot be
    used, or an endpoint that stops answering, is said in each result's first line,
    one `search_fallback` event per failure and search/status; results are BM25's
    until the endpoint answers again (probed in the background), then `search_semantic`.
Queries run on the trio thread (a Status renders synchronously) and never block: a
query's embedding (one HTTP request) is made before, in a worker thread (`prepare`),
and cached per query text; builds, loads and saves run in worker threads and touch only
the store, never a published Snapshot. The embedding side is kernel/vault/embeddings.py.
"""
import os
import re
import time
import tomllib

import trio

from .beneath import VaultRoot
from .embeddings import (Embedder, Vectors, config_problem, failure_reason, fuse_rankings,
                         model_problem)
from .index import MAX_FILE, MAX_HITS, Index, Snapshot, Terms

SNIPPET = 160  # characters of a hit's line
NOT_READY = "fs9: the search index is being built; try again in a moment\n"
NO_EMBED = "fs9: embedding model {model} is not available ({reason}); ranked by BM25\n"
RETRY_S = 2.0  # an endpoint that failed is probed again after this, doubling up to RETRY_MAX_S
RETRY_MAX_S = 30.0
# What shown_path and a snippet escape (a surrogate escape is a byte that is not UTF-8)
_PATH_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")
_TEXT_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(m: re.Match) -> str:
    c = m.group()
    o = ord(c)
    if c in _NAMED:
        return _NAMED[c]
    if o >= 0xdc80:  # surrogateescape's stand-in for byte o - 0xdc00
        return f"\\x{o - 0xdc00:02x}"
    return f"\\x{o:02x}" if o < 0x80 else f"\\u{o:04x}"


def shown_path(rel: tuple[str, ...]) -> str:
    """How an answer prints vault path rel (a tuple of names): one line, UTF-8."""
    return "vault/" + "/".join(_PATH_UNSAFE.sub(_escape, name) for name in rel)


class Search:
    """Queries over the vault's index (index.py), ranked by BM25 or, with an embedding
    model, hybrid (run `serve` in a nursery: the indexer and the embedder)."""

    def __init__(self, root: VaultRoot, state_dir: str, log) -> None:
        self.root = root  # the vault, reached beneath its fd only (kernel.vault_root)
        self.dir = os.path.join(state_dir, "search")
        self.config = os.path.join(state_dir, "search.toml")
        self.log = log  # the kernel's EventLog
        self.index = Index(root, self.dir, log, published=lambda: self._embed_wake.set())
        self.query_terms: Terms | None = None  # the trio thread's (made at its first query)
        self.embed_error = ""  # a configured embedding model that cannot be used: why
        self.embed_model = ""  # as configured, like openai:nomic-embed-text
        self.embedder: Embedder | None = None  # set once its client is ready
        self.vectors: Vectors | None = None  # the published vectors (swapped whole)
        self.embed_ms = 0.0  # the last query embedding's request
        self._embed_wake = trio.Event()  # a new snapshot to embed, or a failure seen
        self.error = ""  # search is out of order: why
        self._cache: tuple = (None, "")  # ((view, gen, query), rendered)

    # --- the indexer and the embedder ------------------------------------------

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Load the persisted index, bring it up to date with the vault, then keep it
        so; until cancelled. Ready (task_status) at once: queries before the first
        build answer NOT_READY. A defect here costs search, never the mount: a `bug`
        event, and every search file says search is unavailable."""
        task_status.started()
        try:
            await self._serve()
        except Exception:
            self.error = "internal error (see the bug event)"
            self.log.bug("search")

    async def _serve(self) -> None:
        config = self._embedding_config()
        async with trio.open_nursery() as nursery:
            if config is not None:
                nursery.start_soon(self._embed_loop, config)
            await self.index.run()

    @property
    def snapshot(self) -> Snapshot | None:
        return self.index.snapshot

    def touch(self, rel: tuple[str, ...]) -> None:
        """A vault path (a tuple of names, like ("docs", "a.md")) changed, appeared or
        went away."""
        self.index.touch(rel)

    def rescan(self) -> None:
        """The watcher lost events: compare the whole vault with the index."""
        self.index.rescan()

    # --- optional embedding model -----------------------------------------------

    def _embedding_config(self) -> dict | None:
        """STATE/search.toml's embedding model, if one is configured and usable here;
        whatever makes it unusable is said (embed_error, a `search_fallback` event)."""
        try:
            with open(self.config, "rb") as f:
                config = tomllib.load(f)
        except FileNotFoundError:
            return None
        except (OSError, tomllib.TOMLDecodeError) as e:
            self._embed_failed("(search.toml)", f"unreadable: {e}")
            return None
        model = config.get("embed", "")
        if not model:
            return None
        self.embed_model = str(model)
        reason = model_problem(model) or config_problem(config)
        if reason:
            self._embed_failed(self.embed_model, reason)
            return None
        env = config.get("api_key_env")
        config["api_key"] = os.environ.get(env, "") if env else "fake"
        if env and not config["api_key"]:
            self._embed_failed(self.embed_model, f"environment variable {env} is not set")
            return None
        return config

    def _embed_failed(self, model: str, reason: str) -> None:
        """Trio thread: semantic ranking is off (logged once per failure)."""
        self.embed_model = self.embed_model or model
        if not self.embed_error:
            self.log.append("search_fallback", model=self.embed_model, reason=reason)
        self.embed_error = reason
        self._embed_wake.set()

    async def _embed_loop(self, config: dict) -> None:
        """Keep the vectors up to date with the published snapshots; while the
        endpoint fails, probe it (RETRY_S, doubling) and resume when it answers."""
        embedder = Embedder(config, self.dir, self.root)
        while self.snapshot is None:  # after the first build: llama-index is imported
            await self._embed_wake.wait()  # (importing it from two threads at once fails)
            self._embed_wake = trio.Event()
        self._embed_wake.set()
        await trio.to_thread.run_sync(embedder.open)
        self.embedder = embedder
        if embedder.loaded:
            self.vectors = embedder.publish()
        retry = float(config.get("retry_s", RETRY_S))
        while True:
            if self.embed_error:
                await trio.sleep(retry)
                retry = min(retry * 2, max(RETRY_MAX_S, float(config.get("retry_s", 0))))
            else:
                await self._embed_wake.wait()
            self._embed_wake = trio.Event()
            snap = self.snapshot
            if snap is None or snap.meta is None:
                continue
            vectors, error, more = await trio.to_thread.run_sync(
                embedder.sync, snap, bool(self.embed_error) or not embedder.announced)
            if vectors is not None:
                self.vectors = vectors
            if error:
                self._embed_failed(embedder.model, error)
                continue
            retry = float(config.get("retry_s", RETRY_S))
            if self.embed_error or not embedder.announced:
                self.embed_error = ""
                embedder.announced = True
                self.log.append("search_semantic", model=embedder.model)
            if more:
                self._embed_wake.set()

    def _semantic(self, snap: Snapshot, text: str, bm25: list) -> list | None:
        """Trio thread: BM25's hits merged with the nearest files by embedding,
        [(score, path, line hint)], best first; None: BM25's alone (no vectors, or the
        endpoint failed: said)."""
        embedder, vectors = self.embedder, self.vectors
        if embedder is None or vectors is None or self.embed_error or not vectors.paths:
            return None
        t0 = time.monotonic()
        try:
            q = embedder.query_vector(text)
        except Exception as e:
            self._embed_failed(embedder.model, failure_reason(e, embedder))
            return None
        self.embed_ms = (time.monotonic() - t0) * 1000
        if q.shape[0] != vectors.dim:  # the model changed: the vectors follow soon
            return None
        near = vectors.top(q, snap.pathset, MAX_HITS * 2)
        return fuse_rankings(bm25, near)

    # --- queries ------------------------------------------------------------------

    async def prepare(self, text: str) -> None:
        """Make text's embedding in a worker thread (cached), so that `query` never
        waits for the model on the thread serving the file system."""
        embedder = self.embedder
        if embedder is None or self.vectors is None or self.embed_error \
                or text in embedder._queries:
            return
        try:
            await trio.to_thread.run_sync(embedder.query_vector, text)
        except Exception as e:
            self._embed_failed(embedder.model, failure_reason(e, embedder))

    def query(self, text: str, view=None) -> str:
        """Render QUERY's hits as seen by view (None: the operator). Does not block."""
        snap = self.snapshot
        if self.error:
            return f"fs9: search is unavailable: {self.error}\n"
        if snap is None:
            return NOT_READY
        snap = self.index.view_snapshot(view)
        key = (view, snap.gen, self.vectors, self.embed_error, text)
        if self._cache[0] == key:  # stat then read: one query (and one embedding)
            return self._cache[1]
        if self.query_terms is None:
            self.query_terms = Terms()
        terms = self.query_terms(text)
        weight = {t: 1.0 / max(1, snap.df(t)) for t in set(terms)}
        bm25 = snap.top(terms)
        ranked = self._semantic(snap, text, bm25) if self.embedder is not None else None
        if ranked is None:
            ranked = [(score, rel, None) for score, rel in bm25]
        head = NO_EMBED.format(model=self.embed_model, reason=self.embed_error) \
            if self.embed_error else ""
        lines = []
        for score, rel, hint in ranked:
            if view is not None and view.access(("vault", *rel)) is None:
                continue
            hit = self._best_line(rel, weight, hint)
            if hit is not None:
                lines.append(f"{score:.3f} {shown_path(rel)}:{hit[0]} {hit[1]}\n")
            if len(lines) == MAX_HITS:
                break
        out = head + "".join(lines)
        self._cache = ((view, snap.gen, self.vectors, self.embed_error, text), out)
        return out

    def _best_line(self, rel: tuple[str, ...], weight: dict[str, float],
                   hint: int | None = None) -> tuple[int, str] | None:
        """(line number, trimmed line) where the query's rarest terms meet (none: hint,
        the first line of the file's nearest chunk, else its first line); None: the
        file cannot be read beneath the vault root (deleted since the build, or a
        symlink on its path)."""
        data = self.root.read(rel, MAX_FILE)
        if data is None:
            return None
        text = data.decode("utf-8", "replace")
        best, best_no, first = 0.0, 1, None
        # Snowball changes only a word's end: a line without a stem's start holds no
        # term of it, and is not worth tokenizing (a big file has many such lines).
        starts = [t[:max(1, min(4, len(t) - 1))] for t in weight]
        for no, line in enumerate(text.splitlines(), 1):
            if first is None and line.strip():
                first = no
            low = line.lower()
            if not any(start in low for start in starts):
                continue
            found = set(self.query_terms(line)) & weight.keys()
            score = sum(weight[t] for t in found)
            if score > best:
                best, best_no = score, no
        lines = text.splitlines() or [""]
        if best == 0.0 and hint is not None and hint <= len(lines):
            best_no = hint
        elif best == 0.0 and first is not None:
            best_no = first
        return best_no, _TEXT_UNSAFE.sub(_escape, lines[best_no - 1].strip()[:SNIPPET])

    def status(self, view=None) -> str:
        """KEY=VALUE lines; as view sees it (its documents only, no vault-wide counts)."""
        snap = self.snapshot and self.index.view_snapshot(view)
        semantic = self.embedder is not None and self.vectors is not None \
            and not self.embed_error
        lines = [f"ready={'yes' if snap and not self.error else 'no'}",
                 f"docs={len(snap.paths) if snap else 0}",
                 f"ranking={'hybrid' if semantic else 'bm25'}"]
        if view is None:
            s = self.index.stats
            lines += [f"read={s['read']}", f"unchanged={s['unchanged']}",
                      f"removed={s['removed']}", f"builds={s['builds']}",
                      f"build_ms={self.index.build_ms:.0f}", f"pending={self.index.pending}",
                      f"rescans={s['rescans']}"]
            if self.embedder is not None:
                e = self.embedder
                lines += [f"embedded={e.files}", f"embed_pending={e.pending}",
                          f"embed_requests={e.requests}", f"query_embed_ms={self.embed_ms:.1f}"]
        if self.embed_model:
            lines.append(f"embed={self.embed_model}")
            lines.append(f"embed_error={self.embed_error}")
        return "\n".join(lines) + "\n"

