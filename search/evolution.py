"""Length-configuration searches for Length-Adaptive models (Kim and Cho, ACL 2021, Sec. 4).

EvolutionarySearch is the paper's multi-objective evolutionary search (details as in the reference
code, DESIGN.md s.5): the initial population holds constant-ratio genes spread evenly in FLOPs
from the sandwich's smallest sub-model (with `fraction` lengths, the smallest gene itself) to the
full model, plus the full gene; each of G iterations keeps the Pareto front of everything
evaluated and adds n_m mutations (each layer resampled with probability p inside the bounds that
keep the gene non-increasing) and n_c crossovers (element-wise ceil of the mean of two front
genes); only genes inside the FLOPs bounds are evaluated. Gene entries range over
[1, context.max_gene_length]. ConstantRatioSearch is the paper's Figure-2 baseline: the same model at
constant keep ratios.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tokenprune.checks import check_range
from tokenprune.pruners.length import Gene, check_drop_prob, constant_ratio_gene
from tokenprune.search.context import SearchContext
from tokenprune.search.pareto import hypervolume, pareto_front


class ConstantRatioSearch:
    """Genes where every layer keeps `ratio` of the previous layer's tokens."""

    requires_length_adaptive = True

    def __init__(self, ratios: Sequence[float]) -> None:
        if not ratios or any(not 0 < r <= 1 for r in ratios):
            raise ValueError(f"search.ratios={list(ratios)} must be non-empty, each in (0, 1]")
        self.ratios = list(ratios)

    def run(self, context: SearchContext) -> list[dict[str, Any]]:
        layers = context.dims.num_layers
        return [
            context.evaluate(constant_ratio_gene(layers, context.max_gene_length, r), "constant_ratio") | {"ratio": r}
            for r in self.ratios
        ]


class EvolutionarySearch:
    """LAT's evolutionary search over non-increasing length tuples (seeded, resumable via the cache)."""

    requires_length_adaptive = True

    def __init__(
        self,
        iterations: int = 30,
        mutations: int = 30,
        crossovers: int = 30,
        mutation_prob: float = 0.5,
        population: int = 10,
        length_drop: float = 0.2,
        flops_min: float = 0.0,
        flops_max: float = 1.0,
        seed: int = 0,
    ) -> None:
        for name, value in {"iterations": iterations, "population": population}.items():
            if value < 1:
                raise ValueError(f"search.{name}={value} must be >= 1")
        if mutations < 0 or crossovers < 0 or mutations + crossovers == 0:
            raise ValueError(
                f"search.mutations={mutations}, search.crossovers={crossovers}: need >= 0 and a positive sum"
            )
        check_range("search.mutation_prob", mutation_prob, 0.0, 1.0, low_open=True)
        check_drop_prob("search.length_drop", length_drop)
        if not 0 <= flops_min < flops_max:
            raise ValueError(f"search.flops_min={flops_min} must be >= 0 and below search.flops_max={flops_max}")
        self.iterations, self.mutations, self.crossovers = iterations, mutations, crossovers
        self.mutation_prob, self.population, self.length_drop = mutation_prob, population, length_drop
        self.flops_min, self.flops_max, self.seed = flops_min, flops_max, seed

    def initial_population(self, context: SearchContext) -> list[Gene]:
        layers, longest = context.dims.num_layers, context.max_gene_length
        smallest_flops = context.sandwich_floor_flops(self.length_drop)
        if self.flops_max < smallest_flops:
            raise ValueError(
                f"search.flops_max={self.flops_max} is below the smallest length configuration's "
                f"relative FLOPs ({smallest_flops:.3f}); raise it or lower search.length_drop"
            )
        ratios = np.linspace(0.0, 1.0, 201)[1:]
        genes = {constant_ratio_gene(layers, longest, float(r)) for r in ratios}
        scored = sorted((context.gene_flops(g), g) for g in genes)
        low, high = max(self.flops_min, smallest_flops), min(self.flops_max, 1.0)
        targets = np.linspace(low, high, self.population)
        chosen = [min(scored, key=lambda item: abs(item[0] - target))[1] for target in targets]
        return list(dict.fromkeys([*chosen, (longest,) * layers]))

    def mutate(self, gene: Gene, rng: random.Random, longest: int) -> Gene:
        child = list(gene)
        for i in range(len(child)):
            if rng.random() < self.mutation_prob:
                upper = child[i - 1] if i > 0 else longest
                lower = child[i + 1] if i + 1 < len(child) else 1
                child[i] = rng.randint(lower, upper)
        return tuple(child)

    @staticmethod
    def crossover(first: Gene, second: Gene) -> Gene:
        return tuple(math.ceil((a + b) / 2) for a, b in zip(first, second))

    def within_bounds(self, gene: Gene, context: SearchContext) -> bool:
        return self.flops_min <= context.gene_flops(gene) <= self.flops_max

    def run(self, context: SearchContext) -> list[dict[str, Any]]:
        rng = random.Random(self.seed)
        longest = context.max_gene_length
        evaluated: dict[Gene, dict[str, Any]] = {}
        for gene in self.initial_population(context):
            if self.within_bounds(gene, context) or gene == (longest,) * len(gene):
                evaluated[gene] = context.evaluate(gene, "initial")
        for iteration in range(self.iterations):
            table = pd.DataFrame([r for g, r in evaluated.items() if self.within_bounds(g, context)])
            front = [tuple(g) for g in pareto_front(table, "score", "flops_ratio", context.main_mode)["gene"]]
            context.history.append(
                {
                    "iteration": iteration,
                    "evaluated": len(evaluated),
                    "front_size": len(front),
                    "hypervolume": hypervolume(table, "score", "flops_ratio", mode=context.main_mode),
                }
            )
            children: list[tuple[Gene, str, tuple[Gene, ...]]] = []
            for kind, count in (("mutation", self.mutations), ("crossover", self.crossovers)):
                for _ in range(count):
                    for _attempt in range(100):
                        parents: tuple[Gene, ...]
                        if kind == "mutation":
                            parents = (rng.choice(front),)
                            child = self.mutate(parents[0], rng, longest)
                        else:
                            parents = (rng.choice(front), rng.choice(front))
                            child = self.crossover(parents[0], parents[1])
                        known = child in evaluated or any(child == c for c, _, _ in children)
                        if not known and self.within_bounds(child, context):
                            children.append((child, kind, parents))
                            break
            for child, kind, parents in children:
                evaluated[child] = context.evaluate(child, f"{kind}@{iteration}", parents)
        table = pd.DataFrame(list(evaluated.values()))
        context.history.append(
            {
                "iteration": self.iterations,
                "evaluated": len(evaluated),
                "front_size": len(pareto_front(table, "score", "flops_ratio", context.main_mode)),
                "hypervolume": hypervolume(table, "score", "flops_ratio", mode=context.main_mode),
            }
        )
        return list(evaluated.values())
