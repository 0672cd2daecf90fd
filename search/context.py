"""What a search strategy gets from tokenprune-search: sizes, lengths and a cached scorer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch

from tokenprune.engine.flops import EncoderDims, layer_macs, unpruned_macs
from tokenprune.engine.pruner import TokenPruner
from tokenprune.modules.base import TokenPruningModule
from tokenprune.pruners.length import Gene, LengthConfigPruner, smallest_gene
from tokenprune.pruners.token_head import HeadGene, TokenHeadPruner

JointGene = tuple[Gene, HeadGene]  # Token+Head Adaptive: (lengths, heads pruned per layer)


class SearchStrategy(ABC):
    """A `conf/search/*.yaml` strategy. `required_module`: the module class a checkpoint must have
    been trained by (None: any); `efficiency`: the record column the front minimises;
    `pruner_group`: the `conf/pruner` group its candidates' configs belong to (bench commands)."""

    required_module: type[TokenPruningModule] | None = None
    efficiency: str = "flops_ratio"
    pruner_group: str | None = None

    @abstractmethod
    def run(self, context: SearchContext) -> list[dict[str, Any]]:
        """Evaluate candidates through `context`; one record per candidate."""

    def write_outputs(self, out: Path, candidates: pd.DataFrame) -> Path | None:
        """The strategy's own table and figure in the run folder, if it has any (the figure's path)."""
        return None


@dataclass
class SearchContext:
    """What a strategy needs from the app: model sizes, the val split's real lengths, the
    checkpoint's length pruner (how a gene applies to an example), a cached scorer
    `score(key, pruner_config, split="val") -> record`, the checkpoint's own pruner, and
    `measure(pruner_configs) -> speedups`: wall-clock speedup of each configuration over the
    stock HF model on the report split at real lengths (interleaved timing, this device), and
    `latency(pruner_config) -> ratio`: its wall time over the stock model's on a fixed sample of
    the val split, cached per device (searches whose objective is latency).
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
    latency: Callable[[dict[str, Any]], float] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    _flops: dict[Gene | JointGene, float] = field(default_factory=dict)

    @property
    def max_gene_length(self) -> int:
        """The largest gene entry worth searching: with `tokens` lengths, anything at or above the
        longest search-split example keeps every token."""
        reference = self.template.reference_length
        return min(reference, max(self.lengths)) if self.template.length_unit == "tokens" else reference

    def pruner_for(self, gene: Gene | JointGene) -> LengthConfigPruner:
        """The checkpoint's kind of pruner with a length gene, or a (lengths, heads) joint gene."""
        if gene and isinstance(gene[0], tuple):
            if not isinstance(self.template, TokenHeadPruner):
                raise ValueError("joint (lengths, heads) genes need a Token+Head Adaptive checkpoint")
            lengths, heads = gene
            return self.template.with_genes(self.uncapped(lengths), heads)
        return self.template.with_gene(self.uncapped(cast(Gene, gene)))

    def uncapped(self, lengths: Sequence[int]) -> tuple[int, ...]:
        """`lengths` with every entry at max_gene_length (keep every search-split token) widened to
        the reference length, so that longer examples of another split keep every token there too."""
        widest = self.max_gene_length
        return tuple(self.template.reference_length if length >= widest else length for length in lengths)

    def gene_flops(self, gene: Gene | JointGene) -> float:
        """Relative FLOPs of `gene` on the val split (analytic, real lengths, no forward)."""
        if gene not in self._flops:
            self._flops[gene] = self.pruner_flops(self.pruner_for(gene))
        return self._flops[gene]

    def sandwich_floor_flops(self, drop_prob: float, heads: HeadGene | None = None) -> float:
        """Relative FLOPs of the smallest sub-model sandwich training saw: every example keeps
        ceil((1-p) * previous) of its tokens per layer (the sandwich starts from each batch's padded
        length, which length-bucketed batches keep close to every example's own length), and
        loses `heads` heads per layer (Token+Head Adaptive's cap)."""
        reference = self.template.reference_length
        gene = smallest_gene(self.dims.num_layers, reference, drop_prob)
        if heads is None:
            return self.pruner_flops(LengthConfigPruner(self.dims.num_layers, gene, reference, "fraction"))
        return self.pruner_flops(
            TokenHeadPruner(self.dims.num_layers, self.dims.num_heads, gene, reference, "fraction", heads)
        )

    def pruner_flops(self, pruner: LengthConfigPruner) -> float:
        """Relative FLOPs of `pruner` on the val split, per example: a layer that removes
        tokens of an example also pays for its score vector; removed heads cost nothing."""
        n = torch.as_tensor(list(self.lengths))
        total, current = torch.zeros(n.shape, dtype=torch.float64), n
        for layer in range(self.dims.num_layers):
            kept = torch.minimum(pruner.keep_counts(layer, n), current)
            heads = self.dims.num_heads - pruner.heads_removed(layer)
            total = total + layer_macs(self.dims, current, current, kept, heads, scored=kept < current)
            current = kept
        return float(total.sum() / unpruned_macs(self.dims, n).sum())

    def evaluate(self, gene: Gene | JointGene, origin: str, parents: Sequence[Gene | JointGene] = ()) -> dict[str, Any]:
        """Score `gene` (cached); joint genes get `gene` (lengths) and `heads` columns."""
        pruner = self.pruner_for(gene)
        config = pruner.config()
        name = f"lengths={list(pruner.gene)}"
        columns: dict[str, Any] = {"gene": list(pruner.gene)}
        if isinstance(pruner, TokenHeadPruner):
            name += f" heads={list(pruner.heads_gene)}"
            columns["heads"] = list(pruner.heads_gene)
        record = self.score(name, config)
        return {
            **record,
            **columns,
            "origin": record.get("origin", origin),
            "parents": record.get("parents", [_listed(p) for p in parents]),
        }


def _listed(gene: Gene | JointGene) -> list[Any]:
    """A gene as JSON-friendly lists."""
    return [list(part) for part in gene] if gene and isinstance(gene[0], tuple) else list(gene)
