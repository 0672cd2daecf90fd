"""Token and head configurations of the Token and Head Adaptive Transformer (THAT; Lee et al.,
COLING 2022), as the reference implementation (imj2185/THAT_glue) did them (DESIGN.md s.5).

A configuration is a pair of genes: the Length-Adaptive length gene (tokens kept after each
layer, `pruners/length.py`) and a head gene h = (h_1, ..., h_L), the number of attention heads
layer l loses. Layer l drops its h_l least important heads (head importance: a per-layer
L2-normalised |<context, dL/dcontext>|, computed once per checkpoint by
`modules/token_head_adaptive.py`); the engine slices the kept heads' Q/K/V rows and
output-projection columns, so the work really shrinks. The most important head of a layer is
never pruned. Training and search bound h_l by the cap `floor(linspace(1, H, L))_l`, the last
entry minus one (6 layers x 12 heads: 1, 3, 5, 7, 9, 11).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tokenprune.pruners.length import LengthConfigPruner

HeadGene = tuple[int, ...]


def check_head_gene(
    heads: Sequence[int], num_layers: int, num_heads: int, name: str = "pruner.heads_pruned"
) -> HeadGene:
    """Validate heads pruned per layer: one entry per layer, each in [0, H - 1] and at most the
    layer's cap (`head_cap`: what training and search ever prune there)."""
    gene = tuple(int(count) for count in heads)
    if len(gene) != num_layers:
        raise ValueError(f"{name}={list(gene)} has {len(gene)} entries; the backbone has {num_layers} layers")
    if any(not 0 <= count < num_heads for count in gene):
        raise ValueError(
            f"{name}={list(gene)}: every entry must be in [0, {num_heads - 1}] "
            f"(the backbone has {num_heads} heads; the most important one always stays)"
        )
    cap = head_cap(num_layers, num_heads)
    if any(count > most for count, most in zip(gene, cap)):
        raise ValueError(f"{name}={list(gene)} breaks the cap: layer l may lose at most {list(cap)}[l] heads")
    return gene


def head_cap(num_layers: int, num_heads: int) -> HeadGene:
    """The most heads each layer may lose in training and search: floor(linspace(1, H, L)) with
    the last entry minus one, never above H - 1 (the reference's rule, DESIGN.md s.5)."""
    caps = np.floor(np.linspace(1, num_heads, num_layers)).astype(int)
    caps[-1] -= 1
    return tuple(int(min(max(cap, 0), num_heads - 1)) for cap in caps)


def sample_head_gene(cap: Sequence[int], rng: random.Random, skipped: Collection[int] = ()) -> HeadGene:
    """A random sub-model's heads: h_l ~ randint(h_{l-1}, cap_l) with the upper bound exclusive and
    h_{-1} = 0, so h is non-decreasing with depth; a LayerDrop-skipped layer carries h_{l-1}."""
    gene, previous = [], 0
    for layer, upper in enumerate(cap):
        if layer not in skipped and previous < upper:
            previous = rng.randrange(previous, upper)
        gene.append(previous)
    return tuple(gene)


def ratio_head_gene(num_layers: int, ratio: float) -> HeadGene:
    """`floor(linspace(1, ratio, L))`: the head genes of the search's initial population."""
    return tuple(int(math.floor(value)) for value in np.linspace(1, ratio, num_layers))


class TokenHeadPruner(LengthConfigPruner):
    """A length gene (see LengthConfigPruner) plus heads pruned per layer, least important first.

    `head_importance` (L, H) is a buffer saved with the module's checkpoint; NaN until computed.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        lengths: Sequence[int] | None = None,
        reference_length: int = 128,
        length_unit: str = "tokens",
        heads_pruned: Sequence[int] | None = None,
        scores_after_dropout: bool = False,
    ) -> None:
        super().__init__(num_layers, lengths, reference_length, length_unit, scores_after_dropout)
        if num_heads < 1:
            raise ValueError(f"pruner.num_heads={num_heads} must be >= 1")
        self.num_heads = num_heads
        self.heads_gene = (
            check_head_gene(heads_pruned, num_layers, num_heads) if heads_pruned is not None else (0,) * num_layers
        )
        self.register_buffer("head_importance", torch.full((num_layers, num_heads), math.nan))
        self._kept_heads: tuple[tuple[int, int, torch.device], tuple[Tensor, ...]] | None = None

    def with_gene(self, gene: Sequence[int]) -> TokenHeadPruner:
        """Another length gene, the same heads (and the same importance tensor)."""
        return self.with_genes(gene, self.heads_gene)

    def with_genes(self, lengths: Sequence[int], heads: Sequence[int]) -> TokenHeadPruner:
        """Another (lengths, heads) configuration sharing this pruner's head importance."""
        pruner = TokenHeadPruner(
            self.num_layers,
            self.num_heads,
            lengths,
            self.reference_length,
            self.length_unit,
            heads,
            self.scores_after_dropout,
        )
        pruner.head_importance = self.head_importance
        return pruner

    def config(self) -> dict[str, Any]:
        return {**super().config(), "heads_pruned": list(self.heads_gene), "num_heads": self.num_heads}

    @property
    def has_head_importance(self) -> bool:
        return not bool(torch.isnan(self.head_importance).any())

    def set_head_importance(self, importance: Tensor) -> None:
        expected = (self.num_layers, self.num_heads)
        if tuple(importance.shape) != expected:
            raise ValueError(f"head importance has shape {tuple(importance.shape)}, expected {expected}")
        self.head_importance.copy_(importance)

    def heads_removed(self, layer: int) -> int:
        return self.heads_gene[layer]

    def kept_heads(self, layer: int) -> Tensor | None:
        if self.heads_gene[layer] == 0:
            return None
        return self._kept_per_layer()[layer]

    def _kept_per_layer(self) -> tuple[Tensor, ...]:
        """Each layer's kept heads, ascending: its H - h_l most important. Ranked once per
        importance tensor and change to it (the engine asks for every layer of every batch)."""
        importance = self.head_importance
        key = (importance.data_ptr(), importance._version, importance.device)
        if self._kept_heads is None or self._kept_heads[0] != key:
            if not self.has_head_importance:
                raise RuntimeError(
                    "pruner.heads_pruned needs head importance, which module=token_head_adaptive computes "
                    "(stage sandwich) and saves in its checkpoint; this model has none"
                )
            ranking = torch.argsort(importance, dim=1, descending=True, stable=True)
            kept = tuple(
                ranking[layer, : self.num_heads - pruned].sort().values for layer, pruned in enumerate(self.heads_gene)
            )
            self._kept_heads = key, kept
        return self._kept_heads[1]
