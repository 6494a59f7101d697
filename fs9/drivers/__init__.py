"""Drivers: how an agent's work runs. The kernel hands a driver a Job."""
