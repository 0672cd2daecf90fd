"""Length configurations of the Length-Adaptive Transformer (Kim and Cho, ACL 2021).

A length configuration (a "gene") is a non-increasing tuple (l_1, ..., l_L): after layer i an
example keeps its l_i most significant tokens (PoWER-BERT significance, the shared score vector).
How l_i applies to an example with n real tokens is `length_unit`:

* `tokens` (default): keep min(n, l_i) tokens. This is what the reference implementation did:
  it padded every input to max_seq_length, padding receives no attention (significance 0) and is
  dropped first, so a length l_i kept min(n, l_i) real tokens. Long inputs lose the most.
* `fraction`: keep ceil(n * l_i / N), N = reference_length (task.max_length): every example keeps
  the same fraction. Equal to `tokens` only when every input is N tokens long.

`scores_after_dropout=true` ranks tokens by the attention after dropout in training, as the
reference did (DESIGN.md s.5; the default ranks by the probabilities inference uses).

FLOPs are always counted on real lengths (DESIGN.md s.4). Measured on MiniLM-L6 x rt_sentiment
(README "Measured"): at the same FLOPs, `tokens` is clearly more accurate on real text.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor

from tokenprune.checks import check_choice, check_range
from tokenprune.engine.pruner import TokenPruner
from tokenprune.engine.scoring import keep_top
from tokenprune.engine.state import TokenState

Gene = tuple[int, ...]
LENGTH_UNITS = ("tokens", "fraction")


def check_gene(gene: Sequence[int], num_layers: int, reference_length: int, name: str = "pruner.lengths") -> Gene:
    """Validate a hand-written or searched length configuration."""
    gene = tuple(int(length) for length in gene)
    if len(gene) != num_layers:
        raise ValueError(f"{name}={list(gene)} has {len(gene)} entries; the backbone has {num_layers} layers")
    if any(not 1 <= length <= reference_length for length in gene):
        raise ValueError(f"{name}={list(gene)}: every length must be in [1, {reference_length}] (task.max_length)")
    if any(later > earlier for earlier, later in zip(gene, gene[1:])):
        raise ValueError(f"{name}={list(gene)} must be non-increasing (dropped tokens cannot return)")
    return gene


def constant_ratio_gene(
    num_layers: int, start_length: int, ratio: float, skipped: Collection[int] = (), min_length: int = 1
) -> Gene:
    """Each layer keeps ceil(ratio * previous length) (at least `min_length`), starting from
    `start_length`; a layer LayerDrop skips keeps the previous length."""
    lengths, previous = [], start_length
    for layer in range(num_layers):
        if layer not in skipped:
            previous = min(previous, max(min_length, math.ceil(ratio * previous)))
        lengths.append(previous)
    return tuple(lengths)


def smallest_gene(
    num_layers: int, start_length: int, drop_prob: float, skipped: Collection[int] = (), min_length: int = 1
) -> Gene:
    """The sandwich rule's smallest sub-model: every layer keeps ceil((1 - p) * previous length)."""
    return constant_ratio_gene(num_layers, start_length, 1 - drop_prob, skipped, min_length)


def sample_gene(
    num_layers: int,
    start_length: int,
    drop_prob: float,
    rng: random.Random,
    skipped: Collection[int] = (),
    min_length: int = 1,
) -> Gene:
    """LengthDrop: l_i ~ U[max(min_length, ceil((1 - p) * l_{i-1})), l_{i-1}] with l_0 = start_length
    (the reference's min_length is 2); a layer that LayerDrop skips keeps the previous length (as in
    the reference implementation)."""
    lengths, previous = [], start_length
    for layer in range(num_layers):
        if layer not in skipped:
            previous = rng.randint(min(previous, max(min_length, math.ceil((1 - drop_prob) * previous))), previous)
        lengths.append(previous)
    return tuple(lengths)


class LengthConfigPruner(TokenPruner):
    """Significance top-k keeping, after layer i, the tokens that length l_i allows (see module doc)."""

    def __init__(
        self,
        num_layers: int,
        lengths: Sequence[int] | None = None,
        reference_length: int = 128,
        length_unit: str = "tokens",
        scores_after_dropout: bool = False,
    ) -> None:
        super().__init__(num_layers)
        check_choice("pruner.length_unit", length_unit, LENGTH_UNITS)
        self.gene = (
            check_gene(lengths, num_layers, reference_length)
            if lengths is not None
            else (reference_length,) * num_layers
        )
        self.reference_length = reference_length
        self.length_unit = length_unit
        self.scores_after_dropout = scores_after_dropout

    def with_gene(self, gene: Sequence[int]) -> LengthConfigPruner:
        """The same kind of pruner with another length configuration (sandwich sub-models, search)."""
        return LengthConfigPruner(
            self.num_layers, gene, self.reference_length, self.length_unit, self.scores_after_dropout
        )

    def config(self) -> dict[str, Any]:
        """This pruner as a `conf/pruner` node (what build_pruner turns back into it)."""
        return {
            "_target_": f"{type(self).__module__}.{type(self).__qualname__}",
            "lengths": list(self.gene),
            "reference_length": self.reference_length,
            "length_unit": self.length_unit,
            "scores_after_dropout": self.scores_after_dropout,
        }

    def keep_counts(self, layer: int, input_lengths: Tensor) -> Tensor:
        """Tokens each example keeps after `layer`, from its real input length, (B,)."""
        length = self.gene[layer]
        if self.length_unit == "tokens":
            return torch.clamp(input_lengths, max=length)
        fraction = input_lengths.to(torch.float64) * length / self.reference_length
        return torch.clamp(torch.ceil(fraction - 1e-9).long(), min=1)

    def prunes_at(self, layer: int) -> bool:
        return self.gene[layer] < (self.gene[layer - 1] if layer > 0 else self.reference_length)

    def keeps_all(self, layer: int, state: TokenState) -> bool:
        return bool((self.keep_counts(layer, state.input_lengths) >= state.lengths).all())

    def select(self, layer: int, scores: Tensor | None, state: TokenState) -> Tensor:
        return keep_top(scores, state.mask, self.keep_counts(layer, state.input_lengths))


def check_drop_prob(name: str, value: float) -> None:
    """LengthDrop / LayerDrop probabilities live in [0, 1)."""
    check_range(name, value, 0.0, 1.0, high_open=True)
