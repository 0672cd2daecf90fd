"""What a search strategy gets from tokenprune-search: sizes, lengths and a cached scorer."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_modules.pruners.length import Gene
from search.flops import EncoderDims, layer_macs, unpruned_macs

PRUNER_TARGET = "lightning_modules.pruners.length.LengthConfigPruner"


@dataclass
class SearchContext:
    """What a strategy needs from the app: model sizes, the search split's real lengths, and a
    cached scorer `score(key, pruner_config) -> record`."""

    dims: EncoderDims
    reference_length: int
    lengths: Sequence[int]
    score: Callable[[str, dict[str, Any]], dict[str, Any]]
    history: list[dict[str, float]] = field(default_factory=list)
    _flops: dict[Gene, float] = field(default_factory=dict)

    def gene_flops(self, gene: Gene) -> float:
        """Relative FLOPs of `gene` on the search split (analytic, real lengths, no forward)."""
        if gene not in self._flops:
            self._flops[gene] = self._gene_flops(gene)
        return self._flops[gene]

    def _gene_flops(self, gene: Gene) -> float:
        n = torch.as_tensor(list(self.lengths), dtype=torch.float64)
        total, current, previous_ratio = torch.zeros_like(n), n, 1.0
        for length in gene:
            ratio = length / self.reference_length
            kept = torch.clamp(torch.ceil(n * ratio - 1e-9), min=1) if ratio < previous_ratio else current
            kept = torch.minimum(kept, current)
            scored = ratio < previous_ratio
            total = total + layer_macs(self.dims, current, current, kept, self.dims.num_heads, scored)
            current, previous_ratio = kept, min(ratio, previous_ratio)
        return float(total.sum() / unpruned_macs(self.dims, n).sum())

    def evaluate(self, gene: Gene, origin: str, parents: Sequence[Gene] = ()) -> dict[str, Any]:
        config = {"_target_": PRUNER_TARGET, "lengths": list(gene), "reference_length": self.reference_length}
        record = self.score(f"lengths={list(gene)}", config)
        return {**record, "gene": list(gene), "origin": record.get("origin", origin),
                "parents": record.get("parents", [list(p) for p in parents])}
