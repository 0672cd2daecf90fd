"""Length-configuration searches for Length-Adaptive models (Kim and Cho, ACL 2021, Sec. 4).

EvolutionarySearch is the paper's multi-objective evolutionary search (details as in the reference
code, DESIGN.md s.5): the initial population holds constant-ratio genes spread evenly in FLOPs
from the sandwich's smallest sub-model (with `fraction` lengths, the smallest gene itself) to the
full model, plus the full gene; each of G iterations keeps the Pareto front of everything
evaluated and adds n_m mutations (each layer resampled with probability p inside the bounds that
keep the gene non-increasing) and n_c crossovers (element-wise ceil of the mean of two front
genes); only genes inside the FLOPs bounds are evaluated (`flops_min=smallest`: none below the
smallest sub-model's FLOPs, as the reference, so the front stays where training went; the default
0 lets the front extend below it). Gene entries range over
[1, context.max_gene_length]. ConstantRatioSearch is the paper's Figure-2 baseline: the same model at
constant keep ratios.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tokenprune.checks import check_choice, check_range
from tokenprune.modules.length_adaptive import LengthAdaptiveModule
from tokenprune.pruners.length import Gene, check_drop_prob, constant_ratio_gene
from tokenprune.search.context import SearchContext, SearchStrategy
from tokenprune.search.pareto import hypervolume, on_front

log = logging.getLogger(__name__)
OBJECTIVES = ("flops", "latency")


def resample_length(lengths: list[int], layer: int, rng: random.Random, longest: int) -> None:
    """Resample `lengths[layer]` between its neighbours, so the gene stays non-increasing in [1, longest]."""
    upper = lengths[layer - 1] if layer > 0 else longest
    lower = lengths[layer + 1] if layer + 1 < len(lengths) else 1
    lengths[layer] = rng.randint(lower, upper)


def mutate_lengths(gene: Gene, rng: random.Random, probability: float, longest: int) -> Gene:
    """Each layer resampled with `probability` between its neighbours (the earlier one already mutated)."""
    child = list(gene)
    for layer in range(len(child)):
        if rng.random() < probability:
            resample_length(child, layer, rng, longest)
    return tuple(child)


def ceil_mean(first: Sequence[int], second: Sequence[int]) -> tuple[int, ...]:
    """Crossover: the element-wise ceiling of the mean (keeps monotone genes monotone)."""
    return tuple(math.ceil((a + b) / 2) for a, b in zip(first, second, strict=True))


class ConstantRatioSearch(SearchStrategy):
    """Genes where every layer keeps `ratio` of the previous layer's tokens."""

    required_module = LengthAdaptiveModule
    pruner_group = "length_adaptive"

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


class EvolutionarySearch(SearchStrategy):
    """LAT's evolutionary search over non-increasing length tuples (seeded, resumable via the cache).

    `objective`: what the front minimises besides the score: `flops` (relative FLOPs, analytic) or
    `latency` (wall time over the stock model's on a fixed val-split sample, this device)."""

    required_module = LengthAdaptiveModule
    pruner_group = "length_adaptive"

    def __init__(
        self,
        iterations: int = 30,
        mutations: int = 30,
        crossovers: int = 30,
        mutation_prob: float = 0.5,
        population: int = 10,
        length_drop: float = 0.2,
        flops_min: float | str = 0.0,
        flops_max: float = 1.0,
        seed: int = 0,
        objective: str = "flops",
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
        self.floor_at_smallest = flops_min == "smallest"
        if self.floor_at_smallest:
            flops_min = 0.0  # raised to the smallest sub-model's FLOPs once the search knows them
        if isinstance(flops_min, str) or isinstance(flops_max, str):
            raise ValueError(
                f"search.flops_min={flops_min!r}, search.flops_max={flops_max!r}: numbers "
                "(flops_min may also be 'smallest', the smallest sub-model's FLOPs)"
            )
        if not 0 <= flops_min < flops_max:
            raise ValueError(f"search.flops_min={flops_min} must be >= 0 and below search.flops_max={flops_max}")
        self.iterations, self.mutations, self.crossovers = iterations, mutations, crossovers
        self.mutation_prob, self.population, self.length_drop = mutation_prob, population, length_drop
        self.flops_min, self.flops_max, self.seed = flops_min, flops_max, seed
        check_choice("search.objective", objective, OBJECTIVES)
        self.objective = objective
        self.efficiency = f"{objective}_ratio"

    def initial_population(self, context: SearchContext) -> list[Gene]:
        layers, longest = context.dims.num_layers, context.max_gene_length
        smallest_flops = context.sandwich_floor_flops(self.length_drop)
        if self.flops_max < smallest_flops:
            raise ValueError(
                f"search.flops_max={self.flops_max} is below the smallest length configuration's "
                f"relative FLOPs ({smallest_flops:.3f}); raise it or lower search.length_drop"
            )
        self.raise_floor(smallest_flops)
        return list(dict.fromkeys([*self.ratio_genes(context, smallest_flops), (longest,) * layers]))

    def raise_floor(self, smallest_flops: float) -> None:
        """With flops_min=smallest, genes below the smallest sub-model's FLOPs are out of bounds."""
        if self.floor_at_smallest:
            self.flops_min = smallest_flops * (1 - 1e-9)  # the smallest gene itself stays in

    def ratio_genes(self, context: SearchContext, floor: float) -> list[Gene]:
        """`population` constant-ratio length genes spread evenly in FLOPs from `floor` (or
        flops_min) to flops_max (or the full model), fewest FLOPs first."""
        layers, longest = context.dims.num_layers, context.max_gene_length
        ratios = np.linspace(0.0, 1.0, 201)[1:]
        genes = {constant_ratio_gene(layers, longest, float(r)) for r in ratios}
        scored = sorted((context.gene_flops(g), g) for g in genes)
        low, high = max(self.flops_min, floor), min(self.flops_max, 1.0)
        targets = np.linspace(low, high, self.population)
        return [min(scored, key=lambda item: abs(item[0] - target))[1] for target in targets]

    def mutate(self, gene: Gene, rng: random.Random, context: SearchContext) -> Gene:
        return mutate_lengths(gene, rng, self.mutation_prob, context.max_gene_length)

    @staticmethod
    def crossover(first: Gene, second: Gene) -> Gene:
        return ceil_mean(first, second)

    def within_bounds(self, gene: Gene, context: SearchContext) -> bool:
        return self.flops_min <= context.gene_flops(gene) <= self.flops_max

    def full_gene(self, context: SearchContext) -> Any:
        return (context.max_gene_length,) * context.dims.num_layers

    def record(self, gene: Any, origin: str, context: SearchContext, parents: Sequence[Any] = ()) -> dict[str, Any]:
        """The candidate's record, with its measured latency ratio when that is the objective."""
        record = context.evaluate(gene, origin, parents)
        if self.objective == "latency":
            if context.latency is None:
                raise ValueError("search.objective=latency needs a device to time candidates on")
            record["latency_ratio"] = context.latency(record["pruner"])
        return record

    def front_of(self, evaluated: dict[Any, dict[str, Any]], context: SearchContext) -> list[Any]:
        genes = [gene for gene in evaluated if self.within_bounds(gene, context)]
        table = pd.DataFrame([evaluated[gene] for gene in genes])
        return [
            gene for gene, member in zip(genes, on_front(table, "score", self.efficiency, context.main_mode)) if member
        ]

    def progress(self, iteration: int, evaluated: dict[Any, dict[str, Any]], context: SearchContext) -> None:
        """Front size and hypervolume after each iteration: in the history (W&B) and the log."""
        table = pd.DataFrame(list(evaluated.values()))
        point = {
            "iteration": iteration,
            "evaluated": len(evaluated),
            "front_size": int(on_front(table, "score", self.efficiency, context.main_mode).sum()),
            "hypervolume": hypervolume(table, "score", self.efficiency, mode=context.main_mode),
        }
        context.history.append(point)
        log.info(
            "evolution iteration %d/%d: %d evaluated, front %d, hypervolume %.4f",
            iteration,
            self.iterations,
            point["evaluated"],
            point["front_size"],
            point["hypervolume"],
        )

    def run(self, context: SearchContext) -> list[dict[str, Any]]:
        rng = random.Random(self.seed)
        full = self.full_gene(context)
        evaluated: dict[Any, dict[str, Any]] = {}
        for gene in self.initial_population(context):
            if self.within_bounds(gene, context) or gene == full:
                evaluated[gene] = self.record(gene, "initial", context)
        for iteration in range(self.iterations):
            front = self.front_of(evaluated, context)
            if not front:  # nothing to mutate or cross: the FLOPs band holds no initial configuration
                raise ValueError(
                    f"no initial configuration lies within search.flops_min={self.flops_min}.."
                    f"search.flops_max={self.flops_max} (relative FLOPs); widen the band or raise search.population"
                )
            self.progress(iteration, evaluated, context)
            children: list[tuple[Any, str, tuple[Any, ...]]] = []
            for kind, count in (("mutation", self.mutations), ("crossover", self.crossovers)):
                for _ in range(count):
                    for _attempt in range(100):
                        parents: tuple[Any, ...]
                        if kind == "mutation":
                            parents = (rng.choice(front),)
                            child = self.mutate(parents[0], rng, context)
                        else:
                            parents = (rng.choice(front), rng.choice(front))
                            child = self.crossover(parents[0], parents[1])
                        known = child in evaluated or any(child == c for c, _, _ in children)
                        if not known and self.within_bounds(child, context):
                            children.append((child, kind, parents))
                            break
            for child, kind, parents in children:
                evaluated[child] = self.record(child, f"{kind}@{iteration}", context, parents)
        self.progress(self.iterations, evaluated, context)
        return list(evaluated.values())
