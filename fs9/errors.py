"""The one error type that crosses from the kernel to the FUSE face.

The kernel never imports pyfuse3; it raises Fs9Error(errno, text) and the face
turns the errno into the reply and the text into an event (lib9p's
respond(r, "reason")). Texts are grep-able constants where they repeat.
"""
import errno as _errno


class Fs9Error(Exception):
    """A request refused for a stated reason; `errno` is what the caller sees."""

    def __init__(self, errno: int, text: str):
        super().__init__(text)
        self.errno = errno
        self.text = text

    def __str__(self) -> str:
        return f"{self.text} ({_errno.errorcode.get(self.errno, self.errno)})"


class StateError(Exception):
    """The state directory cannot be served, said in one line (the mount's answer). Here,
    not in kernel/state.py, so that `fs9 mount --background`'s parent, which only passes
    the server's answer on, loads no event loop."""


class EngineError(Exception):
    """NATS said no or did not answer (the text says which). Here, not beside the
    client, so that catching it does not load nats-py (0.6 s of a mount's start)."""


UNKNOWN_VERB = "unknown control message"
BAD_NARG = "bad # args to command"
NO_AGENT = "no such agent"
AGENT_EXISTS = "agent already exists"


class UsageError(Exception):
    """A command line fs9 cannot act on: said in one line, exit status 2."""
