"""Measured speedups of pruning configurations over the stock HF model, for searches that tune
against wall time (DESIGN.md s.8: same batches, warm-up, median of interleaved repeats)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from tokenprune.engine.pruner import TokenPruner
from tokenprune.modules.base import TokenPruningModule
from tokenprune.throughput import measure_batches


def measured_speedups(
    module: TokenPruningModule,
    pruners: Sequence[TokenPruner | None],
    batches: Sequence[dict[str, Tensor]],
    warmup: int = 1,
    repeats: int = 3,
) -> list[float]:
    """Speedup of the engine with each pruner over the stock HF model with sdpa attention, every
    variant timed on each batch back to back (a batch's variants see the same machine state)."""
    module.eval()
    module.model.set_attn_implementation("sdpa")

    def engine_with(pruner: TokenPruner | None) -> Callable[[dict[str, Tensor]], object]:
        return lambda batch: module(batch, pruner=pruner)

    variants: dict[str, Callable[[dict[str, Tensor]], object]] = {"hf_sdpa": module.stock_logits}
    for index, pruner in enumerate(pruners):
        variants[f"config_{index}"] = engine_with(pruner)
    timings = measure_batches(variants, batches, torch.device(module.device), warmup, repeats)
    reference = timings["hf_sdpa"]["median_s"]
    return [reference / timings[f"config_{index}"]["median_s"] for index in range(len(pruners))]
