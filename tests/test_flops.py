"""The analytic counter against torch's FlopCounterMode and against the closed form."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import random_batch, tiny_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, PreTrainedModel

from tokenprune.engine import BertFamilyAdapter, PrunableEncoder
from tokenprune.engine.flops import EncoderDims, encoder_macs, paper_macs, unpruned_macs
from tokenprune.modules.metrics import PruningStats
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
    assert counted == pytest.approx(measured, rel=1e-9)  # the score vector included: torch counts its matmul too
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


def bert_with_4d_ffn() -> tuple[PreTrainedModel, BertFamilyAdapter]:
    """A random-weight 3-layer BERT (hidden 32, 4 heads) whose FFN is 4d wide, as the papers'
    convention assumes; eager attention, whose matmuls FlopCounterMode counts."""
    config = AutoConfig.for_model(
        "bert",
        vocab_size=120,
        max_position_embeddings=80,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()
    return model, BertFamilyAdapter(model)


def counted_macs(run) -> float:
    """Multiply-accumulates torch counts while `run()` executes (FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops() / 2


HEADS = [torch.tensor([0, 2]), None, torch.tensor([1])]


@pytest.mark.parametrize("heads", [None, HEADS], ids=["all-heads", "heads-removed"])
def test_paper_convention_is_what_a_bert_layer_with_a_4d_ffn_computes(heads):
    """Without token pruning the papers' 2*d*n^2 + 12*d^2*n per layer (attention terms times h/H)
    is torch's count of the stock encoder (all heads) or of the engine with heads sliced."""
    model, adapter = bert_with_4d_ffn()
    ids = torch.randint(5, 120, (1, 40))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        trace = PrunableEncoder(adapter)(ids, mask, heads=heads).trace
        hidden = model.bert.embeddings(input_ids=ids)
        stock = counted_macs(lambda: model.bert.encoder(hidden))
    if heads is None:
        expected = stock
    else:
        expected, _ = measured_encoder_flops(adapter, ids, mask, heads=heads)
        expected /= 2
        assert expected < stock
    assert float(paper_macs(EncoderDims.of(adapter), trace)[0]) == expected


def test_paper_flops_ratio_and_gflops_count_attention_on_entering_and_ffn_on_kept_tokens():
    """PruningStats' paper_* figures (PoWER-BERT/LTP): a layer's attention block (Q, K, V,
    logits, context, out-projection) on the tokens entering it, its FFN on those it keeps; the
    unpruned model as the stock layers on every token. The reference counts the stock layer's
    modules with torch, per example, at the lengths the pruner's rule gives."""
    model, adapter = bert_with_4d_ffn()
    ids, mask = random_batch(batch=3, length=24)  # 24, 19 and 14 real tokens
    ratios = [1.0, 0.5, 0.25]
    with torch.no_grad():
        out = PrunableEncoder(adapter)(ids, mask, pruner=TopKPruner(3, layer_keep_ratios=ratios))
    lengths = mask.sum(dim=1)
    stats = PruningStats(EncoderDims.of(adapter))
    stats.update(out.trace, lengths)
    result = stats.compute()

    layer = model.bert.encoder.layer[0]  # every layer has these shapes

    def attention(n: int) -> float:
        return counted_macs(lambda: layer.attention(torch.zeros(1, n, 32)))

    def ffn(n: int) -> float:
        x = torch.zeros(1, n, 32)
        return counted_macs(lambda: layer.output(layer.intermediate(x), x))

    pruned = full = 0.0
    with torch.no_grad():
        for row, n in enumerate(lengths.tolist()):
            kept = [n, *(math.ceil(n * ratio) for ratio in ratios)]  # entering layer 0, leaving each layer
            assert [int(t.n_out[row]) for t in out.trace] == kept[1:]
            pruned += sum(attention(kept[i]) + ffn(kept[i + 1]) for i in range(3))
            full += 3 * (attention(n) + ffn(n))
    assert float(result["paper_flops_ratio"]) == pytest.approx(pruned / full, rel=1e-12)
    assert float(result["paper_gflops"]) == pytest.approx(2 * pruned / 3 / 1e9, rel=1e-12)
    assert float(result["paper_flops_ratio"]) < 0.7
    # the convention assumes d_ff = 4d whatever the model's: a 2d-wide FFN changes the counter's
    # figures, not the paper's
    narrow = PruningStats(replace(EncoderDims.of(adapter), ffn=64))
    narrow.update(out.trace, lengths)
    narrow_result = narrow.compute()
    assert narrow_result["flops_ratio"] != result["flops_ratio"]
    for name in ("paper_flops_ratio", "paper_gflops"):
        assert float(narrow_result[name]) == pytest.approx(float(result[name]), rel=1e-12)
