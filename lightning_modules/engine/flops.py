"""The one analytic FLOPs counter used by every method, search and report (DESIGN.md s.4).

Per example and layer, with n_in real tokens entering, n_q query rows scored (n_in whenever
attention probabilities are computed), n_out kept, h heads of width d_h, hidden d, FFN width
d_ff with f d x d_ff matrices (2; 3 for gated FFNs such as Flan-T5's), the multiply-accumulates are

    QKV 3*n_in*d*h*d_h + logits h*n_q*n_in*d_h + context h*n_out*n_in*d_h
    + out-proj n_out*h*d_h*d + FFN f*n_out*d*d_ff
    (+ score vector h*n_q*n_in in layers that compute it: one MAC per attention probability)

and FLOPs = 2 * MACs, on real (unpadded) lengths. Embeddings, pooler and classifier are not
counted (they do not depend on pruning). The papers' convention (PoWER-BERT, LTP) is
`2*d*n_in^2 + 4*d^2*n_in + 8*d^2*n_out` MACs per layer (d_ff = 4d), its attention terms times
h/H when heads are pruned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenprune.engine.adapters import EncoderAdapter
from tokenprune.engine.state import LayerTrace


@dataclass(frozen=True)
class EncoderDims:
    """Sizes the counter needs."""

    num_layers: int
    num_heads: int
    hidden: int
    head_dim: int
    ffn: int
    ffn_matrices: int = 2

    @classmethod
    def of(cls, adapter: EncoderAdapter) -> EncoderDims:
        return cls(
            adapter.num_layers,
            adapter.num_heads,
            adapter.hidden_size,
            adapter.head_dim,
            adapter.intermediate_size,
            adapter.ffn_matrices,
        )


def layer_macs(
    dims: EncoderDims, n_in: Tensor, n_query: Tensor, n_out: Tensor, heads: int, scored: bool | Tensor = False
) -> Tensor:
    """MACs of one layer per example (DESIGN.md s.4), all arguments per example except heads;
    `scored` (whether the score vector was computed) is one bool or one per example."""
    n_in, n_query, n_out = (t.to(torch.float64) for t in (n_in, n_query, n_out))
    width = heads * dims.head_dim
    return (
        3 * n_in * dims.hidden * width
        + n_query * n_in * (width + heads * scored)
        + n_out * n_in * width
        + n_out * width * dims.hidden
        + dims.ffn_matrices * n_out * dims.hidden * dims.ffn
    )


def encoder_macs(dims: EncoderDims, trace: Sequence[LayerTrace]) -> Tensor:
    """MACs of the whole encoder per example, (B,), from the engine's trace."""
    total = torch.zeros_like(trace[0].n_in, dtype=torch.float64)
    for layer in trace:
        if not layer.skipped:
            total = total + layer_macs(dims, layer.n_in, layer.n_query, layer.n_out, layer.heads, layer.scored)
    return total


def unpruned_macs(dims: EncoderDims, lengths: Tensor) -> Tensor:
    """MACs of the full model on inputs of `lengths` real tokens, (B,)."""
    return dims.num_layers * layer_macs(dims, lengths, lengths, lengths, dims.num_heads)


def paper_macs(dims: EncoderDims, trace: Sequence[LayerTrace]) -> Tensor:
    """MACs in the PoWER-BERT/LTP convention: 2*d*n_in^2 + 4*d^2*n_in + 8*d^2*n_out per layer,
    the attention terms scaled by the share of heads kept, h/H (Token+Head Adaptive)."""
    d = dims.hidden
    total = torch.zeros_like(trace[0].n_in, dtype=torch.float64)
    for layer in trace:
        if not layer.skipped:
            n_in, n_out = layer.n_in.to(torch.float64), layer.n_out.to(torch.float64)
            share = layer.heads / dims.num_heads
            total = total + share * (2 * d * n_in**2 + 4 * d**2 * n_in) + 8 * d**2 * n_out
    return total
