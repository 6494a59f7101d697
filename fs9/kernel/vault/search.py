"""Ranked search over the vault: BM25, offline, no model (llama-index's BM25Retriever
over bm25s). `search/QUERY` renders `SCORE PATH:LINE snippet` lines, best first.

Contract:
  - one document per vault file (text files up to MAX_FILE bytes; names starting
    with "." and everything under them, like .git, are not indexed);
  - the index lives in STATE/search/index.pickle: each file's mtime, size and terms.
    A restart stats the vault and re-reads only files whose mtime or size changed;
  - a change (the watcher, or fs9's own vault operations) marks a path dirty; the
    indexer re-reads the dirty paths and rebuilds the BM25 index in a worker thread
    (DEBOUNCE_S after the first change of a burst), then swaps it in: queries never
    wait for a build and never see half of one;
  - an agent searches only what its view sees: its hits come from an index built
    over the files its view shows, so no hidden file shapes a snippet, a count or
    even a score (BM25's document frequencies are those of the visible files).
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
import array
import collections
import os
import pickle
import re
import time
import tomllib

import trio

from .embeddings import (Embedder, Vectors, config_problem, failure_reason, fuse_rankings,
                         model_problem)

MAX_HITS = 20  # lines a query renders
MAX_FILE = 4 << 20  # bytes: bigger files are not indexed
SNIPPET = 160  # characters of a hit's line
DEBOUNCE_S = 0.05  # a burst of changes costs one build
VERSION = 1  # of the persisted index
TOKEN = re.compile(r"(?u)\b\w\w+\b")  # bm25s's default token pattern
NOT_READY = "fs9: the search index is being built; try again in a moment\n"
NO_EMBED = "fs9: embedding model {model} is not available ({reason}); ranked by BM25\n"
RETRY_S = 2.0  # an endpoint that failed is probed again after this, doubling up to RETRY_MAX_S
RETRY_MAX_S = 30.0


class Terms:
    """Text -> index terms: lower case, English stop words out, Snowball-stemmed."""

    def __init__(self) -> None:
        import Stemmer
        from bm25s.stopwords import STOPWORDS_EN
        self.stem = Stemmer.Stemmer("english").stemWords
        self.stop = frozenset(STOPWORDS_EN)

    def __call__(self, text: str) -> list[str]:
        return self.stem([w for w in TOKEN.findall(text.lower()) if w not in self.stop])


class Snapshot:
    """An immutable index as queries see it (swapped whole, never changed)."""

    def __init__(self, gen: int, paths: list[str], ids: list, vocab: dict[str, int],
                 meta: list | None = None) -> None:
        self.gen = gen
        self.paths = paths  # vault-relative, like docs/a.md; position = document number
        self.ids = ids  # each document's term ids (to build views' indexes from)
        self.vocab = vocab  # term -> id (a copy: the store's grows)
        self.meta = meta  # each document's (mtime_ns, size) as indexed (whole vault's only)
        self._pathset: frozenset | None = None
        self.retriever = None
        if paths:
            import bm25s
            from llama_index.retrievers.bm25 import BM25Retriever
            bm25 = bm25s.BM25()
            bm25.index((list(ids), vocab), show_progress=False)
            self.retriever = BM25Retriever(existing_bm25=bm25,
                                           similarity_top_k=min(MAX_HITS, len(paths)))

    @property
    def pathset(self) -> frozenset:
        if self._pathset is None:
            self._pathset = frozenset(self.paths)
        return self._pathset

    def df(self, term: str) -> int:
        """How many documents hold term (bm25s keeps its scores term by term)."""
        tid = self.vocab.get(term)
        if self.retriever is None or tid is None:
            return 0
        indptr = self.retriever.bm25.scores["indptr"]
        return int(indptr[tid + 1] - indptr[tid]) if tid + 1 < len(indptr) else 0

    def subset(self, visible: list[bool]) -> "Snapshot":
        keep = [i for i, v in enumerate(visible) if v]
        if len(keep) == len(self.paths):
            return self
        return Snapshot(self.gen, [self.paths[i] for i in keep],
                        [self.ids[i] for i in keep], self.vocab)

    def top(self, query: list[str]) -> list[tuple[float, str]]:
        """(score, path) of the best documents for query terms, best first."""
        if self.retriever is None:
            return []
        qids = [self.vocab[t] for t in query if t in self.vocab]
        if not qids:
            return []
        import numpy as np
        scores = self.retriever.bm25.get_scores(qids)
        k = min(MAX_HITS * 2, len(scores))  # spare ones replace files gone since
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(float(scores[i]), self.paths[i]) for i in best if scores[i] > 0]


class Search:
    """The vault's search index and its indexer (run `serve` in a nursery)."""

    def __init__(self, vault_dir: str, state_dir: str, log) -> None:
        self.vault = vault_dir
        self.dir = os.path.join(state_dir, "search")
        self.config = os.path.join(state_dir, "search.toml")
        self.log = log  # the kernel's EventLog
        self.snapshot: Snapshot | None = None  # None until the first build
        self.views: dict = {}  # View -> its Snapshot (rebuilt after each build)
        self.embed_error = ""  # a configured embedding model that cannot be used: why
        self.embed_model = ""  # as configured, like openai:nomic-embed-text
        self.embedder: Embedder | None = None  # set once its client is ready
        self.vectors: Vectors | None = None  # the published vectors (swapped whole)
        self.embed_ms = 0.0  # the last query embedding's request
        self._embed_wake = trio.Event()  # a new snapshot to embed, or a failure seen
        self._rescan = False  # the watcher lost events: compare the whole vault
        self.stats = collections.Counter()  # read unchanged removed builds (since start)
        self.build_ms = 0.0
        self.error = ""  # search is out of order: why
        self._terms: Terms | None = None  # the worker's (a Stemmer is not thread-safe)
        self._query_terms: Terms | None = None  # the trio thread's
        self._dirty: set[str] = set()  # vault-relative paths changed since the last build
        self._wake = trio.Event()
        # the store: written only by the worker thread of the current job
        self._docs: dict[str, tuple[int, int, array.array]] = {}
        self._vocab: dict[str, int] = {"": 0}  # "": bm25s's empty token, so it adds none
        self._cache: tuple = (None, "")  # ((view, gen, query), rendered)

    # --- indexer --------------------------------------------------------------

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
            await self._index_loop()

    async def _index_loop(self) -> None:
        t0 = time.monotonic()
        snap = await trio.to_thread.run_sync(self._startup)
        self.build_ms = (time.monotonic() - t0) * 1000  # no event: search/status tells
        self._publish(snap)
        while True:
            await self._wake.wait()
            await trio.sleep(DEBOUNCE_S)
            self._wake = trio.Event()
            dirty, self._dirty = self._dirty, set()
            full, self._rescan = self._rescan, False
            views = list(self.views)
            t0 = time.monotonic()
            snap, built = await trio.to_thread.run_sync(self._update, dirty, views, full)
            self.build_ms = (time.monotonic() - t0) * 1000
            self._publish(snap, built)
            if not self._wake.is_set():  # the next build saves otherwise
                await trio.to_thread.run_sync(self._save)

    def touch(self, rel: str) -> None:
        """A vault path (relative, like docs/a.md) changed, appeared or went away."""
        if not _skipped(rel):
            self._dirty.add(rel)
            self._wake.set()

    def rescan(self) -> None:
        """Changes may have been missed (the watcher's queue overflowed): compare the
        whole vault with the index (mtime and size: only changed files are read)."""
        self._rescan = True
        self._wake.set()

    def _publish(self, snap: Snapshot, views: dict | None = None) -> None:
        self.snapshot = snap
        self.views = views or {}  # a view first seen during the build: rebuilt at its query
        self.stats["builds"] += 1
        self._embed_wake.set()

    def _startup(self) -> Snapshot:
        """Worker thread: the persisted index, plus what changed in the vault since."""
        self._terms, self._query_terms = Terms(), Terms()
        self._load()
        self._scan_all()
        self._save()
        return self._snapshot()

    def _scan_all(self) -> None:
        """Worker thread: every vault file compared with the index, gone ones dropped."""
        seen = set()
        for root, dirs, files in os.walk(self.vault):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), self.vault)
                if not _skipped(rel):
                    seen.add(rel)
                    self._index_file(rel)
        for rel in set(self._docs) - seen:
            del self._docs[rel]
            self.stats["removed"] += 1

    def _update(self, dirty: set[str], views: list, full: bool = False
                ) -> tuple[Snapshot, dict]:
        """Worker thread: re-read the dirty paths (full: the whole vault's changed
        files), rebuild (the caller saves)."""
        if full:
            self.stats["rescans"] += 1
            self._scan_all()
            dirty = set()
        for rel in dirty:
            full = os.path.join(self.vault, rel)
            if os.path.isdir(full) and not os.path.islink(full):  # made or moved here
                for root, dirs, files in os.walk(full):
                    dirs[:] = [d for d in dirs if not d.startswith(".")]
                    for name in files:
                        self._index_file(os.path.relpath(os.path.join(root, name), self.vault))
            else:
                self._index_file(rel)
            prefix = rel + "/"  # a directory that went away takes its files along
            for gone in [p for p in self._docs if p.startswith(prefix)]:
                if not os.path.lexists(os.path.join(self.vault, gone)):
                    del self._docs[gone]
                    self.stats["removed"] += 1
        snap = self._snapshot()
        return snap, {view: self._view_snapshot(snap, view) for view in views}

    def _index_file(self, rel: str) -> None:
        """(Re-)index one file if its mtime or size changed; drop it if it is gone."""
        try:
            st = os.lstat(os.path.join(self.vault, rel))
        except OSError:
            st = None
        if st is None or not _regular(st.st_mode) or st.st_size > MAX_FILE:
            if self._docs.pop(rel, None) is not None:
                self.stats["removed"] += 1
            return
        old = self._docs.get(rel)
        if old is not None and old[:2] == (st.st_mtime_ns, st.st_size):
            self.stats["unchanged"] += 1
            return
        try:
            fd = os.open(os.path.join(self.vault, rel), os.O_RDONLY | os.O_NOFOLLOW)
            with open(fd, "rb") as f:
                data = f.read(MAX_FILE)
        except OSError:
            self._docs.pop(rel, None)
            return
        self.stats["read"] += 1
        if b"\0" in data[:8192]:  # not text
            self._docs.pop(rel, None)
            return
        vocab = self._vocab
        ids = array.array("i", (vocab.setdefault(t, len(vocab))
                                for t in self._terms(data.decode("utf-8", "replace"))))
        self._docs[rel] = (st.st_mtime_ns, st.st_size, ids)

    def _snapshot(self) -> Snapshot:
        paths = sorted(self._docs)
        return Snapshot(self.stats["builds"] + 1, paths,
                        [self._docs[p][2] for p in paths], dict(self._vocab),
                        [self._docs[p][:2] for p in paths])

    @staticmethod
    def _view_snapshot(snap: Snapshot, view) -> Snapshot:
        return snap.subset([view.access(("vault", *p.split("/"))) is not None
                            for p in snap.paths])

    def _load(self) -> None:
        try:
            with open(os.path.join(self.dir, "index.pickle"), "rb") as f:
                saved = pickle.load(f)
        except FileNotFoundError:
            return
        except Exception as e:  # a damaged index is rebuilt, and said so
            self.log_from_thread("search_index_damaged", reason=str(e))
            return
        if saved.get("version") == VERSION and saved.get("vault") == self.vault:
            self._vocab = {t: i for i, t in enumerate(saved["vocab"])}
            self._docs = saved["docs"]

    def _save(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = os.path.join(self.dir, "index.pickle.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(dict(version=VERSION, vault=self.vault, vocab=list(self._vocab),
                             docs=self._docs), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, os.path.join(self.dir, "index.pickle"))

    def log_from_thread(self, kind: str, **fields) -> None:
        trio.from_thread.run_sync(lambda: self.log.append(kind, **fields))

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
        embedder = Embedder(config, self.dir, self.vault)
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
        snap = self._for(snap, view)
        key = (view, snap.gen, self.vectors, self.embed_error, text)
        if self._cache[0] == key:  # stat then read: one query (and one embedding)
            return self._cache[1]
        terms = self._query_terms(text)
        weight = {t: 1.0 / max(1, snap.df(t)) for t in set(terms)}
        bm25 = snap.top(terms)
        ranked = self._semantic(snap, text, bm25) if self.embedder is not None else None
        if ranked is None:
            ranked = [(score, rel, None) for score, rel in bm25]
        head = NO_EMBED.format(model=self.embed_model, reason=self.embed_error) \
            if self.embed_error else ""
        lines = []
        for score, rel, hint in ranked:
            if view is not None and view.access(("vault", *rel.split("/"))) is None:
                continue
            hit = self._best_line(rel, weight, hint)
            if hit is not None:
                lines.append(f"{score:.3f} vault/{rel}:{hit[0]} {hit[1]}\n")
            if len(lines) == MAX_HITS:
                break
        out = head + "".join(lines)
        self._cache = ((view, snap.gen, self.vectors, self.embed_error, text), out)
        return out

    def _for(self, snap: Snapshot, view) -> Snapshot:
        """The index view searches (None: the whole vault's)."""
        if view is None:
            return snap
        vsnap = self.views.get(view)
        if vsnap is None:  # a view's first search: built here, then kept up to date
            vsnap = self.views[view] = self._view_snapshot(snap, view)
        return vsnap

    def _best_line(self, rel: str, weight: dict[str, float], hint: int | None = None
                   ) -> tuple[int, str] | None:
        """(line number, trimmed line) where the query's rarest terms meet (none: hint,
        the first line of the file's nearest chunk, else its first line); None: the
        file is gone (deleted since the build)."""
        try:
            fd = os.open(os.path.join(self.vault, rel), os.O_RDONLY | os.O_NOFOLLOW)
            with open(fd, "rb") as f:
                text = f.read(MAX_FILE).decode("utf-8", "replace")
        except OSError:
            return None
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
            found = set(self._query_terms(line)) & weight.keys()
            score = sum(weight[t] for t in found)
            if score > best:
                best, best_no = score, no
        lines = text.splitlines() or [""]
        if best == 0.0 and hint is not None and hint <= len(lines):
            best_no = hint
        elif best == 0.0 and first is not None:
            best_no = first
        return best_no, lines[best_no - 1].strip()[:SNIPPET]

    def status(self, view=None) -> str:
        """KEY=VALUE lines; as view sees it (its documents only, no vault-wide counts)."""
        snap = self.snapshot and self._for(self.snapshot, view)
        semantic = self.embedder is not None and self.vectors is not None \
            and not self.embed_error
        lines = [f"ready={'yes' if snap and not self.error else 'no'}",
                 f"docs={len(snap.paths) if snap else 0}",
                 f"ranking={'hybrid' if semantic else 'bm25'}"]
        if view is None:
            s = self.stats
            lines += [f"read={s['read']}", f"unchanged={s['unchanged']}",
                      f"removed={s['removed']}", f"builds={s['builds']}",
                      f"build_ms={self.build_ms:.0f}", f"pending={len(self._dirty)}",
                      f"rescans={s['rescans']}"]
            if self.embedder is not None:
                e = self.embedder
                lines += [f"embedded={e.files}", f"embed_pending={e.pending}",
                          f"embed_requests={e.requests}", f"query_embed_ms={self.embed_ms:.1f}"]
        if self.embed_model:
            lines.append(f"embed={self.embed_model}")
            lines.append(f"embed_error={self.embed_error}")
        return "\n".join(lines) + "\n"


def _skipped(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _regular(mode: int) -> bool:
    import stat
    return stat.S_ISREG(mode)
