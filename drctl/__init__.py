"""drctl: disaster recovery for GPU model-inference fleets, with failover runbooks as Temporal workflows."""

__version__ = "0.1.0"
