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
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from tokenprune.engine.adapters import Projection
from tokenprune.engine.kernels import value_key


class HeadSlicer:
    """Stacked Q/K/V rows and output-projection columns of kept attention heads, cached at inference.

    capacity: tensors kept, least recently used dropped first. The engine keeps one head
    configuration's worth (at most 5 per layer: the stacked Q/K/V weight and bias, a second pair
    when V reads another input (MobileBERT), out-projection columns), so the cache holds about one
    copy of the model's attention weights: an evaluation or a benchmark repeats one
    configuration, a search moves from one to the next.
    """

    def __init__(self, head_dim: int, capacity: int = 64) -> None:
        self.head_dim = head_dim
        self.capacity = capacity
        self._cache: OrderedDict[tuple[Hashable, ...], tuple[list[weakref.ref[Tensor]], Tensor]] = OrderedDict()

    def stacked_rows(
        self, projections: Sequence[Projection], heads: Tensor | None, scale: float = 1.0
    ) -> tuple[Tensor, Tensor | None]:
        """One weight and bias holding the rows of `heads` (None: all heads) of several projections
        of the same input, side by side, the first projection's rows times `scale`: Q, K and V as
        one GEMM with the softmax scale folded into Q (DESIGN.md s.3). A projection without a bias
        contributes zeros when another has one."""
        head_dim = self.head_dim

        def head_rows(tensor: Tensor) -> Tensor:
            return tensor if heads is None else tensor.view(-1, head_dim, *tensor.shape[1:])[heads].flatten(0, 1)

        def stack(tensors: Sequence[Tensor]) -> Tensor:
            first, *rest = (head_rows(tensor) for tensor in tensors)
            return torch.cat([first * scale if scale != 1.0 else first, *rest])

        weights = [projection.weight for projection in projections]
        weight = self._cached("rows", weights, heads, scale, lambda: stack(weights))
        biases = [projection.bias for projection in projections]
        present = [bias for bias in biases if bias is not None]
        if not present:
            return weight, None
        missing = tuple(bias is None for bias in biases)  # keyed: which projections contribute zeros

        def filled() -> Tensor:
            zeros = [w.new_zeros(w.shape[0]) for w in weights]
            return stack([zero if bias is None else bias for bias, zero in zip(biases, zeros)])

        return weight, self._cached(f"bias{missing}", present, heads, scale, filled)

    def columns(self, projection: Projection, heads: Tensor) -> Tensor:
        """Weight columns of `heads` of an output projection (in = H * d_h)."""
        weight = projection.weight
        return self._cached(
            "columns",
            [weight],
            heads,
            1.0,
            lambda: weight.view(weight.shape[0], -1, self.head_dim)[:, heads].flatten(1, 2),
        )

    def _cached(
        self, kind: str, tensors: Sequence[Tensor], heads: Tensor | None, scale: float, build: Callable[[], Tensor]
    ) -> Tensor:
        """build(): a tensor made from `tensors`; at inference the one made last time for the same
        tensors, values, heads and scale."""
        if torch.is_grad_enabled():  # autograd may need it: a fresh, differentiable one
            return build()
        owners = [tensor._base if tensor._base is not None else tensor for tensor in tensors]
        key = (
            kind,
            tuple(id(owner) for owner in owners),
            tuple(value_key(tensor) for tensor in tensors),
            None if heads is None else tuple(heads.tolist()),
            scale,
        )
        hit = self._cache.get(key)
        if hit is not None and all(ref() is owner for ref, owner in zip(hit[0], owners)):
            self._cache.move_to_end(key)
            return hit[1]
        built = build().contiguous()
        self._cache[key] = ([weakref.ref(owner) for owner in owners], built)
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return built
