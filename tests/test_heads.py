"""Head slicing (engine/heads.py): cached slices at inference equal fresh ones and follow the weights."""

from __future__ import annotations

import torch
from conftest import random_batch, tiny_gpt2, tiny_model

from tokenprune.engine import Projection, PrunableEncoder
from tokenprune.engine.heads import HeadSlicer

HEADS = [torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([3])]


def test_cached_slices_are_the_heads_rows_and_columns_and_follow_weight_updates():
    slicer = HeadSlicer(head_dim=5)
    linear = torch.nn.Linear(20, 20)
    heads = torch.tensor([1, 3])
    rows = torch.cat([torch.arange(5, 10), torch.arange(15, 20)])
    with torch.no_grad():
        weight, bias = slicer.stacked_rows([Projection.of(linear)], heads)
        assert torch.equal(weight, linear.weight[rows]) and torch.equal(bias, linear.bias[rows])
        assert slicer.stacked_rows([Projection.of(linear)], heads)[0] is weight, "a repeat is served from the cache"
        assert torch.equal(slicer.columns(Projection.of(linear), heads), linear.weight[:, rows])
        linear.weight.mul_(2)  # an optimizer step or a checkpoint load changes the values in place
        assert torch.equal(slicer.stacked_rows([Projection.of(linear)], heads)[0], linear.weight[rows])
        other = torch.nn.Linear(20, 20)
        assert torch.equal(slicer.stacked_rows([Projection.of(other)], heads)[0], other.weight[rows])
    assert len(slicer._cache) <= slicer.capacity


def test_stacked_rows_put_each_projection_side_by_side_with_the_first_scaled():
    slicer = HeadSlicer(head_dim=5)
    query, key, value = (torch.nn.Linear(20, 20) for _ in range(3))
    key.bias = None  # a projection without a bias contributes zeros
    projections = [Projection.of(linear) for linear in (query, key, value)]
    rows = torch.cat([torch.arange(0, 5), torch.arange(10, 15)])
    with torch.no_grad():
        for heads, index in ((torch.tensor([0, 2]), rows), (None, torch.arange(20))):
            weight, bias = slicer.stacked_rows(projections, heads, scale=0.5)
            expected = torch.cat([query.weight[index] * 0.5, key.weight[index], value.weight[index]])
            assert torch.equal(weight, expected)
            assert torch.equal(bias, torch.cat([query.bias[index] * 0.5, torch.zeros(len(index)), value.bias[index]]))
            assert slicer.stacked_rows(projections, heads, scale=0.5)[0] is weight
            assert not torch.equal(slicer.stacked_rows(projections, heads, scale=1.0)[0], weight), "scale is keyed"


def test_slicing_under_autograd_is_fresh_and_reaches_the_parameters():
    slicer = HeadSlicer(head_dim=5)
    linear = torch.nn.Linear(20, 20)
    weight, _ = slicer.stacked_rows([Projection.of(linear)], torch.tensor([0, 2]))
    weight.sum().backward()
    assert linear.weight.grad[5:10].abs().sum() == 0 and linear.weight.grad[:5].abs().sum() == 5 * 20
    assert not slicer._cache


def test_engine_with_the_cache_equals_slicing_afresh_across_batches_and_families():
    for _, adapter in (tiny_model("bert"), tiny_gpt2()):
        encoder = PrunableEncoder(adapter)
        heads = HEADS[: adapter.num_layers]
        for seed in (1, 2):
            ids, mask = random_batch(seed=seed)
            with torch.no_grad():
                cached = encoder(ids, mask, heads=heads).hidden
            fresh = encoder(ids, mask, heads=heads).hidden.detach()  # gradients on: sliced afresh
            torch.testing.assert_close(cached, fresh, atol=1e-6, rtol=1e-6)
        assert 0 < len(encoder.head_slicer._cache) <= 5 * adapter.num_layers, "one configuration's slices, cached"
