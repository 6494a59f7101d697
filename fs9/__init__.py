"""fs9: a Plan 9-style operating system for AI agents, served as a FUSE filesystem."""

__version__ = "0.1.0"  # the one place (pyproject.toml reads it)
