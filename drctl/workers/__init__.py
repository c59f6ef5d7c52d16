"""Processes drctl runs: the Temporal worker, the CLI and the demo inference server."""
