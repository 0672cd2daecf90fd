"""The pruner interface the engine calls once per layer."""

from __future__ import annotations

from torch import Tensor, nn

from tokenprune.engine.state import TokenState


class TokenPruner(nn.Module):
    """Decides which tokens leave the encoder after each layer's attention.

    The engine asks `prunes_at(layer)` and `keeps_all(layer, state)` first; layers that do not
    prune run the fast fused (sdpa) attention. In a pruning layer the engine computes the score vector (if
    `needs_scores`) and calls `select`, which returns either
      * a bool keep mask (B, n): the engine physically removes the other tokens, or
      * float soft weights (B, n) in [0, 1]: the layer output is multiplied by them (no removal).
    A pruner may also remove attention heads (Token+Head Adaptive): `kept_heads(layer)` names
    the heads a layer keeps, and the engine slices their Q/K/V rows and output-projection columns.
    Slot 0 of the state and scores a pruner gets holds the token it must keep (scoring.keep_top and
    keep_above keep it): [CLS] for encoders; for adapters that protect the newest token (causal
    decoders) the engine hands each row over with that token moved to slot 0 and maps the
    decision back.
    """

    needs_scores: bool = True
    # Score the attention probabilities after attention dropout (what the LTP and Length-Adaptive
    # reference implementations did, DESIGN.md s.5) instead of before it; matters in training only.
    scores_after_dropout: bool = False

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers

    def prunes_at(self, layer: int) -> bool:
        raise NotImplementedError

    def keeps_all(self, layer: int, state: TokenState) -> bool:
        """True when layer `layer` would keep every token of this batch: the engine then skips the
        score and runs the layer unpruned (same result, fused attention)."""
        return False

    def select(self, layer: int, scores: Tensor | None, state: TokenState) -> Tensor:
        raise NotImplementedError

    def kept_heads(self, layer: int) -> Tensor | None:
        """Indices of the attention heads layer `layer` keeps (long, ascending); None keeps all."""
        return None

    def heads_removed(self, layer: int) -> int:
        """How many heads layer `layer` loses (what `kept_heads` leaves out; analytic FLOPs)."""
        return 0
