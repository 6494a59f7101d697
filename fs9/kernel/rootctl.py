"""The root `ctl`: spawn, kill, halt, resume, dismiss; the operator's (or, through its
view, an agent's with the spawn pledge) commands to the kernel, and the root `err`.

A mixin of Kernel, like lifecycle.py: every line of a write is checked before any is
applied (lib9p's rule: a whole write or nothing), then each is recorded as events.
"""
import errno
import os
import time

from ..errors import AGENT_EXISTS, NO_AGENT, Fs9Error
from . import cmd, supervision
from .agents import sandbox as sandboxes, spawn
from .agents.agent import Agent
from .names import one_line

CMDS = (
    cmd.Cmd("spawn", "spawn", 1, None, usage="spawn NAME [KEY=VALUE ...]"),
    cmd.Cmd("kill", "kill", 1, 1, usage="kill NAME"),
    cmd.Cmd("halt", "halt", usage="halt"),
    cmd.Cmd("resume", "resume", usage="resume"),
    cmd.Cmd("dismiss", "dismiss", 1, 1, usage="dismiss SEQ|all"),
)


class RootCtl:
    """The root ctl's commands (Kernel's; it holds the state they change)."""

    def ctl(self, data: bytes, by: str | None = None) -> None:
        """The root ctl; `by`: the agent writing it through its view (None: the operator)."""
        parsed = cmd.parse(CMDS, data)
        names, spawns, plans = set(self.agents), [], {}
        for p in parsed:  # every line is checked before any is applied
            if p.cmd.verb == "spawn":
                if by is not None:
                    spawn.check_words_of_agent(self.agent(by), p.args)
                # (a supervisor's subtree)
                tree = plans[id(p)] = supervision.plan(self, *p.args, by=by)
                if by is not None and tree[0][1]["unconfined"]:
                    raise Fs9Error(errno.EPERM, f"agent {by} may not start the unconfined "
                                                f"agent {p.args[0]}")
                for name, manifest, home, _ in tree:
                    if name in names:
                        raise Fs9Error(errno.EEXIST, f"{AGENT_EXISTS}: {name}")
                    names.add(name)
                    spawns.append((home, manifest))
                spawn.check_room(self, spawns, by)
                asker = self.agents.get(by) if by is not None else None
                if asker is not None and asker.manifest.get("approval", {}).get("spawn"):
                    line = one_line(" ".join(p.args))  # the operator's yes (approvals.py)
                    self.approvals.gate(asker, "spawn", line, f"spawn {line}",
                                        asker.current.corr if asker.current else None, True)
            elif p.cmd.verb == "kill":
                if p.args[0] not in names or (by is not None and not self._reaches(by, p.args[0])):
                    raise Fs9Error(errno.ENOENT, f"{NO_AGENT}: {p.args[0]}")
                if self.cluster is not None:
                    self.cluster.refuse_kill(p.args[0])
                if by is not None and p.args[0] in self.agents and \
                        supervision.children(self, self.agents[p.args[0]]):
                    raise Fs9Error(errno.EPERM, f"agent {by} may not kill the supervisor "
                                                f"{p.args[0]}: supervision trees are the operator's")
                names -= {a.name for a in supervision.subtree(self, self.agents[p.args[0]])} \
                    if p.args[0] in self.agents else {p.args[0]}
            elif p.cmd.verb in ("halt", "resume"):
                if by is not None:  # the kill switch: an agent (its spawn pledge lets it
                    # write here) would stop everyone's work, or undo the operator's halt
                    raise Fs9Error(errno.EPERM, f"only the operator halts or resumes fs9, "
                                                f"not agent {by}")
            elif p.cmd.verb == "dismiss":
                if by is not None:
                    raise Fs9Error(errno.EPERM, f"only the operator dismisses set-aside "
                                                f"events, not agent {by}")
                self._set_aside(p.args[0])
        if by is not None:  # each line an event (a spawn, a kill): an agent's at a rate
            self.rates.take(by, "commands", len(data), time.monotonic(), count=len(parsed))
        uids = sandboxes.UidPicker(self)  # (vetted ahead, or one walk of /proc a write)
        for p in parsed:
            if p.cmd.verb == "spawn":  # a line alone: nothing changed since its check
                self.spawn(*p.args, by=by, uids=uids,
                           planned=plans[id(p)] if len(parsed) == 1 else None)
            else:
                getattr(self, p.cmd.method)(*p.args)

    def _reaches(self, by: str, name: str) -> bool:
        """Agent `by` may end agent `name`: it is in by's view, or by spawned it. (Else
        `name` does not exist for it: the same ENOENT as a name nobody has.)"""
        target, asker = self.agents.get(name), self.agents.get(by)
        return target is not None and asker is not None and (
            target.spawned_by == by or asker.view.access(("agents", name)) is not None)

    def knows(self, by: str, name: str) -> bool:
        """Agent `by` may know that agent `name` exists: it is itself; by's view shows
        something of agents/NAME or of a vault subtree NAME owns; by pledges discover
        (the registry lists every agent); by started it; or it asked by for by's
        current task. To by, any other agent answers everywhere as a name nobody has
        (docs/security.md)."""
        asker, target = self.agents.get(by), self.agents.get(name)
        if asker is None or target is None:
            return False
        view = asker.view
        return (name == by or "discover" in view.pledges or target.spawned_by == by
                or view.access(("agents", name)) is not None
                or any(view.access(owned) is not None for owned in target.view.owns)
                or (asker.current is not None and asker.current.reply_to == name
                    and self.bus.asked(asker.current)))  # (not the name's next holder)

    def spawn(self, name: str, *overrides: str, by: str | None = None,
              uids: "sandboxes.UidPicker | None" = None, planned: list | None = None) -> Agent:
        """Spawn NAME; a supervisor with its subtree, parents first, all checked first.
        `uids`: the write's picker of free uids, when the caller has one; `planned`: its
        supervision.plan, made by the caller with nothing changed since (else made
        here: the lines of a write before it may have claimed what it claims)."""
        uids = sandboxes.UidPicker(self) if uids is None else uids
        for each, manifest, home, sup in planned or supervision.plan(self, name, *overrides,
                                                                     by=by):
            os.makedirs(home, exist_ok=True)
            offset = uids.next(each, manifest)
            try:
                self.record("spawn", agent=each, manifest=manifest, home=home,
                            uid_offset=offset, **({"by": by} if by else {}),
                            **({"supervisor": sup} if sup else {}))
            except BaseException:  # (the log refused it: a sandbox made ahead for that
                self.sandbox_pool.untake(self, offset)  # uid goes back to the pool)
                raise
        return self.agents[name]

    def kill(self, name: str) -> None:
        agent = self.agent(name)
        for child in reversed(supervision.children(self, agent)):  # a supervisor's first
            self.kill(child.name)
        self.record("kill", agent=name)
        agent._cancel_run("cancelled")
        self.models.owner_killed(name)  # (its name may be spawned again, by anyone)
        self.approvals.owner_killed(name)
        self.memory.owner_killed()  # (its notes stay for a respawn, within a bound)

    def halt(self) -> None:
        self.record("halt")
        for agent in self.agents.values():
            agent._cancel_run("requeue")
        self.models.halt()

    def resume(self) -> None:
        self.record("resume")

    def dismiss(self, which: str) -> None:
        """The operator has seen set-aside event SEQ (or all of them): stop reporting it.
        It stays in the log, set aside at every replay."""
        seqs = self._set_aside(which)
        self.log.append("set_aside_dismissed", events=seqs)
        self.log.dismiss(seqs)

    def _set_aside(self, which: str) -> list[int]:
        """The set-aside events `which` (SEQ or all) names, not dismissed yet; else ENOENT."""
        pending = [r.seq for r in self.log.set_aside()]
        if which == "all" and pending:
            return pending
        if which.isascii() and which.isdigit() and int(which) in pending:
            return [int(which)]
        raise Fs9Error(errno.ENOENT, f"no set-aside event {which!r} to dismiss "
                                     f"(the root err lists them)")

    def err(self) -> str:
        """The root `err`: what the operator should know. The operator's refused
        commands; the events replay set aside and the operator has not dismissed; why
        the log refuses writes now, if it does: one line each."""
        return (self.notes.decode(errors="replace")
                + "".join(f"fs9: {r.describe()}; dismiss with: echo 'dismiss {r.seq}' > ctl\n"
                          for r in self.log.set_aside())
                + "".join(f"fs9: {t}\n" for t in self.log.troubles()))
