"""What each agent holds open in fs9: files and directories, counted by opener.

Each open is state in fs9's memory until its release (a handle: a topic's cursor, a
directory's listing copied at opendir, a message being written), and a process's own
descriptor limit bounds nothing here: an agent has many processes (`[limits]
processes`), each with the open files limit fs9's children inherit. So an agent holds
at most OPEN_PER_AGENT at once; past it an open is EMFILE, as the kernel says for a
process's own limit, with the reason in the agent's err. The operator's (and every
open outside a view) are not counted.

Each open also holds bytes for its reads: a file's text rendered at open, a message, a
batch, the rest of a line, a directory's listing copied at opendir (ENTRY_BYTES an
entry). An agent's opens hold at most BYTES_PER_AGENT together: a read (or opendir)
that would start holding more when they hold that much already is EDQUOT, with the
reason, until the agent closes some (one open may go past it by what one read renders,
a message of at most 1 MiB, a batch's lines, never more).

And bytes written and not yet applied (a `whole` ctl's input: a message, a task's input,
a note, a model request; a mail/batch line begun): at most PENDING_PER_AGENT an agent
together, a write past it EDQUOT with the reason (`written`).
"""
import collections
import errno

from ..errors import Fs9Error

OPEN_PER_AGENT = 4096
BYTES_PER_AGENT = 64 << 20
ENTRY_BYTES = 512  # what an entry of a listing copied at opendir costs, about
PENDING_PER_AGENT = 64 << 20
_written: collections.Counter[str] = collections.Counter()  # by agent (None: operator)


def written_room(agent: str | None, grow: int) -> None:
    """Fs9Error(EDQUOT) if agent's open files may not hold grow bytes more written and
    not yet applied."""
    if agent is not None and grow > 0 and _written[agent] + grow > PENDING_PER_AGENT:
        raise Fs9Error(errno.EDQUOT, f"agent {agent} has {_written[agent]} bytes written "
                                     "and not yet closed in its open files; close some")


def written(agent: str | None, grow: int) -> None:
    """agent's open files hold grow bytes more (fewer if negative) written and not yet
    applied; Fs9Error(EDQUOT), nothing counted, if that is past PENDING_PER_AGENT."""
    written_room(agent, grow)
    if agent is not None and grow:
        if _written[agent] + grow > 0:
            _written[agent] += grow
        else:
            _written.pop(agent, None)


class Held:
    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self._of: dict[int, str] = {}  # fh -> the agent holding it
        self.count: collections.Counter[str] = collections.Counter()
        self._kept: dict[int, int] = {}  # fh -> bytes it holds for its reads
        self.bytes: collections.Counter[str] = collections.Counter()  # their sum, by agent

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

    def room(self, fh: int, kept: int, path=lambda: ()) -> None:
        """Fs9Error(EDQUOT) if fh, holding kept bytes now, may not start holding more:
        it holds nothing yet and its agent's opens hold BYTES_PER_AGENT already (path:
        () -> the file's path, for the refusal's record)."""
        agent = self._of.get(fh)
        if agent is not None and not kept and self.bytes[agent] >= BYTES_PER_AGENT:
            e = Fs9Error(errno.EDQUOT, f"agent {agent}'s open files of fs9 hold "
                                       f"{self.bytes[agent]} bytes read or listed and not "
                                       "yet closed: close some first")
            self.kernel.refused(e, agent=agent, file="/".join(path()[-2:]))
            raise e

    def keep(self, fh: int, n: int) -> None:
        """fh holds n bytes for its reads now (counted against its agent)."""
        agent = self._of.get(fh)
        if agent is None or n == self._kept.get(fh, 0):
            return
        self.bytes[agent] += n - self._kept.get(fh, 0)
        if n:
            self._kept[fh] = n
        else:
            del self._kept[fh]
        if self.bytes[agent] <= 0:
            del self.bytes[agent]

    def drop(self, fh: int) -> None:
        self.keep(fh, 0)
        agent = self._of.pop(fh, None)
        if agent is not None:
            self.count[agent] -= 1
            if not self.count[agent]:
                del self.count[agent]
