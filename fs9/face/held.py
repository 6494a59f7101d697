"""What each agent holds open in fs9: files and directories, counted by opener.

Each open is state in fs9's memory until its release (a handle: a topic's cursor, a
directory's listing copied at opendir, a message being written), and a process's own
descriptor limit bounds nothing here: an agent has many processes (`[limits]
processes`), each with the open files limit fs9's children inherit. So an agent holds
at most OPEN_PER_AGENT at once; past it an open is EMFILE, as the kernel says for a
process's own limit, with the reason in the agent's err. The operator's (and every
open outside a view) are not counted.
"""
import collections
import errno

from ..errors import Fs9Error

OPEN_PER_AGENT = 4096


class Held:
    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self._of: dict[int, str] = {}  # fh -> the agent holding it
        self.count: collections.Counter[str] = collections.Counter()

    def check(self, agent: str | None, path: tuple[str, ...]) -> None:
        """Fs9Error(EMFILE) if agent holds OPEN_PER_AGENT opens already."""
        if agent is not None and self.count[agent] >= OPEN_PER_AGENT:
            e = Fs9Error(errno.EMFILE, f"agent {agent} holds {OPEN_PER_AGENT} files and "
                                       "directories of fs9 open: close some first")
            self.kernel.refused(e, agent=agent, file="/".join(path[-2:]))
            raise e

    def add(self, fh: int, agent: str | None) -> None:
        if agent is not None:
            self._of[fh] = agent
            self.count[agent] += 1

    def drop(self, fh: int) -> None:
        agent = self._of.pop(fh, None)
        if agent is not None:
            self.count[agent] -= 1
            if not self.count[agent]:
                del self.count[agent]
