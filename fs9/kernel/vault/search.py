r"""Ranked search over the vault: BM25, offline, no model (llama-index's BM25Retriever
over bm25s). `search/QUERY` renders `SCORE PATH:LINE snippet` lines, best first.

Contract (the index itself, how and when it is built: index.py):
  - an agent searches only what its view sees: its hits come from an index built
    over the files its view shows, so no hidden file shapes a snippet, a count or
    even a score (BM25's document frequencies are those of the visible files).
  - a hit's file is read for its snippet beneath the vault root's fd (kernel.vault_root,
    beneath.py), never through a symlink: a hit whose file cannot be read so (gone
    since the build, or a folder on its path swapped for a symlink) is left out.
  - PATH is `vault/` and the file's names joined by `/`, escaped as fs9 prints every
    path (kernel/names.py `shown_path`): a backslash is written `\\`, a newline `\n`, a
    tab `\t`, a carriage return `\r`, any other ASCII control character and any byte
    that is not UTF-8 `\xHH`, a C1 control and U+2028/U+2029 `\uHHHH`; all else as it
    is (spaces, `:`). A snippet is one line of the file (no line break of any kind),
    stripped, trimmed to SNIPPET characters, its control characters but tab escaped
    (`one_line`: `\xHH`; backslashes as they are). So each line of an answer is one hit, whatever the names, and an
    answer is always UTF-8.
  - an answer is made when search/QUERY is read, in a worker thread (`prepare`, then
    `query` returns it): ranking, reading the hits' files and scoring their lines never
    hold the trio thread. One answer reads at most QUERY_BYTES of files and spends at
    most QUERY_S on snippets; the hits past that budget are listed as `SCORE PATH`
    (no line, no snippet) under a first line saying so. SEARCH_THREADS answers are
    made at once (others wait their turn); an agent has at most PER_AGENT searches
    under way, one more is EAGAIN; the operator's are not capped.
  - STATE/search.toml may switch on semantic ranking with an embedding model served
    by any OpenAI-compatible /v1/embeddings endpoint (llama-index's
    OpenAILikeEmbedding): each file's first EMBED_CHUNKS chunks are embedded in
    worker threads, in batches, only for files whose mtime or size changed, and kept
    in STATE/search/vectors.pickle; a query then merges BM25's best files with the
    nearest ones by cosine similarity (relative-score fusion). A model that cannot be
    used, or an endpoint that stops answering, is said in each result's first line,
    one `search_fallback` event per failure and search/status; results are BM25's
    until the endpoint answers again (probed in the background), then `search_semantic`.
A query's embedding (one HTTP request) is made in a worker thread too, and cached per
query text; builds, loads and saves run in worker threads and touch only the store,
never a published Snapshot. The embedding side is kernel/vault/embeddings.py.
"""
import collections
import errno
import os
import stat
import threading
import time
import tomllib

import trio

from ...errors import Fs9Error
from ..names import one_line, shown_path
from .beneath import VaultRoot
from .embeddings import (Embedder, Vectors, config_problem, failure_reason, fuse_rankings,
                         model_problem)
from .index import MAX_FILE, MAX_HITS, Index, Snapshot, Terms

SNIPPET = 160  # characters of a hit's line
# A dozen 4 MiB files took one answer 6 s of snippets: past these, hits come bare.
QUERY_BYTES = 16 << 20  # bytes of files one answer reads for its snippets
QUERY_S = 2.0  # seconds one answer spends on its snippets
SEARCH_THREADS = 2  # answers made at once, everyone's together (worker threads)
PER_AGENT = 4  # searches one agent has under way at once; one more: EAGAIN
NOT_READY = "fs9: the search index is being built; try again in a moment\n"
NO_EMBED = "fs9: embedding model {model} is not available ({reason}); ranked by BM25\n"
OVER_BUDGET = ("fs9: this query's budget ({mib} MiB read, {s:g} s) ran out: {n} hits "
               "listed without a snippet\n")
NOT_PREPARED = "fs9: no answer was made for this read; read search/QUERY again\n"
BUSY = "{agent} has {n} searches under way (at most {n} at once)"
RETRY_S = 2.0  # an endpoint that failed is probed again after this, doubling up to RETRY_MAX_S
RETRY_MAX_S = 30.0
def best_line(text: str, weight: dict[str, float], hint: int | None, terms: Terms,
              deadline: float) -> tuple[int, str]:
    """(line number, snippet) of text where the query's rarest terms meet (none: hint,
    the first line of the file's nearest chunk, else its first line that is not blank);
    past deadline (time.monotonic), the best line found so far."""
    lines = text.splitlines() or [""]
    best, best_no, first = 0.0, 1, None
    # Snowball changes only a word's end: a line without a stem's start holds no
    # term of it, and is not worth tokenizing (a big file has many such lines).
    starts = [t[:max(1, min(4, len(t) - 1))] for t in weight]
    for no, line in enumerate(lines, 1):
        if not no % 1024 and time.monotonic() > deadline:
            break
        if first is None and line.strip():
            first = no
        low = line.lower()
        if not any(start in low for start in starts):
            continue
        found = set(terms(line)) & weight.keys()
        score = sum(weight[t] for t in found)
        if score > best:
            best, best_no = score, no
    if best == 0.0 and hint is not None and hint <= len(lines):
        best_no = hint
    elif best == 0.0 and first is not None:
        best_no = first
    return best_no, one_line(lines[best_no - 1].strip()[:SNIPPET])


class Search:
    """Queries over the vault's index (index.py), ranked by BM25 or, with an embedding
    model, hybrid (run `serve` in a nursery: the indexer and the embedder)."""

    def __init__(self, root: VaultRoot, state_dir: str, log) -> None:
        self.root = root  # the vault, reached beneath its fd only (kernel.vault_root)
        self.dir = os.path.join(state_dir, "search")
        self.config = os.path.join(state_dir, "search.toml")
        self.log = log  # the kernel's EventLog
        self.index = Index(root, self.dir, log, published=lambda: self._embed_wake.set())
        self.embed_error = ""  # a configured embedding model that cannot be used: why
        self.embed_model = ""  # as configured, like openai:nomic-embed-text
        self.embedder: Embedder | None = None  # set once its client is ready
        self.vectors: Vectors | None = None  # the published vectors (swapped whole)
        self.embed_ms = 0.0  # the last query embedding's request
        self._embed_wake = trio.Event()  # a new snapshot to embed, or a failure seen
        self.error = ""  # search is out of order: why
        # the answer prepared last: ((view, query, gen, vectors, embed_error), text)
        self._cache: tuple = (None, "")
        self._under_way: collections.Counter = collections.Counter()  # agent -> searches
        self._slots = trio.Semaphore(SEARCH_THREADS)  # held while an answer is made
        self._threads = trio.CapacityLimiter(SEARCH_THREADS)  # not the default limiter's
        self._local = threading.local()  # each search thread's Terms

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

    # --- queries ------------------------------------------------------------------

    async def prepare(self, text: str, view=None) -> None:
        """Make the answer to text as view sees it (None: the operator), for `query` to
        return: in worker threads, its embedding (cached) and then the answer itself,
        within its budget (QUERY_BYTES, QUERY_S). Blocks until made (and, when
        SEARCH_THREADS answers are being made, until a turn comes). Fs9Error EAGAIN:
        the agent already has PER_AGENT searches under way."""
        who = None if view is None else view.agent
        if who is not None and self._under_way[who] >= PER_AGENT:
            raise Fs9Error(errno.EAGAIN, BUSY.format(agent=who, n=PER_AGENT))
        self._under_way[who] += 1
        try:
            if not self.error and self.snapshot is not None:
                await self._embed_query(text)
                await self._answer(text, view)
        finally:
            self._under_way[who] -= 1
            if not self._under_way[who]:
                del self._under_way[who]

    def query(self, text: str, view=None) -> str:
        """The answer prepare made for text as view sees it. Does not block. (The face
        reads search/QUERY with prepare then query, back to back: no other task runs
        in between.)"""
        if self.error:
            return f"fs9: search is unavailable: {self.error}\n"
        if self.snapshot is None:
            return NOT_READY
        key, out = self._cache
        return out if key is not None and key[:2] == (view, text) else NOT_PREPARED

    async def _embed_query(self, text: str) -> None:
        """text's embedding, made in a worker thread unless cached (and unless the
        model cannot be used: then said)."""
        embedder = self.embedder
        if embedder is None or self.vectors is None or self.embed_error \
                or embedder.cached_vector(text) is not None:
            return
        t0 = time.monotonic()
        try:
            await trio.to_thread.run_sync(embedder.query_vector, text)
        except Exception as e:
            self._embed_failed(embedder.model, failure_reason(e, embedder))
            return
        self.embed_ms = (time.monotonic() - t0) * 1000

    async def _answer(self, text: str, view) -> None:
        """Make the answer in a worker thread, unless the one made last is still it."""
        async with self._slots:
            snap, vectors, error = self.index.snapshot, self.vectors, self.embed_error
            key = (view, text, snap.gen, vectors, error)
            if self._cache[0] == key:  # read again (stat then read; a second cat)
                return
            q = None
            if self.embedder is not None and vectors is not None and not error \
                    and vectors.paths:
                q = self.embedder.cached_vector(text)
                if q is not None and q.shape[0] != vectors.dim:
                    q = None  # the model changed: the vectors follow soon
            head = NO_EMBED.format(model=self.embed_model, reason=error) if error else ""
            vsnap = snap if view is None else self.index.views.get(view)
            out, vsnap = await trio.to_thread.run_sync(
                self._render, snap, vsnap, view, text, q, vectors, head,
                limiter=self._threads)
            self.index.keep_view(snap, view, vsnap)
            self._cache = (key, out)

    def _render(self, snap: Snapshot, vsnap: Snapshot | None, view, text: str, q,
                vectors: Vectors | None, head: str) -> tuple[str, Snapshot]:
        """Worker thread: the answer (and view's index, made here if vsnap is None).
        Reads only immutable things (snapshots, vectors, the view) and the vault,
        beneath its root."""
        terms = getattr(self._local, "terms", None)
        if terms is None:
            terms = self._local.terms = Terms()
        if vsnap is None:
            vsnap = Index.view_subset(snap, view)
        words = terms(text)
        weight = {t: 1.0 / max(1, vsnap.df(t)) for t in set(words)}
        bm25 = vsnap.top(words)
        if q is not None:
            ranked = fuse_rankings(bm25, vectors.top(q, vsnap.pathset, MAX_HITS * 2))
        else:
            ranked = [(score, rel, None) for score, rel in bm25]
        left, deadline = QUERY_BYTES, time.monotonic() + QUERY_S
        lines, bare = [], 0
        for score, rel, hint in ranked:
            if view is not None and view.access(("vault", *rel)) is None:
                continue
            if left > 0 and time.monotonic() < deadline:
                data = self.root.read(rel, min(MAX_FILE, left))
                if data is None:  # gone since the build, or a symlink on the way
                    continue
                left -= len(data)
                no, snippet = best_line(data.decode("utf-8", "replace"), weight, hint,
                                        terms, deadline)
                lines.append(f"{score:.3f} {shown_path(('vault', *rel))}:{no} {snippet}\n")
            else:  # over budget: listed if it is still a file there, without a snippet
                try:
                    if not stat.S_ISREG(self.root.lstat(rel).st_mode):
                        continue
                except OSError:
                    continue
                lines.append(f"{score:.3f} {shown_path(('vault', *rel))}\n")
                bare += 1
            if len(lines) == MAX_HITS:
                break
        if bare:
            head += OVER_BUDGET.format(mib=QUERY_BYTES >> 20, s=QUERY_S, n=bare)
        return head + "".join(lines), vsnap

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

