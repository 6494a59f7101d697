"""Semantic ranking for vault search: an embedding model served by any OpenAI-compatible
/v1/embeddings endpoint, through llama-index's OpenAILikeEmbedding (kernel/vault/search.py
decides when; here: the model's configuration, the client, the stored vectors and how
their ranking merges with BM25's). A file's chunks are read beneath the vault root's fd
(kernel.vault_root, beneath.py), never through a symlink: a file that cannot be read
so has no vectors. Paths are tuples of names, as in index.py."""
import array
import collections
import math
import os
import pickle
import stat
import time
from typing import TYPE_CHECKING

from ... import heavy
from .beneath import VaultRoot

if TYPE_CHECKING:
    from .index import Snapshot

EMBED_CHUNK = 1000  # characters of a chunk embedded (whole lines; ~250 tokens)
EMBED_CHUNKS = 32  # chunks embedded per file: its first ~32 KB
EMBED_BATCH = 32  # chunks per embedding request
EMBED_PUBLISH_S = 2.0  # a long (first) embedding publishes what it has this often
EMBED_VERSION = 2  # of the persisted vectors (2: paths are tuples of names)
QUERY_TIMEOUT_S = 2.0  # a query's embedding request (the reader of search/QUERY waits)
DOC_TIMEOUT_S = 60.0  # a batch of chunks' embedding request (a worker thread)
QUERY_CACHE = 256  # query texts whose vectors are kept


def model_problem(model) -> str:
    """Why the configured embedding model cannot be used here ("" if it could)."""
    import importlib.util
    if not isinstance(model, str) or ":" not in model:
        return 'embed must be "huggingface:MODEL" or "openai:MODEL"'
    provider, _, name = model.partition(":")
    module, package = {
        "huggingface": ("llama_index.embeddings.huggingface",
                        "llama-index-embeddings-huggingface"),
        "openai": ("llama_index.embeddings.openai_like",
                   "llama-index-embeddings-openai-like")}.get(provider, (None, None))
    if package is None:
        return f"unknown provider {provider!r} (huggingface or openai)"
    if not name:
        return f'no model name: embed = "{provider}:NAME"'
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        return f"{package} is not installed"
    if provider == "huggingface":
        return ("local models are not wired into fs9: serve it from an OpenAI-compatible "
                'endpoint (embed = "openai:NAME", api_base = "http://HOST:PORT/v1")')
    return ""


def config_problem(config: dict) -> str:
    """What is wrong with search.toml's endpoint settings ("" if nothing)."""
    for key in ("api_base", "api_key_env"):
        if key in config and not (isinstance(config[key], str) and config[key]):
            return f"{key} must be a non-empty string"
    for key in ("retry_s", "query_timeout_s"):
        value = config.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            return f"{key} must be a positive number of seconds"
    return ""


def failure_reason(e: BaseException, embedder: "Embedder") -> str:
    """A failed embedding request, in a few words (never the key)."""
    import openai
    if isinstance(e, openai.APITimeoutError):
        return f"{embedder.api_base} did not answer in time"
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        return f"cannot reach {embedder.api_base}: {cause}"[:300]
    if isinstance(e, openai.APIStatusError):
        return f"{embedder.api_base} answered HTTP {e.status_code}: {e.message}"[:300]
    return f"{type(e).__name__}: {e}"[:300]


def fuse_rankings(bm25: list, near: list) -> list:
    """Relative-score fusion: each list's scores scaled to 0..1 (min-max), then
    averaged; [(score, path, line hint)], best first, zero scores dropped."""
    def scaled(pairs):
        if not pairs:
            return {}
        lo, hi = min(p[0] for p in pairs), max(p[0] for p in pairs)
        return {p[1]: (p[0] - lo) / (hi - lo) if hi > lo else 1.0 for p in pairs}
    b = scaled(bm25)
    n = scaled([(sim, rel) for sim, rel, _ in near if sim > 0])
    hints = {rel: line for _, rel, line in near}
    fused = [(0.5 * b.get(rel, 0.0) + 0.5 * n.get(rel, 0.0), rel) for rel in b.keys() | n.keys()]
    fused.sort(key=lambda x: (-x[0], x[1]))
    return [(score, rel, hints.get(rel)) for score, rel in fused if score > 0]


class Vectors:
    """The embedded chunks as queries see them (immutable, swapped whole): one
    unit-length row per chunk, the chunks of a file contiguous."""

    def __init__(self, docs: dict) -> None:
        import numpy as np
        self.paths = [rel for rel in sorted(docs) if docs[rel][3] is not None]
        mats = [docs[rel][3] for rel in self.paths]
        self.dim = mats[0].shape[1] if mats else 0
        self.matrix = np.concatenate(mats) if mats else np.zeros((0, 0), np.float32)
        counts = np.array([m.shape[0] for m in mats], dtype=np.int64)
        self.ends = np.cumsum(counts)
        self.starts = self.ends - counts
        self.lines = np.concatenate([docs[rel][2] for rel in self.paths]) if mats \
            else np.zeros(0, np.int32)

    def top(self, q, allowed: frozenset, k: int) -> list[tuple[float, str, int]]:
        """(cosine similarity, path, first line of its nearest chunk) of the k files
        nearest to unit vector q among allowed, nearest first."""
        import numpy as np
        if not self.paths:
            return []
        sims = self.matrix @ q
        per_file = np.maximum.reduceat(sims, self.starts)
        out = []
        for j in np.argsort(-per_file, kind="stable"):
            rel = self.paths[j]
            if rel in allowed:
                s, e = self.starts[j], self.ends[j]
                best = s + int(np.argmax(sims[s:e]))
                out.append((float(per_file[j]), rel, int(self.lines[best])))
                if len(out) == k:
                    break
        return out


class Embedder:
    """The configured embedding model (llama-index's OpenAILikeEmbedding: any model
    name, any OpenAI-compatible /v1/embeddings) and the vault's chunk vectors.
    open/sync/publish run in worker threads (one at a time); query_vector on the trio
    thread, with its own client."""

    def __init__(self, config: dict, state: str, root: VaultRoot) -> None:
        self.model = config["embed"]  # openai:NAME
        self.name = self.model.partition(":")[2]
        self.api_base = config.get("api_base") or os.environ.get(
            "OPENAI_API_BASE", "https://api.openai.com/v1")
        self._key = config["api_key"]  # from the daemon's environment; never logged
        self.query_timeout = float(config.get("query_timeout_s", QUERY_TIMEOUT_S))
        self.file = os.path.join(state, "vectors.pickle")
        self.root = root  # the vault, reached beneath its fd only
        self.vault = root.path  # which vault the saved vectors are of
        self.announced = False  # search_semantic logged once it first worked
        self.loaded = False
        self.files = 0  # files with vectors
        self.pending = 0  # files waiting for theirs
        self.requests = 0  # embedding requests made (documents and queries)
        # rel -> (mtime_ns, size, first line of each chunk, unit rows or None: no text)
        self._docs: dict = {}
        self._queries: collections.OrderedDict = collections.OrderedDict()
        self._doc_model = self._query_model = None
        self._redo = False  # the vectors were dropped during a sync: all are embedded again

    def _client(self, timeout: float):
        OpenAILikeEmbedding = heavy.load("llama_index.embeddings.openai_like",
                                         "OpenAILikeEmbedding")
        # max_retries=0: one attempt; fs9 retries itself, in the background
        return OpenAILikeEmbedding(model_name=self.name, api_base=self.api_base,
                                   api_key=self._key, timeout=timeout, max_retries=0,
                                   embed_batch_size=EMBED_BATCH)

    def open(self) -> None:
        """Worker thread: the clients (importing openai takes a second) and the saved
        vectors of this model."""
        self._doc_model = self._client(DOC_TIMEOUT_S)
        self._query_model = self._client(self.query_timeout)
        try:
            with open(self.file, "rb") as f:
                saved = pickle.load(f)
        except Exception:  # none yet, or damaged: embedded again
            return
        if saved.get("version") == EMBED_VERSION and saved.get("vault") == self.vault and \
                saved.get("model") == (self.model, self.api_base):
            self._docs = saved["docs"]
            self.loaded = True

    def cached_vector(self, text: str):
        """text's unit vector if query_vector made it lately, else None. Does not block."""
        q = self._queries.get(text)
        if q is not None:
            try:
                self._queries.move_to_end(text)
            except KeyError:  # dropped meanwhile by a worker's query_vector
                pass
        return q

    def query_vector(self, text: str):
        """A worker thread (Search.prepare), or cached: text's unit vector. Raises if it fails."""
        import numpy as np
        q = self._queries.get(text)
        if q is None:
            self.requests += 1
            q = _unit(np.asarray([self._query_model.get_query_embedding(text)], np.float32))[0]
            self._queries[text] = q
            if len(self._queries) > QUERY_CACHE:
                self._queries.popitem(last=False)
        else:
            self._queries.move_to_end(text)
        return q

    def sync(self, snap: "Snapshot", probe: bool) -> tuple["Vectors | None", str, bool]:
        """Worker thread: embed the files of snap whose mtime or size changed, drop
        gone ones; for EMBED_PUBLISH_S at most. (new Vectors or None: unchanged,
        error or "", more to do). probe: ask the endpoint even if nothing changed."""
        meta = dict(zip(snap.paths, snap.meta))
        changed = False
        for rel in [r for r in self._docs if r not in meta]:
            del self._docs[rel]
            changed = True
        todo = [rel for rel in snap.paths
                if rel not in self._docs or self._docs[rel][:2] != tuple(meta[rel])]
        error, done, t0 = "", 0, time.monotonic()
        try:
            if probe and not todo:
                self.requests += 1
                self._doc_model.get_text_embedding_batch(["fs9"])
            while done < len(todo) and time.monotonic() - t0 < EMBED_PUBLISH_S:
                batch, texts = [], []
                while done < len(todo) and len(texts) < EMBED_BATCH:
                    rel = todo[done]
                    done += 1
                    read = self._chunks(rel)
                    if read is None:
                        changed |= self._docs.pop(rel, None) is not None
                        continue
                    batch.append((rel, *read))
                    texts += read[3]
                vecs = self._embed(texts)
                at = 0
                for rel, mtime, size, lines, chunks in batch:
                    rows = vecs[at:at + len(chunks)] if chunks else None
                    at += len(chunks)
                    self._docs[rel] = (mtime, size, lines, rows)
                changed = True
        except Exception as e:
            error = failure_reason(e, self)
        redo, self._redo = self._redo, False
        self.pending = sum(1 for rel in todo if rel not in self._docs
                           or self._docs[rel][:2] != tuple(meta[rel]))
        self.files = sum(1 for d in self._docs.values() if d[3] is not None)
        if not changed:
            return None, error, False
        self._save()
        return self.publish(), error, not error and (redo or done < len(todo))

    def _embed(self, texts: list[str]):
        import numpy as np
        if not texts:
            return np.zeros((0, 0), np.float32)
        self.requests += math.ceil(len(texts) / EMBED_BATCH)
        vecs = self._doc_model.get_text_embedding_batch(texts)
        if len(vecs) != len(texts):
            raise ValueError(f"bad answer: {len(vecs)} vectors for {len(texts)} texts")
        vecs = _unit(np.asarray(vecs, np.float32))
        dims = {d[3].shape[1] for d in self._docs.values() if d[3] is not None}
        if dims and dims != {vecs.shape[1]}:  # the model changed behind its name
            self._docs.clear()
            self._redo = True
        return vecs

    def _chunks(self, rel: tuple[str, ...]):
        """(mtime_ns, size, first line of each chunk, chunk texts) of a text file's
        first EMBED_CHUNKS chunks of about EMBED_CHUNK characters (whole lines);
        None: gone, not text or not reachable beneath the vault root."""
        try:
            st = self.root.lstat(rel)
        except OSError:
            return None
        data = self.root.read(rel, EMBED_CHUNK * EMBED_CHUNKS * 2) \
            if stat.S_ISREG(st.st_mode) else None
        if data is None or b"\0" in data[:8192]:
            return None
        starts, texts, cur, first, size = array.array("i"), [], [], 0, 0
        for no, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if not cur and not line.strip():
                continue
            if not cur:
                first = no
            cur.append(line.strip())
            size += len(line) + 1
            if size >= EMBED_CHUNK:
                starts.append(first)
                texts.append(" ".join(cur)[:EMBED_CHUNK * 2])
                cur, size = [], 0
                if len(texts) == EMBED_CHUNKS:
                    break
        if cur and len(texts) < EMBED_CHUNKS:
            starts.append(first)
            texts.append(" ".join(cur)[:EMBED_CHUNK * 2])
        return st.st_mtime_ns, st.st_size, starts, texts

    def publish(self) -> Vectors:
        import numpy as np
        docs = {rel: (m, s, np.frombuffer(lines, np.int32) if len(lines) else
                      np.zeros(0, np.int32), rows)
                for rel, (m, s, lines, rows) in self._docs.items()}
        return Vectors(docs)

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.file), exist_ok=True)
        tmp = self.file + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(dict(version=EMBED_VERSION, vault=self.vault,
                             model=(self.model, self.api_base), docs=self._docs),
                        f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self.file)


def _unit(m):
    """Rows scaled to length 1 (zero rows stay zero)."""
    import numpy as np
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms > 0, norms, 1.0)
