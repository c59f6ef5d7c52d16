"""drctl's side of Temporal below the workflows: the one way to report a failure (to a model's
guardian) and to ask the fleet's budget, shared by the detectors, the CLI and the activities."""
