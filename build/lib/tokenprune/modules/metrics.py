"""torchmetrics objects for what pruning does: FLOPs and kept tokens per layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from tokenprune.engine.flops import EncoderDims, encoder_macs, paper_macs, unpruned_macs
from tokenprune.engine.state import LayerTrace


class PruningStats(Metric):
    """Accumulates, over evaluated examples, pruned/unpruned encoder MACs (DESIGN.md s.4) and
    per-layer kept-token counts (sum and sum of squares, for mean and spread)."""

    full_state_update = False
    examples: Tensor
    macs: Tensor
    full_macs: Tensor
    paper_macs: Tensor
    paper_full_macs: Tensor
    kept: Tensor
    kept_sq: Tensor
    kept_frac: Tensor

    def __init__(self, dims: EncoderDims) -> None:
        super().__init__()
        self.dims = dims
        layers = dims.num_layers
        self.add_state("examples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("macs", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("full_macs", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("paper_macs", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("paper_full_macs", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kept", torch.zeros(layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kept_sq", torch.zeros(layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kept_frac", torch.zeros(layers, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, trace: Sequence[LayerTrace], input_lengths: Tensor) -> None:
        dims = self.dims
        lengths = input_lengths.to(torch.float64)
        self.examples += lengths.numel()
        self.macs += encoder_macs(dims, trace).sum()
        self.full_macs += unpruned_macs(dims, input_lengths).sum()
        self.paper_macs += paper_macs(dims, trace).sum()
        d = dims.hidden
        self.paper_full_macs += dims.num_layers * (2 * d * lengths**2 + 12 * d**2 * lengths).sum()
        kept = torch.stack([layer.n_out.to(torch.float64) for layer in trace])  # (L, B)
        self.kept += kept.sum(dim=1)
        self.kept_sq += (kept**2).sum(dim=1)
        self.kept_frac += (kept / lengths.clamp(min=1)).sum(dim=1)

    def compute(self) -> dict[str, Tensor]:
        count = self.examples.clamp(min=1)
        mean = self.kept / count
        result = {
            "gflops": 2 * self.macs / count / 1e9,
            "flops_ratio": self.macs / self.full_macs.clamp(min=1),
            "paper_gflops": 2 * self.paper_macs / count / 1e9,
            "paper_flops_ratio": self.paper_macs / self.paper_full_macs.clamp(min=1),
        }
        spread = (self.kept_sq / count - mean**2).clamp(min=0).sqrt()
        for layer in range(self.dims.num_layers):
            result[f"kept_tokens/layer_{layer}"] = mean[layer]
            result[f"kept_tokens_std/layer_{layer}"] = spread[layer]
            result[f"kept_fraction/layer_{layer}"] = self.kept_frac[layer] / count
        return result
