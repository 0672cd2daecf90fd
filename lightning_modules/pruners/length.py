"""Length configurations of the Length-Adaptive Transformer (Kim and Cho, ACL 2021).

A length configuration (a "gene") is a non-increasing tuple (l_1, ..., l_L) of token counts on
the reference length N = task.max_length; an example with n real tokens keeps ceil(n * l_i / N)
tokens after layer i, chosen by attention significance (PoWER-BERT). For inputs padded to N (as
the reference code did) this is exactly the paper's configuration; with dynamic padding it keeps
the same fraction of every example, so FLOPs are counted on real lengths.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

from lightning_modules.pruners.base import check_range
from lightning_modules.pruners.static import TopKPruner

Gene = tuple[int, ...]


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


def smallest_gene(num_layers: int, reference_length: int, drop_prob: float) -> Gene:
    """Every layer keeps ceil((1 - p) * previous length): the sandwich rule's smallest sub-model."""
    lengths, previous = [], reference_length
    for _ in range(num_layers):
        previous = max(1, math.ceil((1 - drop_prob) * previous))
        lengths.append(previous)
    return tuple(lengths)


def sample_gene(num_layers: int, reference_length: int, drop_prob: float, rng: random.Random) -> Gene:
    """LengthDrop: l_i ~ U[ceil((1 - p) * l_{i-1}), l_{i-1}] with l_0 = N."""
    lengths, previous = [], reference_length
    for _ in range(num_layers):
        previous = rng.randint(max(1, math.ceil((1 - drop_prob) * previous)), previous)
        lengths.append(previous)
    return tuple(lengths)


def constant_ratio_gene(num_layers: int, reference_length: int, ratio: float) -> Gene:
    """Each layer keeps `ratio` of the previous layer's tokens."""
    lengths, previous = [], reference_length
    for _ in range(num_layers):
        previous = max(1, math.ceil(ratio * previous))
        lengths.append(previous)
    return tuple(lengths)


class LengthConfigPruner(TopKPruner):
    """Significance top-k keeping ceil(n * l_i / N) tokens of each example after layer i."""

    def __init__(self, num_layers: int, lengths: Sequence[int] | None = None, reference_length: int = 128) -> None:
        gene = check_gene(lengths, num_layers, reference_length) if lengths is not None else (reference_length,) * num_layers
        super().__init__(num_layers, layer_keep_ratios=[length / reference_length for length in gene])
        self.gene = gene
        self.reference_length = reference_length


def check_drop_prob(name: str, value: float) -> None:
    """LengthDrop / LayerDrop probabilities live in [0, 1)."""
    check_range(name, value, 0.0, 1.0, high_open=True)
