"""Restart decisions for daemon agents, in OTP's words (supervisor.erl).

restart = permanent: the child is always restarted.
restart = transient: restarted only if it terminates abnormally (exit status != 0).
restart = temporary: never restarted.
Intensity: if more than max_restarts restarts occur within within_s seconds, the
supervisor gives up on the child: the agent is marked failed and the failure is
escalated as an event. Pure functions; the clock is an argument.
"""
from dataclasses import dataclass, field


def should_restart(policy: str, exit_status: int) -> bool:
    if policy == "permanent":
        return True
    if policy == "transient":
        return exit_status != 0
    return False


@dataclass
class RestartWindow:
    max_restarts: int
    within_s: float
    stamps: list[float] = field(default_factory=list)  # restarts inside the window

    def add(self, now: float) -> bool:
        """Record a restart at `now`; False means the intensity is exceeded: give up."""
        self.stamps = [t for t in self.stamps if now - t < self.within_s] + [now]
        return len(self.stamps) <= self.max_restarts
