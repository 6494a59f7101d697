"""Agents: the manifest, the view it unveils, the agent loop, its memory, its refusals."""
