"""Which code applies each kind of event: one table from kind to handler, merged from
the state holders' `appliers()` (the kernel's lifecycles, the bus, models, memory,
federation, ...), and the kinds logged for the record only, which rebuild no state.
tests/test_events.py checks that every kind written has exactly one of the two."""
from typing import TYPE_CHECKING, Callable

from .log import Event

if TYPE_CHECKING:  # (agent.py imports the kernel's neighbours: no cycle at run time)
    from .agents.agent import Agent
    from .task import Task

# Events logged for the record only: no state is rebuilt from them (the rest each have
# exactly one handler in a state holder's `appliers`).
AUDIT_ONLY = frozenset({
    "agent_step", "agent_unconfined", "audit_enabled", "audit_unavailable", "bug",
    "cluster_fenced", "cluster_takeover", "cluster_unfenced", "conversation_closed", "conversation_compacted", "conversation_opened", "declassified",
    "delivery_refused", "escalated",
    "escape_attempt", "escape_denied", "injection_suspected", "log_fault", "log_recovered",
    "mail_delivered", "mount",
    "mail_duplicate", "model_config_error", "outputs_retired", "retention_config_error",
    "model_retry", "model_throttled",
    "model_unreachable", "refused", "replay_set_aside", "search_fallback",
    "search_index_damaged", "search_semantic", "set_aside_dismissed", "supervisor_restart",
    "task_progress", "topics_config_error", "limit_exceeded", "limits_unavailable",
    "unclean_stop", "unmount", "unveil_denied", "vault_changed", "watch_capped",
    "watch_restored", "watch_unavailable"})
Applier = Callable[[Event, "Agent | None", "Task | None"], None]


def event_table(*holders) -> dict[str, Applier]:
    """One table from event kind to the handler that applies it, merged from each
    state holder's `appliers()`; a kind claimed twice is a defect."""
    table: dict[str, Applier] = {}
    for holder in holders:
        for kind, handler in holder.appliers().items():
            if kind in table or kind in AUDIT_ONLY:
                raise AssertionError(f"event {kind} has two handlers")
            table[kind] = handler
    return table
