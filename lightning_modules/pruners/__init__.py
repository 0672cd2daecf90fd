"""Token pruners: the per-layer keep decisions plugged into the engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate

from tokenprune.engine.pruner import TokenPruner


def build_pruner(
    spec: Mapping[str, Any] | None, num_layers: int, max_length: int, num_heads: int
) -> TokenPruner | None:
    """The pruner a `conf/pruner/*.yaml` node describes, for a backbone of `num_layers` layers of
    `num_heads` heads and a task of `max_length` tokens (`reference_length: null` means the task's
    max_length, `num_heads: null` the backbone's); None for `pruner=none` (no `_target_`)."""
    if not spec or not spec.get("_target_"):
        return None
    spec = dict(spec)
    if "reference_length" in spec and spec["reference_length"] is None:
        spec["reference_length"] = max_length
    if "num_heads" in spec and spec["num_heads"] is None:
        spec["num_heads"] = num_heads
    pruner = instantiate(spec, num_layers=num_layers)
    if not isinstance(pruner, TokenPruner):
        raise TypeError(f"pruner._target_={spec['_target_']} is not a TokenPruner")
    return pruner
