"""What the kernel sends back for a task made from a work_request (a mixin of Bus):
its `result` at the end and a `status_update` for each progress report, to the
requester's mailbox (reply-to), labelled its author's clearance like any delivery.
Only whoever asked gets them: a name killed and spawned again since is another agent
(in a cluster, told apart by its placement's spawn id, kept across moves: `stamp`).
"""
import errno
import time

from ...errors import Fs9Error
from ..names import one_line


class Replies:
    def _clustered(self, name: str) -> bool:
        """name is an agent placed in the cluster (kernel/cluster/forward.py)."""
        return self.kernel.cluster is not None and self.kernel.cluster.placed(name) is not None

    def stamp(self, name: str) -> str:
        """Which holder of cluster agent name this is: its placement's spawn id (drawn
        at its spawn in nodes/ctl, kept as it moves; a node, never an agent, writes
        it); "" for any other name."""
        placed = self.kernel.cluster.placed(name) if self.kernel.cluster is not None else None
        return str(placed.get("spawn", "")) if placed is not None else ""

    def asked(self, task) -> bool:
        """Whether task.reply_to still names whoever asked for the work. A name killed and
        spawned again since the request (its spawn numbered above the task; in the
        cluster, a spawn id other than the one stamped when the work was sent: task.asker)
        is another agent: it gets nothing of the first holder's work (the task's files
        keep it; its node checks again on delivery: cluster/mail.py). A peer OS's agent
        is that side's to check."""
        if "@" in task.reply_to:
            return True
        if self._clustered(task.reply_to):
            return task.asker == self.stamp(task.reply_to)
        holder = self.owner(task.reply_to)
        return holder is not None and holder.spawn_seq < task.id

    def send_result(self, agent, task) -> None:
        """The `result` of a task made from a work_request, to its requester's mailbox."""
        if not self.asked(task):
            return  # an agent since killed: the task's files keep the output
        out = bytes(self.kernel.stream(task, 1).data)
        self.deliver(self.compose(task.reply_to, agent.name, out, type="result",
                               **{"correlation-id": task.corr, "x-task": str(task.id),
                                  "x-status": task.state, "x-exit": str(task.exit)}),
                     asker=task.asker)

    def progress(self, agent, task, data: bytes) -> None:
        """A progress report from a running task: an event, and a status_update message
        to its requester when there is one."""
        if task.state != "running":
            raise Fs9Error(errno.EINVAL, f"task {task.id} is {task.state}, not running")
        # each report is an event and a message: held to the rate of the agent's steps
        self.kernel.rates.take(agent.name, "steps", len(data), time.monotonic())
        text = data.decode(errors="replace").strip()[:4096]
        self.kernel.log.append("task_progress", agent=agent.name, task=task.id,
                               corr=task.corr, text=text)
        task.progress = one_line(text)
        if self.asked(task):
            self.deliver(self.compose(task.reply_to, agent.name, (text + "\n").encode(),
                                   type="status_update", **{"correlation-id": task.corr,
                                                            "x-task": str(task.id)}),
                         asker=task.asker)
