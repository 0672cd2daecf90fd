"""MobileBERT on the engine: equal to transformers' MobileBertForSequenceClassification in each
bottleneck variant, really shortened by pruning, head subsets, a clear refusal, a training run."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from apps import FAST, compose_app, report_lengths, topk_flops_ratio
from conftest import random_batch, tiny_model
from transformers import MobileBertConfig, MobileBertModel, PreTrainedModel
from transformers.models.mobilebert.modeling_mobilebert import NoNorm

from tokenprune.apps.train import train
from tokenprune.engine import MobileBertAdapter, PrunableEncoder
from tokenprune.engine.flops import EncoderDims, unpruned_macs
from tokenprune.modules.loading import load_module
from tokenprune.pruners.static import RandomPruner, TopKPruner

# tiny_model's MobileBERT (hidden 32, 16-wide bottleneck, Q/K from the shared bottleneck, 2 FFNs) and variants.
VARIANTS = {
    "shared_qk_bottleneck": {},
    "qk_from_input": {"key_query_shared_bottleneck": False, "intra_bottleneck_size": 32},
    "bottleneck_attention": {"use_bottleneck_attention": True},
    "no_bottleneck": {"use_bottleneck": False},
    "layer_norm_one_ffn": {"normalization_type": "layer_norm", "num_feedforward_networks": 1},
}


def tiny_mobilebert(attn: str = "sdpa", **overrides) -> tuple[PreTrainedModel, MobileBertAdapter]:
    """tiny_model's MobileBERT with random norm weights and biases (NoNorm starts as the identity,
    which would hide a norm applied in the wrong place)."""
    model, adapter = tiny_model("mobilebert", attn, **overrides)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NoNorm | torch.nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    assert isinstance(adapter, MobileBertAdapter)
    return model, adapter


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_unpruned_logits_equal_stock_hf(variant, attn):
    model, adapter = tiny_mobilebert(attn, **VARIANTS[variant])
    ids, mask = random_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = adapter.classify(PrunableEncoder(adapter)(ids, mask).hidden)
    assert expected.abs().mean() > 0.01, "activations too small for the tolerance to mean anything"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pruner_cls", [TopKPruner, RandomPruner])
@pytest.mark.parametrize("variant", ["shared_qk_bottleneck", "bottleneck_attention", "no_bottleneck"])
def test_pruned_rows_equal_stock_layers_on_the_kept_tokens(variant, pruner_cls):
    """Layer 1 keeps half the tokens (its residual, input bottleneck and output-bottleneck input
    rows sliced to them; with or without scores), layer 2 sees only those: equal to the stock
    layers run on every token, then on the kept ones."""
    model, adapter = tiny_mobilebert(**VARIANTS[variant])
    ids, mask = random_batch(batch=3, length=20)
    pruner = pruner_cls(adapter.num_layers, keep_ratio=0.5, start_layer=1)
    layers = model.mobilebert.encoder.layer
    with torch.no_grad():
        out = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
        embedded = model.mobilebert.embeddings(input_ids=ids)  # trigram inputs see the padded row, as HF's
        for row in range(3):
            real = int(mask[row].sum())
            kept = out.positions[row][out.mask[row]]
            assert kept.numel() == math.ceil(real / 2) and kept[0] == 0
            expected = layers[2](layers[1](layers[0](embedded[row : row + 1, :real]))[:, kept])
            torch.testing.assert_close(out.hidden[row : row + 1, : kept.numel()], expected, atol=1e-5, rtol=0)
    assert out.hidden.shape[1] == math.ceil(int(mask.sum(dim=1).max()) / 2) < ids.shape[1]
    assert [t.n_out.tolist() for t in out.trace][1] == [math.ceil(int(n) / 2) for n in mask.sum(dim=1)]


@pytest.mark.parametrize("variant", ["shared_qk_bottleneck", "no_bottleneck"])
def test_head_subset_equals_zeroing_the_other_heads(variant):
    model, adapter = tiny_mobilebert(**VARIANTS[variant])
    ids, mask = random_batch()
    heads = [torch.tensor([0, 2]), None, torch.tensor([3])]
    with torch.no_grad():
        got = adapter.classify(PrunableEncoder(adapter)(ids, mask, heads=heads).hidden)
        for index, keep in enumerate(heads):
            if keep is None:
                continue
            dense = model.mobilebert.encoder.layer[index].attention.output.dense
            dropped = [h for h in range(adapter.num_heads) if h not in keep.tolist()]
            dense.weight.view(dense.weight.shape[0], -1, adapter.head_dim)[:, dropped] = 0
        expected = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_input_width_qkv_with_a_narrower_bottleneck_is_refused():
    """Q/K/V read the hidden-wide input but are bottleneck-wide: transformers fails on it too."""
    with pytest.raises(ValueError, match="key_query_shared_bottleneck=False.*intra_bottleneck_size=16"):
        tiny_model("mobilebert", key_query_shared_bottleneck=False)


def test_mobilebert_uncased_closed_form():
    """google/mobilebert-uncased (MobileBertConfig's defaults): 24 layers, hidden 512, bottleneck
    128, 4 heads, Q/K from the shared bottleneck, V from the 512-wide input, 4 FFNs of width 512."""
    model = MobileBertModel(MobileBertConfig(num_hidden_layers=1))  # the sizes of one layer suffice
    dims = replace(EncoderDims.of(MobileBertAdapter(model)), num_layers=24)
    n = 128
    bottlenecks = 2 * n * 512 * 128  # input + shared Q/K bottleneck linears
    attention = n * (128 + 128 + 512) * 128 + 2 * n * n * 128 + n * 128 * 128  # Q, K, V; logits, context; out
    feed_forward = 4 * 2 * n * 128 * 512 + n * 128 * 512  # 4 FFNs, output bottleneck
    assert float(unpruned_macs(dims, torch.tensor([n]))[0]) == 24 * (bottlenecks + attention + feed_forward)


def test_train_app_runs_on_tiny_mobilebert_with_topk(tmp_path):
    overrides = [*FAST, "backbone=tiny_mobilebert", "pruner=topk", "pruner.keep_ratio=0.5", "pruner.start_layer=1"]
    results = train(compose_app("train", overrides, tmp_path / "run"))
    report = results["report"]
    assert 0.0 <= report["report/accuracy"] <= 1.0
    module = load_module(results["best_checkpoint"])
    expected = topk_flops_ratio(module.dims, report_lengths(results), keep_ratio=0.5, start_layer=1)
    assert report["report/flops_ratio"] == pytest.approx(expected, rel=1e-6) and expected < 0.8
    assert report["report/kept_fraction/layer_1"] == pytest.approx(0.5, abs=0.05)
    assert isinstance(module.adapter, MobileBertAdapter)
    assert "mobilebert.encoder.layer.0.bottleneck.attention.dense.weight" in module.model.state_dict()
