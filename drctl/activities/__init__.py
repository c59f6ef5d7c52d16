"""Temporal activities: the side-effecting steps that workflows call."""
