"""Attention for pruning layers at inference: context and score vector, one batch chunk at a time.

A pruning layer needs the softmax probabilities for the score vector (scoring.score_vector). On
the whole batch they form a (B, H, n, n) tensor that goes through main memory several times
(logits, mask, softmax, column sums, times V), which made eager attention cost about 2.4x the
fused kernel at n = 128 on CPU. Computing them for a few examples at a time keeps each chunk in
cache: measured on 2 CPU cores, MiniLM-L6 shapes (B = 32, H = 12, d_h = 32), 1.5x the fused
kernel at n = 128 and on par with it at n <= 88, where pruned layers spend most of their time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenprune.engine.scoring import score_vector

CHUNK_ELEMENTS = 1 << 20  # attention probabilities per chunk: 4 MiB in float32


def chunked_attention_applies(query: Tensor, dropout: float) -> bool:
    """Whether attention_with_scores may serve this call: no attention dropout and no gradient
    wanted (training keeps the whole-batch eager path, whose probabilities autograd stores)."""
    return dropout == 0.0 and not (torch.is_grad_enabled() and query.requires_grad)


def _head_major(tensor: Tensor, scale: float = 1.0) -> Tensor:
    """scale * tensor as a contiguous (B, h, n, d_h) tensor, in one pass when autograd is off.

    The projections' (B, h, n, d_h) views are strided (each token's heads side by side), which
    batched matmul cannot read in place: it copies them, a transposed key element by element.
    Copied head-major (K then read transposed in place), QK^T took 0.6-0.8x and PV 0.7-1.0x the
    time at MiniLM shapes, 25-100 tokens x 32 rows; copied per chunk rather than for the whole
    batch at once, the copy is still in cache when read: whole passes 0.95-0.99x the time on
    217-token inputs, 0.995x at 26 tokens (README "Measured")."""
    if scale == 1.0:
        return tensor.contiguous()
    if torch.is_grad_enabled() and tensor.requires_grad:
        return (tensor * scale).contiguous()
    return torch.mul(tensor, scale, out=torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device))


def softmax_attention(query: Tensor, key: Tensor, additive: Tensor, scale: float | None = None) -> Tensor:
    """Attention probabilities softmax(scale * QK^T + additive), (B, h, n, n); scale defaults to 1/sqrt(d_h)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(_head_major(query, scale), _head_major(key).transpose(-1, -2)).add_(additive)
    return torch.softmax(logits, dim=-1)


def attention_with_scores(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    additive: Tensor,
    mask: Tensor,
    scale: float | None = None,
    causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """Context (B, h, n, d_h) of every query row and the score vector SV (B, n).

    additive: key mask (B, 1, 1, n) or full bias (B, 1 or h, n, n) added to the logits; mask:
    (B, n) bool, real tokens. Equal to softmax_attention(query, key, additive, scale) @ V and
    score_vector(probs, mask, causal) on the whole batch.
    """
    batch, heads, length, _ = query.shape
    # Chunks are for CPU caches; an accelerator gets the whole batch in one launch.
    step = max(1, CHUNK_ELEMENTS // (heads * length * length)) if query.device.type == "cpu" else batch
    if step >= batch:  # one chunk: no output buffers to fill (fewer calls: short inputs pay per call)
        probs = softmax_attention(query, key, additive, scale)
        return torch.matmul(probs, _head_major(value)), score_vector(probs, mask, causal)
    context = query.new_empty(batch, heads, length, value.shape[-1])
    scores = query.new_empty(batch, length)
    for start in range(0, batch, step):
        rows = slice(start, start + step)
        probs = softmax_attention(query[rows], key[rows], additive[rows], scale)
        scores[rows] = score_vector(probs, mask[rows], causal)
        torch.matmul(probs, _head_major(value[rows]), out=context[rows])
    return context, scores
