"""Heavy libraries (llama-index: seconds to import; tiktoken and bm25s under it) imported on their first use, one
thread at a time. Python's import lock is per module: two worker threads importing
llama-index at once (the vault's index and a model call at a mount's start) each meet
modules the other has half made, and one of them fails (a "partially initialized
module" ImportError, or a KeyError inside importlib). Every lazy import of such a
library goes through `load`.
"""
import importlib
import threading

_one_at_a_time = threading.Lock()


def load(module: str, name: str = ""):
    """module (or its attribute name), imported (once, by one thread) if need be."""
    with _one_at_a_time:
        found = importlib.import_module(module)
    return getattr(found, name) if name else found
