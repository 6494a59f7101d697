"""The fs9 kernel: agents, tasks, the event log. trio only; no FUSE imports."""
