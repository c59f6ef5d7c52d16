"""Activities of the embedded local platform (model processes, checkpoints, Envoy on this machine)."""
