"""Settings checks shared by every layer: each error names the setting and what is allowed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def check_range(
    name: str, value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    """Raise a ValueError naming the setting when `value` is outside [low, high] (open ends as asked)."""
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
    if not optimizer.get("lr", 0) > 0:
        raise ValueError(f"module.optimizer.lr={optimizer.get('lr')} must be > 0")
    check_range("module.optimizer.weight_decay", optimizer.get("weight_decay", 0.0), 0.0, 1.0)
    check_range("module.scheduler.warmup_ratio", scheduler.get("warmup_ratio", 0.0), 0.0, 0.99)
