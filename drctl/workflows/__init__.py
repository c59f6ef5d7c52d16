"""Deterministic Temporal workflows: they decide and call activities by name, nothing else."""
