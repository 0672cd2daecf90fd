"""Grid search: one pruner setting swept over values on a trained model, no training.

Used for the static baselines' curves (top-k keep ratio, manual threshold) and for the
constant-ratio curve that the evolutionary search is compared against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tokenprune.config import plain
from tokenprune.search.context import SearchContext, SearchStrategy


class GridSearch(SearchStrategy):
    """Evaluate `pruner` (a `_target_` config) with `parameter` set to each of `values`;
    `pruner_group` names its `conf/pruner` option, for the front's bench commands."""

    def __init__(
        self, pruner: Mapping[str, Any], parameter: str, values: Sequence[float], pruner_group: str | None = None
    ) -> None:
        if parameter not in pruner:
            raise ValueError(f"search.parameter={parameter} is not a setting of search.pruner; it has {sorted(pruner)}")
        if not values:
            raise ValueError("search.values is empty")
        self.pruner = plain(pruner)
        self.parameter = parameter
        self.values = list(plain(values))
        self.pruner_group = pruner_group

    def validate(self, build_pruner: Callable[[Mapping[str, Any]], object]) -> None:
        """Build every candidate's pruner once, so a bad value fails before any evaluation."""
        for value in self.values:
            build_pruner({**self.pruner, self.parameter: value})

    def run(self, context: SearchContext) -> list[dict[str, Any]]:
        return [
            context.score(f"{self.parameter}={value}", {**self.pruner, self.parameter: value}) | {self.parameter: value}
            for value in self.values
        ]
