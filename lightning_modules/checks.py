"""Settings checks shared by every layer: each error names the setting and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def check_range(
    name: str, value: object, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    """Raise naming the setting when `value` is not a finite number in [low, high] (open ends as asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} is not a finite number")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value} is outside the allowed range {interval}")


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise a ValueError naming the setting and the allowed values when `value` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{name}={value} is not one of: {', '.join(allowed)}")


def check_optimizer(optimizer: Mapping[str, Any], scheduler: Mapping[str, Any]) -> None:
    """Optimizer / schedule settings (`module.optimizer`, `module.scheduler`) in their ranges."""
    check_range("module.optimizer.lr", optimizer.get("lr"), 0.0, math.inf, low_open=True)
    check_range("module.optimizer.weight_decay", optimizer.get("weight_decay", 0.0), 0.0, 1.0)
    check_range("module.scheduler.warmup_ratio", scheduler.get("warmup_ratio", 0.0), 0.0, 0.99)
