"""Learned Token Pruning (Kim et al., KDD 2022, arXiv 2107.00910).

Layer l (0-based) has a threshold theta_l = final_threshold * l / L + offset_l with a learnable
offset (initialised at 0). A token's importance is the shared score vector normalised by the
task's max length, s_j = SV_j / n_ref (DESIGN.md s.4); since SV averages 1 over the real tokens,
a published threshold keeps its meaning whatever the padding. The reference implementation
divided the head- and real-query-summed attention by the padded length (inputs padded to 128:
numerically the same score as ours).

Reference settings (DESIGN.md s.5; `experiment=ltp_reference` sets them): the reference never
touches layer 0 (`start_layer=1`; default 0 lets layer 0 prune too) and scores the attention
after dropout (`scores_after_dropout=true`; default false scores the probabilities the model
computes at inference, so training and evaluation rank tokens alike).

* soft stage: mask m_j = sigmoid((s_j - theta_l) / T) multiplies the layer output (no tokens are
  removed; the thresholds learn through the mask), Eq. 4-5 of the paper;
* hard stage and every evaluation: tokens with s_j < theta_l are removed (per-example lengths).
[CLS] is never pruned in either stage.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenprune.checks import check_range
from tokenprune.engine.pruner import TokenPruner
from tokenprune.engine.scoring import keep_above
from tokenprune.engine.state import TokenState


class LTPPruner(TokenPruner):
    """Per-layer learned thresholds on the normalised attention score."""

    def __init__(
        self,
        num_layers: int,
        final_threshold: float = 0.01,
        temperature: float = 1e-3,
        reference_length: int = 128,
        soft: bool = False,
        start_layer: int = 0,
        scores_after_dropout: bool = False,
    ) -> None:
        super().__init__(num_layers)
        check_range("pruner.start_layer", start_layer, 0, num_layers - 1)
        if not temperature > 0:
            raise ValueError(f"pruner.temperature={temperature} must be > 0 (allowed: 1e-5 .. 2e-3 in the paper)")
        check_range("pruner.final_threshold", final_threshold, 0.0, 1.0)
        if reference_length < 1:
            raise ValueError(f"pruner.reference_length={reference_length} must be >= 1")
        self.temperature = temperature
        self.reference_length = reference_length
        self.soft = soft
        self.start_layer = start_layer
        self.scores_after_dropout = scores_after_dropout
        self.register_buffer(
            "base", torch.tensor([final_threshold * layer / num_layers for layer in range(num_layers)])
        )
        self.offset = nn.Parameter(torch.zeros(num_layers))

    @property
    def thresholds(self) -> Tensor:
        return self.base + self.offset

    def prunes_at(self, layer: int) -> bool:
        """Layers before `start_layer` are never masked, penalised or pruned."""
        return layer >= self.start_layer

    def keeps_all(self, layer: int, state: TokenState) -> bool:
        """Hard pruning with a threshold <= 0 removes nothing (scores are >= 0)."""
        return not self.soft and bool(self.thresholds[layer] <= 0)

    def normalised(self, scores: Tensor) -> Tensor:
        return scores / self.reference_length

    def select(self, layer: int, scores: Tensor | None, state: TokenState) -> Tensor:
        assert scores is not None, "needs_scores: the engine passes the score vector"
        score = self.normalised(scores)
        threshold = self.thresholds[layer]
        if self.soft:
            mask = torch.sigmoid((score - threshold) / self.temperature) * state.mask
            return torch.cat([state.mask[:, :1].to(mask.dtype), mask[:, 1:]], dim=1)  # [CLS] weight 1
        return keep_above(score, state.mask, threshold.detach())
