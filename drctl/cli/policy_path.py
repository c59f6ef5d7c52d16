"""Which policy file a command acts on: the one the user named, else the one they are running.

The default used to be ``examples/dr-policy.yaml`` under the working directory, so ``drctl status``
run anywhere but in the repository said "invalid policy" about a file that was not there. Now, in
order:

1. ``--policy FILE``;
2. ``DRCTL_POLICY`` (or ``.env``);
3. the policy of the stack in the state folder: ``drctl up`` records it in ``stack.json``;
4. ``./dr-policy.yaml``, then ``./examples/dr-policy.yaml`` in the working directory.

A file named by 1 or 2 that does not exist is not found, never silently replaced by another; when
nothing is found the message says where it looked.
"""

from __future__ import annotations

import json
from pathlib import Path

from drctl.settings import DrctlSettings, StateLayout

LOCAL_NAMES = ("dr-policy.yaml", "examples/dr-policy.yaml")
"""Where in the working directory a policy is looked for last."""


class PolicyNotFound(LookupError):
    """No policy file where the user said, or anywhere it is looked for."""


def find_policy(settings: DrctlSettings, option: Path | None = None, cwd: Path | None = None) -> Path:
    """The policy file to use (see the module's docstring for the order); ``option`` is ``--policy``.
    Raises :class:`PolicyNotFound` naming the places looked in."""
    if option is not None or "policy" in settings.model_fields_set:
        named = Path(settings.policy)
        if not named.exists():
            source = "--policy" if option is not None else "DRCTL_POLICY"
            raise PolicyNotFound(f"policy not found: {named} (from {source})")
        return named
    layout = StateLayout(settings.state_dir)
    recorded, why_not = recorded_policy(layout)
    if recorded is not None:
        return recorded
    here = Path.cwd() if cwd is None else cwd
    candidates = [here / name for name in LOCAL_NAMES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = [f"the state folder {layout.root} ({why_not})", *map(str, candidates)]
    raise PolicyNotFound(f"policy not found: looked in {', '.join(looked)}; name one with --policy or DRCTL_POLICY")


def recorded_policy(layout: StateLayout) -> tuple[Path | None, str]:
    """The policy file the stack in ``layout`` was started with (it may have stopped since without
    cleaning up: it is still the fleet's policy), or None and why not."""
    try:
        info = json.loads(layout.stack_file.read_text(encoding="utf-8"))
    except OSError:
        return None, "no stack there"
    except ValueError:
        return None, f"{layout.stack_file.name} is not JSON"
    recorded = info.get("policy") if isinstance(info, dict) else None
    if not isinstance(recorded, str) or not recorded:
        return None, f"{layout.stack_file.name} names no policy"
    path = Path(recorded)
    if not path.is_file():
        return None, f"the stack's policy {path} is gone"
    return path, ""
