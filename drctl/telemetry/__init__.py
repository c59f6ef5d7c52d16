"""What drctl's processes tell a monitoring system: Prometheus metrics (:mod:`.metrics`)."""
