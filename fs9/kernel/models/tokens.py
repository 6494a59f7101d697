"""How many tokens a text is, for budgets and compaction: counted with tiktoken's
cl100k_base (GPT-4's and GPT-3.5's encoding; a fair measure for other models' BPEs too).

tiktoken fetches an encoding's file from the internet on first use; a server may not
reach it. llama-index-core (a dependency) ships cl100k_base in its `_static/tiktoken_cache`
(MIT licensed, 1.7 MB): this reads that copy, checked against tiktoken's own sha256, and
never fetches. Without it, the count falls back to about 4 characters a token (labelled
`TOKENIZER`, and said once in the log), which undercounts JSON tool results ~2.6x and
Chinese text ~3.8x.
"""
import functools
import hashlib
import importlib.util
import logging
import os

from ... import heavy

log = logging.getLogger("fs9")
# tiktoken's cache key of cl100k_base (sha1 of its URL) and the file's sha256, as
# tiktoken_ext/openai_public.py states them
CL100K_KEY = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
FALLBACK = "estimate: 4 characters a token (no tiktoken cl100k_base file here)"


@functools.cache
def _encoding():
    """cl100k_base from llama-index-core's copy, or None (said once). Blocks ~0.4 s once."""
    try:
        tiktoken = heavy.load("tiktoken")
        spec = importlib.util.find_spec("llama_index.core")
        cache = os.path.join(spec.submodule_search_locations[0], "_static", "tiktoken_cache")
        with open(os.path.join(cache, CL100K_KEY), "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != CL100K_SHA256:
                raise ValueError(f"{f.name} is not cl100k_base")
        # tiktoken reads its cache folder from the environment only; set while loading
        # (as llama-index's get_tokenizer does), so agents' environments never carry it
        saved = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = cache
        try:
            return tiktoken.get_encoding("cl100k_base")
        finally:
            if saved is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = saved
    except (ImportError, OSError, ValueError, AttributeError, TypeError) as e:
        log.warning("token counts are an %s: %s", FALLBACK, e)
        return None


def tokenizer() -> str:
    """What counts tokens here, in words (the fallback says it is one)."""
    return "tiktoken cl100k_base" if _encoding() is not None else FALLBACK


# Longer texts are counted on their first EXACT_CHARS and scaled: tiktoken takes ~0.25 s a
# MB, and a request's first write (up to 16 MB) is checked in the server's event loop.
EXACT_CHARS = 16 << 10


def count(text: str) -> int:
    """Tokens in text (special-token markers in it count as plain text); past
    EXACT_CHARS, its first EXACT_CHARS' count scaled to its length."""
    if len(text) <= EXACT_CHARS:
        return _exact(text)
    return -(-_exact(text[:EXACT_CHARS]) * len(text) // EXACT_CHARS)


# a conversation's messages are counted again at each turn; at most 512 keys of at most
# EXACT_CHARS characters are held
@functools.lru_cache(maxsize=512)
def _exact(text: str) -> int:
    enc = _encoding()
    if enc is None:
        return len(text) // 4 + 1
    return len(enc.encode(text, disallowed_special=()))
