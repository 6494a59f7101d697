"""fs9: a Plan 9-style operating system for AI agents, served as a FUSE filesystem."""
