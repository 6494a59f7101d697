"""Semantic search: an OpenAI-compatible embedding endpoint named in STATE/search.toml
ranks the vault with BM25 (hybrid); when it fails, results say so and fall back to
BM25, and it resumes when the endpoint answers again. Real HTTP through llama-index's
OpenAILikeEmbedding: the endpoint is a tiny local server. (An inotify queue overflow
and the rescan it causes: test_watch.py.)"""
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import Events
from test_search import hits, ready

DIM = 256
CONCEPTS = {"automobile": "car", "auto": "car", "vehicle": "car", "cars": "car",
            "motorcar": "car", "loaf": "bread", "baguette": "bread"}


def embed(text: str) -> list[float]:
    """A bag of concepts hashed into DIM buckets: synonyms land on the same bucket."""
    v = [0.0] * DIM
    for word in re.findall(r"\w+", text.lower()):
        word = CONCEPTS.get(word, word)
        v[int(hashlib.md5(word.encode()).hexdigest(), 16) % DIM] += 1.0
    return v


class EmbeddingServer:
    """POST /v1/embeddings as OpenAI answers it, on 127.0.0.1:port (0: a free one)."""

    def __init__(self, port: int = 0) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
                server.requests.append(texts)
                server.keys.append(self.headers.get("Authorization"))
                out = json.dumps({"object": "list", "model": body["model"], "data": [
                    {"object": "embedding", "index": i, "embedding": embed(t)}
                    for i, t in enumerate(texts)],
                    "usage": {"prompt_tokens": 1, "total_tokens": 1}}).encode()
                self.send_response(200 if self.path == "/v1/embeddings" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.requests: list[list[str]] = []
        self.keys: list[str | None] = []
        self.http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def endpoint():
    server = EmbeddingServer()
    yield server
    server.stop()


def configure(mount, toml: str) -> None:
    """Write STATE/search.toml, then mount again (it is read at mount)."""
    mount.umount()
    (mount.state / "search.toml").write_text(toml)
    mount.mount()


def status(mount) -> dict[str, str]:
    return dict(line.split("=", 1) for line in mount.read("search/status").splitlines())


def embedded(mount, n: int) -> dict[str, str]:
    return mount.wait_for(lambda: (s := status(mount)).get("embedded") == str(n)
                          and s["embed_pending"] == "0" and s["ranking"] == "hybrid" and s,
                          timeout=60, what=f"{n} files embedded")


def test_synonyms_found_then_fallback_and_recovery(mount, endpoint, monkeypatch):
    (mount.vault / "garage.md").write_text("# Garage\n\nThe car needs new tyres.\n")
    (mount.vault / "kitchen.md").write_text("Bake sourdough bread with rye flour.\n")
    (mount.vault / "notes.md").write_text("Meeting at noon about the budget.\n")
    ready(mount)
    assert hits(mount, "automobile") == []  # BM25 alone: no shared term
    configure(mount, f'embed = "openai:toy-embed"\n'
                     f'api_base = "http://127.0.0.1:{endpoint.port}/v1"\n'
                     f'api_key_env = "FS9_TEST_EMBED_KEY"\nretry_s = 0.3\n')
    # the key named by api_key_env comes from the daemon's environment: not set here
    status_ = ready(mount)
    assert "FS9_TEST_EMBED_KEY is not set" in status_["embed_error"]
    assert status_["ranking"] == "bm25"

    monkeypatch.setenv("FS9_TEST_EMBED_KEY", "sk-test-secret")
    mount.umount()
    mount.mount()
    events = Events(mount)
    try:
        ready(mount)
        s = embedded(mount, 3)
        assert s["embed"] == "openai:toy-embed" and s["embed_error"] == ""
        assert set(endpoint.keys) == {"Bearer sk-test-secret"}
        got = hits(mount, "automobile")
        # no query term in it: the snippet is the first line of its nearest chunk
        assert got[0].split(" ", 2)[1:] == ["vault/garage.md:1", "# Garage"], got
        assert all("kitchen" not in h for h in got)
        top = hits(mount, "baguette")[0].split()[1]
        assert top == "vault/kitchen.md:1"
        # BM25's hits stay: a query with a term ranks that file first
        assert hits(mount, "budget")[0].split()[1] == "vault/notes.md:1"
        n = len(endpoint.requests)
        assert hits(mount, "automobile") == got and len(endpoint.requests) == n  # cached
        # an edit is embedded again, alone
        (mount.vault / "notes.md").write_text("Sold the old vehicle at noon.\n")
        mount.wait_for(lambda: {h.split()[1] for h in hits(mount, "auto")[:2]} ==
                       {"vault/garage.md:1", "vault/notes.md:1"},
                       what="the edit embedded")
        assert [t for batch in endpoint.requests[n:] for t in batch
                if "noon" in t or "tyres" in t] == ["Sold the old vehicle at noon."]
        events.wait_kind("search_semantic")

        # the endpoint goes away: said in every result, one event, status
        port = endpoint.port
        endpoint.stop()
        for query in ("motorcar", "loaf", "motorcar"):
            note, *rest = hits(mount, query)
            assert note.startswith("fs9: embedding model openai:toy-embed is not available "
                                   f"(cannot reach http://127.0.0.1:{port}/v1: "), note
            assert note.endswith("); ranked by BM25")
            assert rest == []  # BM25 alone does not match synonyms
        assert hits(mount, "budget")[0].startswith("fs9: embedding model")
        s = status(mount)
        assert s["ranking"] == "bm25" and "Connection refused" in s["embed_error"]
        seen = events.wait_kind("search_fallback")
        # probes fail meanwhile (each counts in embed_requests; the next starts only after
        # the one before failed): still one event after two more have failed
        probes = int(status(mount)["embed_requests"])
        mount.wait_for(lambda: int(status(mount)["embed_requests"]) >= probes + 3,
                       what="two more failed probes")
        seen += [json.loads(line) for line in events.lines(0.2)]
        fallbacks = [e for e in seen if e["kind"] == "search_fallback"]
        assert len(fallbacks) == 1 and fallbacks[0]["model"] == "openai:toy-embed"
        assert "sk-test-secret" not in mount.read("log/audit") + json.dumps(seen)

        # it comes back (same port): semantic ranking resumes
        back = EmbeddingServer(port)
        try:
            events.wait_kind("search_semantic")
            got = hits(mount, "motorcar")
            assert not got[0].startswith("fs9:") and got[0].split()[1] in (
                "vault/garage.md:1", "vault/notes.md:1")
            assert status(mount)["ranking"] == "hybrid"
        finally:
            back.stop()
    finally:
        events.close()

    # vectors persist: a restart embeds nothing again
    back = EmbeddingServer(port)
    try:
        mount.umount()
        mount.mount()
        ready(mount)
        embedded(mount, 3)
        assert [t for batch in back.requests for t in batch] == ["fs9"]  # the probe only
        assert hits(mount, "automobile")[0].split()[1] == "vault/garage.md:1"
    finally:
        back.stop()


def test_an_endpoint_down_at_mount_says_so(mount, endpoint):
    (mount.vault / "a.md").write_text("lighthouse keeper\n")
    port = endpoint.port
    endpoint.stop()
    configure(mount, f'embed = "openai:toy-embed"\napi_base = "http://127.0.0.1:{port}/v1"\n')
    ready(mount)
    mount.wait_for(lambda: status(mount)["embed_error"], what="the failure")
    note, hit = hits(mount, "lighthouse")
    assert note.startswith("fs9: embedding model openai:toy-embed is not available (cannot "
                           f"reach http://127.0.0.1:{port}/v1")
    assert hit.split()[1] == "vault/a.md:1"
    assert mount.read("log/audit").count('"search_fallback"') == 1


def test_bad_configuration_is_said(mount):
    configure(mount, 'embed = "openai:"\n')
    assert "no model name" in ready(mount)["embed_error"]
    configure(mount, 'embed = "cohere:embed-v3"\n')
    assert "unknown provider 'cohere'" in ready(mount)["embed_error"]
    configure(mount, 'embed = "openai:x"\nretry_s = "soon"\n')
    assert "retry_s must be" in ready(mount)["embed_error"]
