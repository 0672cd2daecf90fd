"""Static baselines: keep schedules fixed before inference, on the shared engine.

* TopKPruner: PoWER-BERT (Goyal et al., ICML 2020) significance = attention received, keeping a
  fixed fraction of each example's tokens per layer (constant from `start_layer`, or per layer);
  `start_layer=null` is the LTP paper's top-k baseline, which leaves the first max(3, ceil(0.15 L))
  layers unpruned (DESIGN.md s.5).
* SpAttenPruner: SpAtten-style (Wang et al., HPCA 2021) cascade top-k whose keep fraction falls
  linearly from 1 to `final_ratio` over the layers.
* RandomPruner: the same schedule, tokens chosen uniformly at random ([CLS] kept).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from tokenprune.checks import check_range
from tokenprune.engine.pruner import TokenPruner
from tokenprune.engine.scoring import keep_top
from tokenprune.engine.state import TokenState


def constant_schedule(num_layers: int, keep_ratio: float, start_layer: int) -> list[float]:
    """Keep `keep_ratio` of the input tokens from layer `start_layer` on, all before it."""
    check_range("pruner.keep_ratio", keep_ratio, 0.0, 1.0, low_open=True)
    check_range("pruner.start_layer", start_layer, 0, num_layers - 1)
    return [1.0 if layer < start_layer else keep_ratio for layer in range(num_layers)]


def linear_schedule(num_layers: int, final_ratio: float, start_layer: int) -> list[float]:
    """Keep fraction falling linearly from 1 (before `start_layer`) to `final_ratio` at the last layer."""
    check_range("pruner.final_ratio", final_ratio, 0.0, 1.0, low_open=True)
    check_range("pruner.start_layer", start_layer, 0, num_layers - 1)
    steps = num_layers - start_layer
    return [
        1.0 if layer < start_layer else 1.0 - (1.0 - final_ratio) * (layer - start_layer + 1) / steps
        for layer in range(num_layers)
    ]


class ScheduledPruner(TokenPruner):
    """Keeps ceil(ratio_l * input length) tokens of each example after layer l.

    ratios are fractions of the example's real input length, non-increasing over layers;
    a layer whose ratio equals the previous one removes nothing and runs fused attention.
    """

    def __init__(self, num_layers: int, layer_keep_ratios: Sequence[float]) -> None:
        super().__init__(num_layers)
        ratios = [float(r) for r in layer_keep_ratios]
        if len(ratios) != num_layers:
            raise ValueError(
                f"pruner.layer_keep_ratios has {len(ratios)} entries; the backbone has {num_layers} layers"
            )
        for layer, ratio in enumerate(ratios):
            check_range(f"pruner.layer_keep_ratios[{layer}]", ratio, 0.0, 1.0, low_open=True)
        if any(later > earlier for earlier, later in zip(ratios, ratios[1:])):
            raise ValueError(
                f"pruner.layer_keep_ratios must be non-increasing (removed tokens cannot return): {ratios}"
            )
        self.ratios = ratios

    def prunes_at(self, layer: int) -> bool:
        previous = self.ratios[layer - 1] if layer > 0 else 1.0
        return self.ratios[layer] < previous

    def keep_counts(self, layer: int, state: TokenState) -> Tensor:
        """Tokens each example keeps after `layer`, (B,)."""
        ratio = self.ratios[layer]
        return torch.ceil(state.input_lengths.to(torch.float64) * ratio - 1e-9).long()

    def keeps_all(self, layer: int, state: TokenState) -> bool:
        return bool((self.keep_counts(layer, state) >= state.lengths).all())

    def select(self, layer: int, scores: Tensor | None, state: TokenState) -> Tensor:
        return keep_top(self.rank(scores, state), state.mask, self.keep_counts(layer, state))

    def rank(self, scores: Tensor | None, state: TokenState) -> Tensor:
        raise NotImplementedError


class TopKPruner(ScheduledPruner):
    """PoWER-BERT significance top-k with a constant or per-layer keep ratio."""

    def __init__(
        self,
        num_layers: int,
        keep_ratio: float = 0.5,
        start_layer: int | None = 2,
        layer_keep_ratios: Sequence[float] | None = None,
    ) -> None:
        if start_layer is None:  # the LTP paper's rule, within the model's layers
            start_layer = min(num_layers - 1, max(3, math.ceil(0.15 * num_layers)))
        if layer_keep_ratios is None:
            layer_keep_ratios = constant_schedule(num_layers, keep_ratio, start_layer)
        super().__init__(num_layers, layer_keep_ratios)

    def rank(self, scores: Tensor | None, state: TokenState) -> Tensor:
        assert scores is not None, "needs_scores: the engine passes the score vector"
        return scores


class SpAttenPruner(TopKPruner):
    """SpAtten-style cascade: significance top-k on a linear keep schedule."""

    def __init__(self, num_layers: int, final_ratio: float = 0.3, start_layer: int = 1) -> None:
        super().__init__(num_layers, layer_keep_ratios=linear_schedule(num_layers, final_ratio, start_layer))


class RandomPruner(ScheduledPruner):
    """Random token selection on a constant keep schedule: the no-information baseline."""

    needs_scores = False

    def __init__(self, num_layers: int, keep_ratio: float = 0.5, start_layer: int = 2) -> None:
        super().__init__(num_layers, constant_schedule(num_layers, keep_ratio, start_layer))

    def rank(self, scores: Tensor | None, state: TokenState) -> Tensor:
        return torch.rand(state.mask.shape, device=state.mask.device)
