"""The one analytic FLOPs counter used by every method, search and report (DESIGN.md s.4).

Per example and layer, with n_in real tokens entering, n_q query rows scored (n_in whenever
attention probabilities are computed), n_out kept, h heads of width d_h, hidden d, FFN width
d_ff with f d x d_ff matrices (2; 3 for gated FFNs such as Flan-T5's), the multiply-accumulates are

    QKV 3*n_in*d*h*d_h + logits h*n_q*n_in*d_h + context h*n_out*n_in*d_h
    + out-proj n_out*h*d_h*d + FFN f*n_out*d*d_ff
    (+ score vector h*n_q*n_in in layers that compute it: one MAC per attention probability)

and FLOPs = 2 * MACs, on real (unpadded) lengths. Embeddings, pooler and classifier are not
counted (they do not depend on pruning). Layers whose attention reads and writes other widths
than d (MobileBERT: Q/K read the d_qk-wide bottleneck, V the d_v-wide layer input, the
out-projection writes the d_o-wide bottleneck) or that do other work per token (`input_macs` per
entering token before attention: MobileBERT's input bottlenecks; `output_macs` per kept token
after it, in place of the FFN term: MobileBERT's stacked FFNs and output bottleneck) count

    n_in*(input_macs + (2*d_qk + d_v)*h*d_h) + logits + context + n_out*(h*d_h*d_o + output_macs).

The papers' convention (PoWER-BERT, LTP) is
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
    """Sizes the counter needs. The attention widths (Q/K input d_qk, V input d_v, out-projection
    output d_o) default to `hidden`, `output_macs` to the FFN's ffn_matrices * hidden * ffn."""

    num_layers: int
    num_heads: int
    hidden: int
    head_dim: int
    ffn: int
    ffn_matrices: int = 2
    query_key_input: int | None = None
    value_input: int | None = None
    attention_output: int | None = None
    input_macs: int = 0
    output_macs: int | None = None

    @classmethod
    def of(cls, adapter: EncoderAdapter) -> EncoderDims:
        """The adapter's sizes; the attention widths are those of its first layer's projections."""
        parts = adapter.layer(0)
        return cls(
            adapter.num_layers,
            adapter.num_heads,
            adapter.hidden_size,
            adapter.head_dim,
            adapter.intermediate_size,
            adapter.ffn_matrices,
            query_key_input=parts.query.weight.shape[1],
            value_input=parts.value.weight.shape[1],
            attention_output=parts.out_proj.weight.shape[0],
            input_macs=adapter.input_macs,
            output_macs=adapter.output_macs,
        )


def layer_macs(
    dims: EncoderDims, n_in: Tensor, n_query: Tensor, n_out: Tensor, heads: int, scored: bool | Tensor = False
) -> Tensor:
    """MACs of one layer per example (DESIGN.md s.4), all arguments per example except heads;
    `scored` (whether the score vector was computed) is one bool or one per example."""
    n_in, n_query, n_out = (t.to(torch.float64) for t in (n_in, n_query, n_out))
    width = heads * dims.head_dim
    hidden = dims.hidden
    query_key, value, written = (
        hidden if size is None else size for size in (dims.query_key_input, dims.value_input, dims.attention_output)
    )
    output = dims.ffn_matrices * hidden * dims.ffn if dims.output_macs is None else dims.output_macs
    return (
        n_in * (dims.input_macs + (2 * query_key + value) * width)
        + n_query * n_in * (width + heads * scored)
        + n_out * n_in * width
        + n_out * (width * written + output)
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
