"""What a search strategy gets from tokenprune-search: sizes, lengths and a cached scorer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenprune.engine.flops import EncoderDims, layer_macs, unpruned_macs
from tokenprune.engine.pruner import TokenPruner
from tokenprune.pruners.length import Gene, LengthConfigPruner, smallest_gene

PRUNER_TARGET = "tokenprune.pruners.length.LengthConfigPruner"


@dataclass
class SearchContext:
    """What a strategy needs from the app: model sizes, the val split's real lengths, the
    checkpoint's length pruner (how a gene applies to an example), a cached scorer
    `score(key, pruner_config, split="val") -> record`, the checkpoint's own pruner, and
    `measure(pruner_configs) -> speedups`: wall-clock speedup of each configuration over the
    stock HF model on the report split at real lengths (interleaved timing, this device).
    `main_metric` / `main_mode` name the task's score and whether higher (`max`) or lower (`min`,
    e.g. perplexity) is better."""

    dims: EncoderDims
    template: LengthConfigPruner
    lengths: Sequence[int]
    score: Callable[..., dict[str, Any]]
    checkpoint_pruner: TokenPruner | None = None
    measure: Callable[[list[dict[str, Any]]], list[float]] | None = None
    main_metric: str = "accuracy"
    main_mode: str = "max"
    history: list[dict[str, float]] = field(default_factory=list)
    _flops: dict[Gene, float] = field(default_factory=dict)

    @property
    def max_gene_length(self) -> int:
        """The largest gene entry worth searching: with `tokens` lengths, anything at or above the
        longest search-split example keeps every token."""
        reference = self.template.reference_length
        return min(reference, max(self.lengths)) if self.template.length_unit == "tokens" else reference

    def gene_flops(self, gene: Gene) -> float:
        """Relative FLOPs of `gene` on the val split (analytic, real lengths, no forward)."""
        if gene not in self._flops:
            self._flops[gene] = self.pruner_flops(self.template.with_gene(gene))
        return self._flops[gene]

    def sandwich_floor_flops(self, drop_prob: float) -> float:
        """Relative FLOPs of the smallest sub-model sandwich training saw: every example keeps
        ceil((1-p) * previous) of its tokens per layer (the sandwich starts from each batch's padded
        length, which length-bucketed batches keep close to every example's own length)."""
        reference = self.template.reference_length
        gene = smallest_gene(self.dims.num_layers, reference, drop_prob)
        return self.pruner_flops(LengthConfigPruner(self.dims.num_layers, gene, reference, "fraction"))

    def pruner_flops(self, pruner: LengthConfigPruner) -> float:
        """Relative FLOPs of `pruner` on the val split, per example: a layer that removes
        tokens of an example also pays for its score vector."""
        n = torch.as_tensor(list(self.lengths))
        total, current = torch.zeros(n.shape, dtype=torch.float64), n
        for layer in range(self.dims.num_layers):
            kept = torch.minimum(pruner.keep_counts(layer, n), current)
            total = total + layer_macs(self.dims, current, current, kept, self.dims.num_heads, scored=kept < current)
            current = kept
        return float(total.sum() / unpruned_macs(self.dims, n).sum())

    def evaluate(self, gene: Gene, origin: str, parents: Sequence[Gene] = ()) -> dict[str, Any]:
        template = self.template
        config = {
            "_target_": PRUNER_TARGET,
            "lengths": list(gene),
            "reference_length": template.reference_length,
            "length_unit": template.length_unit,
        }
        record = self.score(f"lengths={list(gene)}", config)
        return {
            **record,
            "gene": list(gene),
            "origin": record.get("origin", origin),
            "parents": record.get("parents", [list(p) for p in parents]),
        }
