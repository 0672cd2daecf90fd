"""Joint token + head search for Token and Head Adaptive models (THAT; Lee et al., COLING 2022).

The Length-Adaptive evolutionary search (search/evolution.py) over genes (lengths, heads): the
initial population pairs `population` constant-ratio length genes (fewest FLOPs first) with head
genes `floor(linspace(1, r_i, L))`, r_i = linspace(1, H, population + 2)[1:-1][i], each capped
at the training cap, so the most token drop goes with the fewest heads pruned (the reference's
anti-correlated start), plus the smallest sub-model (smallest lengths, cap) and the full model;
one coin per layer mutates both parts (lengths between their neighbours, heads in
[h'_{l-1}, min(h_{l+1}, cap_l)]); crossover takes the ceiling of the mean of both tuples
(DESIGN.md s.5). `prune=tokens` or `heads` searches one part with the other fixed (full lengths
or every head), for the token-only and head-only fronts.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from tokenprune.checks import check_choice
from tokenprune.modules.token_head_adaptive import PRUNED_PARTS, TokenHeadAdaptiveModule
from tokenprune.pruners.length import smallest_gene
from tokenprune.pruners.token_head import HeadGene, head_cap, ratio_head_gene
from tokenprune.search.context import JointGene, SearchContext
from tokenprune.search.evolution import EvolutionarySearch, ceil_mean, resample_length


class TokenHeadEvolutionarySearch(EvolutionarySearch):
    """THAT's evolutionary search over (lengths, heads pruned per layer)."""

    required_module = TokenHeadAdaptiveModule
    pruner_group = "token_head_adaptive"

    def __init__(self, prune: str = "joint", population: int = 20, **evolution: Any) -> None:
        """`evolution`: the settings of EvolutionarySearch (iterations, mutations, objective, ...)."""
        check_choice("search.prune", prune, PRUNED_PARTS)
        super().__init__(population=population, **evolution)
        self.prune = prune

    def cap(self, context: SearchContext) -> HeadGene:
        layers = context.dims.num_layers
        return (0,) * layers if self.prune == "tokens" else head_cap(layers, context.dims.num_heads)

    def full_gene(self, context: SearchContext) -> JointGene:
        layers = context.dims.num_layers
        return (context.max_gene_length,) * layers, (0,) * layers

    def initial_population(self, context: SearchContext) -> list[JointGene]:
        layers, heads, longest = context.dims.num_layers, context.dims.num_heads, context.max_gene_length
        cap, full = self.cap(context), (longest,) * layers
        smallest = full if self.prune == "heads" else smallest_gene(layers, longest, self.length_drop)
        floor = context.gene_flops((smallest, cap))
        if self.flops_max < floor:
            raise ValueError(
                f"search.flops_max={self.flops_max} is below the smallest sub-model's relative FLOPs "
                f"({floor:.3f}); raise it or lower search.length_drop"
            )
        self.raise_floor(floor)
        lengths = self.ratio_genes(context, floor) if self.prune != "heads" else [full] * self.population
        ratios = np.linspace(1, heads, self.population + 2)[1:-1]
        head_genes = [
            tuple(min(h, c) for h, c in zip(ratio_head_gene(layers, float(r)), cap, strict=True)) for r in ratios
        ]
        pairs = list(zip(lengths, head_genes, strict=True))
        return list(dict.fromkeys([*pairs, (smallest, cap), self.full_gene(context)]))

    def mutate(self, gene: JointGene, rng: random.Random, context: SearchContext) -> JointGene:
        """One coin per layer resamples both parts of that layer (the parts `prune` searches)."""
        lengths, heads = list(gene[0]), list(gene[1])
        cap, longest = self.cap(context), context.max_gene_length
        for i in range(len(lengths)):
            if rng.random() >= self.mutation_prob:
                continue
            if self.prune != "heads":
                resample_length(lengths, i, rng, longest)
            if self.prune != "tokens":
                lower = heads[i - 1] if i > 0 else 0
                upper = min(heads[i + 1] if i + 1 < len(heads) else cap[i], cap[i])
                heads[i] = rng.randint(lower, max(lower, upper))
        return tuple(lengths), tuple(heads)

    @staticmethod
    def crossover(first: JointGene, second: JointGene) -> JointGene:
        return ceil_mean(first[0], second[0]), ceil_mean(first[1], second[1])
