"""Attention-head slicing of projection weights (Token+Head Adaptive, DESIGN.md s.5).

Removing heads means computing only their rows of the Q/K/V projections and their columns of
the output projection. Slicing a weight copies it, which at inference is the same copy for
every batch: on 2 CPU cores, MiniLM-L6 with 1-4 heads pruned per layer spent about 2 ms per
pass in these copies, 18% of a single-example pass. `HeadSlicer` keeps the slices of the
recent (weight, heads) pairs while gradients are off and slices afresh when they are on, so
that gradients reach the parameters.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

from tokenprune.engine.adapters import Projection


def _source_key(tensor: Tensor) -> tuple[Hashable, ...]:
    """What identifies the values of `tensor`: where its data starts, its view geometry and the
    version counter (which in-place updates such as optimizer steps or checkpoint loads bump)."""
    return tensor.data_ptr(), tensor.shape, tensor.stride(), tensor._version


class HeadSlicer:
    """Q/K/V rows and output-projection columns of kept attention heads, cached at inference.

    capacity: slices kept, least recently used dropped first. The engine keeps one head
    configuration's worth (at most 7 per layer: Q/K/V rows and biases, out-projection columns), so
    the cache never holds more than the model's attention weights: an evaluation or a benchmark
    repeats one configuration, a search moves from one to the next.
    """

    def __init__(self, head_dim: int, capacity: int = 64) -> None:
        self.head_dim = head_dim
        self.capacity = capacity
        self._cache: OrderedDict[tuple[Hashable, ...], tuple[weakref.ref[Tensor], Tensor]] = OrderedDict()

    def rows(self, projection: Projection, heads: Tensor) -> tuple[Tensor, Tensor | None]:
        """Weight rows and bias entries of `heads` of a Q/K/V projection (out = H * d_h)."""
        head_dim = self.head_dim
        weight = self._cached(
            "rows", projection.weight, heads, lambda w: w.view(-1, head_dim, w.shape[-1])[heads].flatten(0, 1)
        )
        bias = projection.bias
        if bias is not None:
            bias = self._cached("bias", bias, heads, lambda b: b.view(-1, head_dim)[heads].flatten())
        return weight, bias

    def columns(self, projection: Projection, heads: Tensor) -> Tensor:
        """Weight columns of `heads` of an output projection (in = H * d_h)."""
        head_dim = self.head_dim
        return self._cached(
            "columns",
            projection.weight,
            heads,
            lambda w: w.view(w.shape[0], -1, head_dim)[:, heads].flatten(1, 2),
        )

    def _cached(self, kind: str, tensor: Tensor, heads: Tensor, slice_: Callable[[Tensor], Tensor]) -> Tensor:
        if torch.is_grad_enabled():  # autograd may need the slice: a fresh, differentiable one
            return slice_(tensor)
        owner = tensor._base if tensor._base is not None else tensor
        key = (kind, id(owner), _source_key(tensor), tuple(heads.tolist()))
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is owner:
            self._cache.move_to_end(key)
            return hit[1]
        sliced = slice_(tensor).contiguous()
        self._cache[key] = (weakref.ref(owner), sliced)
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return sliced
