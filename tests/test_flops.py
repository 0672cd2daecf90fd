"""The analytic counter against torch's FlopCounterMode and against the closed form."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig

from tokenprune.engine import PrunableEncoder
from tokenprune.engine.flops import EncoderDims, encoder_macs, paper_macs, unpruned_macs
from tokenprune.pruners.static import RandomPruner, SpAttenPruner, TopKPruner


def measured_encoder_flops(adapter, ids, mask, **engine) -> tuple[float, list]:
    """FLOPs torch counts for the encoder layers (embeddings excluded), and the engine trace.

    FlopCounterMode does not count CPU fused attention kernels, so attention runs on the math
    backend and with gradients enabled (pruning layers then take the eager-probabilities path).
    """
    encoder = PrunableEncoder(adapter)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        embed_counter = FlopCounterMode(display=False)
        with embed_counter:
            adapter.embed(ids, None)
        counter = FlopCounterMode(display=False)
        with counter:
            out = encoder(ids, mask, **engine)
    return counter.get_total_flops() - embed_counter.get_total_flops(), out.trace


@pytest.mark.parametrize(
    "engine",
    [
        {},
        {"pruner": "topk"},
        {"pruner": "spatten"},
        {"pruner": "random"},
        {"pruner": "topk", "heads": [torch.tensor([0, 1, 3]), torch.tensor([2]), None, torch.tensor([0, 1])]},
    ],
    ids=["unpruned", "topk", "spatten", "random", "topk+heads"],
)
@pytest.mark.parametrize("family", ["bert", "mobilebert"])
def test_counter_matches_flop_counter_mode(family, engine):
    """MobileBERT: Q/K read the bottleneck, V the hidden-wide input, the out-projection writes the
    bottleneck; its input bottlenecks run on every entering token, its stacked FFNs and output
    bottleneck on the kept ones (tests/conftest.py's sizes)."""
    _, adapter = tiny_model(family, layers=4)
    builders = {
        "topk": lambda: TopKPruner(4, keep_ratio=0.4, start_layer=1),
        "spatten": lambda: SpAttenPruner(4, final_ratio=0.2, start_layer=0),
        "random": lambda: RandomPruner(4, keep_ratio=0.5, start_layer=2),
    }
    engine = dict(engine)
    if "pruner" in engine:
        engine["pruner"] = builders[engine["pruner"]]()
    ids = torch.randint(5, 120, (1, 64))  # batch of one: real lengths = tensor lengths
    mask = torch.ones_like(ids)
    measured, trace = measured_encoder_flops(adapter, ids, mask, **engine)
    counted = 2 * float(encoder_macs(EncoderDims.of(adapter), trace).sum())
    assert counted == pytest.approx(measured, rel=0.02)
    if "pruner" in engine:
        assert counted < 2 * float(unpruned_macs(EncoderDims.of(adapter), mask.sum(dim=1)).sum())


@pytest.mark.parametrize("length", [128, 384])
def test_bert_base_closed_form(length):
    config = BertConfig()  # bert-base: 12 layers, d=768, 12 heads, d_ff=3072
    dims = EncoderDims(
        config.num_hidden_layers, config.num_attention_heads, config.hidden_size, 64, config.intermediate_size
    )
    d, n = 768, length
    per_layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * 4 * d  # QKV+out, logits+context, FFN
    macs = float(unpruned_macs(dims, torch.tensor([n]))[0])
    assert macs == 12 * per_layer
    # 11.17 GMACs at 128 tokens: the "11.2 GFLOPs" the pruning papers quote (they count MACs)
    assert macs / 1e9 == pytest.approx({128: 11.17, 384: 35.33}[length], abs=0.005)


def test_paper_convention_equals_counter_without_pruning():
    _, adapter = tiny_model("bert")
    ids = torch.randint(5, 120, (2, 40))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        trace = PrunableEncoder(adapter)(ids, mask).trace
    dims = EncoderDims.of(adapter)  # d_ff = 2d here, so compare on the attention + QKV share
    d = dims.hidden
    expected = adapter.num_layers * (2 * d * 40**2 + 4 * d * d * 40 + 8 * d * d * 40)
    assert float(paper_macs(dims, trace)[0]) == expected
