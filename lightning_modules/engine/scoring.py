"""Token importance scores and keep-mask helpers shared by every pruner (DESIGN.md s.4)."""

from __future__ import annotations

import torch
from torch import Tensor


def score_vector(probs: Tensor, mask: Tensor, causal: bool = False) -> Tensor:
    """Attention received per token, averaged over heads (ACC's SV; PoWER-BERT significance / H).

    SV_j = (1/H) * sum_h sum_{i real} A[h, i, j] for real tokens j, 0 for padding. probs is
    (B, H, n, n) softmax attention over the current tokens, mask (B, n) marks real tokens; the
    mean of SV over the real tokens of a row is 1. causal (ACC eq. 8, decoders): SV_j is divided
    by the number of real queries that can see token j, i.e. the real tokens at or after it
    (the engine keeps tokens in their original order).
    """
    real = mask.to(probs.dtype)
    batch, heads, length, _ = probs.shape
    # every head's query rows as one block: a (1 x hn) @ (hn x n) product per example
    real_rows = real[:, None, :].expand(batch, heads, length).reshape(batch, 1, heads * length)
    rows = torch.bmm(real_rows, probs.reshape(batch, heads * length, length))
    received = rows.squeeze(1) / heads
    if causal:
        received = received / real.flip(1).cumsum(1).flip(1).clamp(min=1)
    return received * real


def protect(scores: Tensor, mask: Tensor) -> Tensor:
    """Scores where the protected token (slot 0: [CLS], see TokenPruner) ranks first and padding last
    (slot 0 of a row without real tokens too; callers keep only real tokens)."""
    ranked = scores.masked_fill(~mask, float("-inf"))
    ranked[:, 0] = float("inf")
    return ranked


def keep_top(scores: Tensor, mask: Tensor, counts: Tensor) -> Tensor:
    """(B, n) bool mask keeping the `counts[b]` best-scored real tokens of row b (slot 0 always).

    counts is clamped to [1, real length] so at least one token survives in every non-empty row.
    """
    counts = torch.minimum(counts.clamp(min=1), mask.sum(dim=1))
    order = torch.argsort(protect(scores, mask), dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (ranks < counts[:, None]) & mask


def keep_above(scores: Tensor, mask: Tensor, threshold: Tensor | float) -> Tensor:
    """(B, n) bool mask of real tokens whose score reaches `threshold`, slot 0 always kept."""
    keep = (scores >= threshold) & mask
    keep[:, 0] = mask[:, 0]
    return keep
