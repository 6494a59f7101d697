"""The vault's BM25 index (llama-index's BM25Retriever over bm25s): offline, no model.

Contract:
  - one document per vault file (text files up to MAX_FILE bytes; names starting
    with "." and everything under them, like .git, are not indexed). A path is a tuple
    of names (str, undecodable bytes as surrogate escapes): any name Linux allows;
  - every disk access (the scan, each file's lstat and read, "is it still there") is
    made beneath the vault root's fd (kernel.vault_root, beneath.py): a symlink
    anywhere on a path is never followed, so a folder swapped for a symlink (to the
    state directory, to a root-only directory of the host) shows nothing beyond it,
    and its documents leave the index at the next update of that path or the next
    scan. Walks are iterative and bounded (MAX_ENTRIES); a path that cannot be read
    is left out of the index, never fails a build;
  - the index lives in STATE/search/index.pickle: each file's mtime, size and terms.
    A restart scans the vault and re-reads only files whose mtime or size changed;
  - a change (the watcher, or fs9's own vault operations) marks a path dirty (`touch`);
    the indexer re-reads the dirty paths and rebuilds the BM25 index in a worker thread
    (DEBOUNCE_S after the first change of a burst), then swaps the new Snapshot in:
    queries (search.py) never wait for a build and never see half of one;
  - a view's index is built over the files that view shows (`view_snapshot`), so no
    hidden file shapes its scores.
Builds, loads and saves run in worker threads and touch only the store, never a
published Snapshot.
"""
import array
import collections
import os
import pickle
import re
import stat
import time
from typing import Callable

import trio

from ... import heavy
from .beneath import VaultRoot

MAX_HITS = 20  # lines a query renders
MAX_FILE = 4 << 20  # bytes: bigger files are not indexed
MAX_ENTRIES = 1_000_000  # directory entries one walk lists (a bigger vault: indexed in part)
DEBOUNCE_S = 0.05  # a burst of changes costs one build
VERSION = 2  # of the persisted index (2: paths are tuples of names)
TOKEN = re.compile(r"(?u)\b\w\w+\b")  # bm25s's default token pattern


class Terms:
    """Text -> index terms: lower case, English stop words out, Snowball-stemmed. Not
    thread-safe (the Stemmer): one per thread."""

    def __init__(self) -> None:
        import Stemmer
        from bm25s.stopwords import STOPWORDS_EN
        self.stem = Stemmer.Stemmer("english").stemWords
        self.stop = frozenset(STOPWORDS_EN)

    def __call__(self, text: str) -> list[str]:
        return self.stem([w for w in TOKEN.findall(text.lower()) if w not in self.stop])


class Snapshot:
    """An immutable index as queries see it (swapped whole, never changed)."""

    def __init__(self, gen: int, paths: list[tuple[str, ...]], ids: list,
                 vocab: dict[str, int], meta: list | None = None) -> None:
        self.gen = gen
        self.paths = paths  # vault-relative, like ("docs", "a.md"); position = document number
        self.ids = ids  # each document's term ids (to build views' indexes from)
        self.vocab = vocab  # term -> id (a copy: the store's grows)
        self.meta = meta  # each document's (mtime_ns, size) as indexed (whole vault's only)
        self._pathset: frozenset | None = None
        self.retriever = None
        if paths:
            bm25s = heavy.load("bm25s")
            BM25Retriever = heavy.load("llama_index.retrievers.bm25", "BM25Retriever")
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

    def top(self, query: list[str]) -> list[tuple[float, tuple[str, ...]]]:
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


class Index:
    """The store (written only by the worker thread of the current job), the indexer
    loop (`run`) and the published Snapshot with its views' subsets."""

    def __init__(self, root: VaultRoot, state_dir: str, log,
                 published: Callable[[], None]) -> None:
        self.root = root  # the vault, reached beneath its fd only
        self.dir = state_dir  # STATE/search
        self.log = log  # the kernel's EventLog
        self._published = published  # called on the trio thread after each swap
        self.snapshot: Snapshot | None = None  # None until the first build
        self.views: dict = {}  # View -> its Snapshot (rebuilt after each build)
        self.stats = collections.Counter()  # read unchanged removed builds (since start)
        self.build_ms = 0.0
        self._rescan = False  # the watcher lost events: compare the whole vault
        self._terms: Terms | None = None  # the worker's (a Stemmer is not thread-safe)
        self._dirty: set[tuple[str, ...]] = set()  # paths changed since the last build
        self._wake = trio.Event()
        self._docs: dict[tuple[str, ...], tuple[int, int, array.array]] = {}
        self._vocab: dict[str, int] = {"": 0}  # "": bm25s's empty token, so it adds none

    @property
    def pending(self) -> int:
        return len(self._dirty)

    def view_snapshot(self, view) -> "Snapshot":
        """The index view searches (None: the whole vault's), built here if no search
        made it yet (a search makes it in its worker thread: keep_view); later builds
        keep it up to date."""
        snap = self.snapshot
        if view is None:
            return snap
        vsnap = self.views.get(view)
        if vsnap is None:
            vsnap = self.views[view] = self.view_subset(snap, view)
        return vsnap

    def keep_view(self, snap: Snapshot, view, vsnap: Snapshot) -> None:
        """Trio thread: vsnap, view's subset of snap made elsewhere (a worker thread),
        kept for the next queries unless a newer snapshot came meanwhile."""
        if view is not None and self.snapshot is snap and view not in self.views:
            self.views[view] = vsnap

    async def run(self) -> None:
        """Load, bring up to date, then rebuild after each burst of changes; until
        cancelled."""
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

    def touch(self, rel: tuple[str, ...]) -> None:
        """A vault path (a tuple of names, like ("docs", "a.md")) changed, appeared or
        went away."""
        if rel and not _skipped(rel):
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
        self._published()

    def _startup(self) -> Snapshot:
        """Worker thread: the persisted index, plus what changed in the vault since."""
        self._terms = Terms()
        self._load()
        self._scan_all()
        self._save()
        return self._snapshot()

    def _scan_all(self) -> None:
        """Worker thread: every vault file compared with the index, gone ones dropped."""
        seen = self._walk(())
        for rel in set(self._docs) - seen:
            del self._docs[rel]
            self.stats["removed"] += 1

    def _walk(self, top: tuple[str, ...]) -> set:
        """Worker thread: (re-)index every file beneath folder top; the paths seen."""
        seen = set()
        for rel, st in self.root.walk(top, skip=_hidden, max_entries=MAX_ENTRIES):
            seen.add(rel)
            self._index_file(rel, st)
        return seen

    def _update(self, dirty: set, views: list, full: bool = False
                ) -> tuple[Snapshot, dict]:
        """Worker thread: re-read the dirty paths (full: the whole vault's changed
        files), rebuild (the caller saves)."""
        if full:
            self.stats["rescans"] += 1
            self._scan_all()
            dirty = set()
        for rel in dirty:
            try:
                self._update_path(rel)
            except OSError:  # a name Linux refuses: nothing there to index
                pass
        snap = self._snapshot()
        return snap, {view: self.view_subset(snap, view) for view in views}

    def _update_path(self, rel: tuple[str, ...]) -> None:
        """Worker thread: rel changed. A folder (made or moved here) is walked; the
        documents beneath rel that are not there any more (a folder removed, or
        swapped for a file or a symlink) leave the index."""
        try:
            st = self.root.lstat(rel)
        except OSError:  # gone, a symlink on the way, a name Linux refuses
            st = None
        seen = self._walk(rel) if st is not None and stat.S_ISDIR(st.st_mode) else set()
        self._index_file(rel, st)  # a file, or nothing: a folder is no document
        n = len(rel)
        for gone in [p for p in self._docs if len(p) > n and p[:n] == rel and p not in seen]:
            del self._docs[gone]
            self.stats["removed"] += 1

    def _index_file(self, rel: tuple[str, ...], st: os.stat_result | None = None) -> None:
        """(Re-)index one file (st: its lstat, if known) if its mtime or size changed;
        drop it if it is gone, not a regular file or not reachable beneath the root."""
        if st is None:
            try:
                st = self.root.lstat(rel)
            except OSError:
                st = None
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE:
            if self._docs.pop(rel, None) is not None:
                self.stats["removed"] += 1
            return
        old = self._docs.get(rel)
        if old is not None and old[:2] == (st.st_mtime_ns, st.st_size):
            self.stats["unchanged"] += 1
            return
        data = self.root.read(rel, MAX_FILE)  # None: gone, or a symlink on the way
        if data is None or b"\0" in data[:8192]:  # not text
            if self._docs.pop(rel, None) is not None:
                self.stats["removed"] += 1
            return
        self.stats["read"] += 1
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
    def view_subset(snap: Snapshot, view) -> Snapshot:
        """The documents of snap that view shows, as an index of their own (pure: any
        thread)."""
        return snap.subset([view.access(("vault", *p)) is not None for p in snap.paths])

    def _load(self) -> None:
        try:
            with open(os.path.join(self.dir, "index.pickle"), "rb") as f:
                saved = pickle.load(f)
        except FileNotFoundError:
            return
        except Exception as e:  # a damaged index is rebuilt, and said so
            self.log_from_thread("search_index_damaged", reason=str(e))
            return
        if saved.get("version") == VERSION and saved.get("vault") == self.root.path:
            self._vocab = {t: i for i, t in enumerate(saved["vocab"])}
            self._docs = saved["docs"]

    def _save(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = os.path.join(self.dir, "index.pickle.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(dict(version=VERSION, vault=self.root.path, vocab=list(self._vocab),
                             docs=self._docs), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, os.path.join(self.dir, "index.pickle"))

    def log_from_thread(self, kind: str, **fields) -> None:
        trio.from_thread.run_sync(lambda: self.log.append(kind, **fields))


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _skipped(rel: tuple[str, ...]) -> bool:
    return any(map(_hidden, rel))
