"""The CPU inference linear kernel (engine/kernels.py): same map as F.linear, used only where it may be."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch, tiny_model
from test_causal_lm import acc_module, lm_batch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from tokenprune.engine import PrunableEncoder
from tokenprune.engine import kernels as kernels_module
from tokenprune.engine.kernels import (
    ONEDNN_AVAILABLE,
    ONEDNN_BF16,
    _onednn_copies,
    cpu_linear,
    pass_kernels,
    set_cpu_linear,
    stock_linears,
)
from tokenprune.pruners.static import TopKPruner

needs_onednn = pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="this PyTorch build has no oneDNN")
needs_onednn_bf16 = pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN computes no bf16 on this CPU (no AVX-512)")


@pytest.fixture
def kernel():
    """Restore the process's kernel choice after a test changes it."""
    before = cpu_linear()
    yield set_cpu_linear
    set_cpu_linear(before)


def linear_ops(run) -> set[str]:
    """Names of the linear kernels `run` executes."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {event.key for event in prof.key_averages() if event.key in ("aten::addmm", "mkldnn::_linear_pointwise")}


@needs_onednn
@pytest.mark.parametrize("rows", [(1, 7), (3, 5, 7)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_linear_equals_f_linear_on_sliced_weights(kernel, rows, with_bias):
    kernel("onednn")
    x = torch.randn(*rows[:-1], 48)
    weight = torch.randn(12, 4, 48)[torch.tensor([0, 2, 3])].flatten(0, 1)  # head rows, as the engine slices them
    columns = torch.randn(48, 12)[:, 2:10]  # a strided column slice
    bias = torch.randn(12) if with_bias else None
    with torch.no_grad():
        expected = F.linear(x, weight, bias), F.linear(x[..., :8], columns)
        kernels = pass_kernels(torch.device("cpu"))
        got = kernels.linear(x, weight, bias), kernels.linear(x[..., :8], columns)
        assert linear_ops(lambda: kernels.linear(x, weight, bias)) == {"mkldnn::_linear_pointwise"}
        with kernels.modules():  # the HF modules' nn.Linear layers, whichever way they pass arguments
            assert linear_ops(lambda: F.linear(x, weight, bias)) == {"mkldnn::_linear_pointwise"}
            by_name = F.linear(input=x, weight=weight, bias=bias)
        torch.testing.assert_close(by_name, expected[0], atol=1e-5, rtol=1e-5)
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference, atol=1e-5, rtol=1e-5)


def onednn_dtypes(monkeypatch) -> set[torch.dtype]:
    """The dtypes of the outputs of the oneDNN linears computed from now on."""
    seen: set[torch.dtype] = set()
    real = kernels_module._onednn_linear
    monkeypatch.setattr(kernels_module, "_onednn_linear", lambda *args: seen.add((out := real(*args)).dtype) or out)
    return seen


def reorders(run) -> int:
    """How many times `run` reorders a weight into oneDNN's blocked layout."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(event.count for event in prof.key_averages() if event.key == "mkldnn::_reorder_linear_weight")


@needs_onednn
def test_a_weight_is_reordered_once_per_value_and_forgotten_with_it(kernel):
    kernel("onednn")
    weight, x = torch.randn(8, 6), torch.randn(5, 6)
    with torch.no_grad():
        linear = pass_kernels(x.device).linear
        assert reorders(partial(linear, x, weight)) == 1
        assert reorders(lambda: [linear(x, weight) for _ in range(3)]) == 0
        weight.mul_(2)  # an in-place update (an optimizer step, a checkpoint load): new values
        assert reorders(partial(linear, x, weight)) == 1
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # inference tensors (the head slicer's cached weights) have no version counter
        sliced = weight[:, :4].contiguous()
        assert reorders(lambda: [linear(x[:, :4], sliced) for _ in range(2)]) == 1
        freed = torch.randn(8, 6)
        linear(x, freed)
    identity = id(freed), torch.float32
    assert identity in _onednn_copies
    del freed  # its blocked copy goes with it
    assert identity not in _onednn_copies
    conv1d = torch.randn(6, 8)  # GPT-2's Conv1D weight (in, out): the engine passes a fresh `.T` each pass
    with torch.no_grad():
        assert reorders(lambda: [linear(x, conv1d.T) for _ in range(3)]) == 1
        torch.testing.assert_close(linear(x, conv1d.T), x @ conv1d, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_engine_inference_runs_onednn_and_matches_aten(kernel):
    model, adapter = tiny_model("bert")
    encoder = PrunableEncoder(adapter)
    ids, mask = random_batch(batch=3, length=20)
    pruner = TopKPruner(adapter.num_layers, keep_ratio=0.5, start_layer=1)
    results, ops = {}, {}
    with torch.inference_mode():
        for name in ("onednn", "aten"):
            kernel(name)
            results[name] = encoder(ids, mask, pruner=pruner).hidden
            ops[name] = linear_ops(lambda: encoder(ids, mask, pruner=pruner))
    assert ops == {"onednn": {"mkldnn::_linear_pointwise"}, "aten": {"aten::addmm"}}
    torch.testing.assert_close(results["onednn"], results["aten"], atol=1e-5, rtol=1e-5)


@needs_onednn
def test_training_and_fp16_autocast_keep_f_linear(kernel):
    kernel("onednn")
    _, adapter = tiny_model("bert")
    encoder = PrunableEncoder(adapter)
    ids, mask = random_batch(batch=2, length=12)
    assert linear_ops(lambda: encoder(ids, mask).hidden.sum().backward()) == {"aten::addmm"}
    assert all(p.grad is not None for p in adapter.model.base_model.encoder.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert "mkldnn::_linear_pointwise" not in linear_ops(lambda: encoder(ids, mask))


@needs_onednn_bf16
def test_bf16_autocast_linear_runs_onednn_from_a_weight_converted_once(kernel):
    """Under bf16 autocast, oneDNN computes in bf16 from the weight and bias converted once per
    value (not cast on every call), with autocast's result; where autocast is turned off inside the
    pass, F.linear in fp32; the fp32 copy of the same weight is kept beside the bf16 one."""
    kernel("onednn")
    weight, bias, x = torch.randn(16, 24), torch.randn(16), torch.randn(2, 5, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(x, weight, bias)
        linear = pass_kernels(x.device).linear
        assert reorders(partial(linear, x, weight, bias)) == 1
        assert reorders(lambda: [linear(x, weight, bias) for _ in range(3)]) == 0
        assert linear_ops(partial(linear, x.bfloat16(), weight, bias)) == {"mkldnn::_linear_pointwise"}
        got = linear(x, weight, bias)
        weight.mul_(-1)  # new values: converted again
        assert reorders(partial(linear, x, weight, bias)) == 1
        torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), atol=2e-2, rtol=2e-2)
        with torch.autocast("cpu", enabled=False):  # as an HF region that computes in fp32 does
            assert linear_ops(partial(linear, x, weight, bias)) == {"aten::addmm"}
            assert linear(x, weight, bias).dtype == torch.float32
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        pass_kernels(x.device).linear(x, weight)
    assert {(id(weight), torch.bfloat16), (id(weight), torch.float32), (id(bias), torch.bfloat16)} <= set(
        _onednn_copies
    )


@needs_onednn_bf16
def test_engine_and_stock_reference_under_bf16_autocast_run_onednn_as_autocast_would(kernel, monkeypatch):
    """A bf16-autocast inference pass (`tokenprune-bench precision=bf16`): the engine's and the
    stock reference's linears all run on oneDNN in bf16, with the logits of plain autocast."""
    computed = onednn_dtypes(monkeypatch)
    model, adapter = tiny_model("bert")
    model.eval()
    encoder = PrunableEncoder(adapter)
    ids, mask = random_batch(batch=3, length=20)
    pruner = TopKPruner(adapter.num_layers, keep_ratio=0.5, start_layer=1)
    hidden, ops = {}, {}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids, attention_mask=mask).logits
        for name in ("onednn", "aten"):
            kernel(name)
            hidden[name] = encoder(ids, mask, pruner=pruner).hidden
            ops[name] = linear_ops(lambda: encoder(ids, mask, pruner=pruner))
        kernel("onednn")
        with stock_linears(model, pass_kernels(ids.device)):
            stock = model(input_ids=ids, attention_mask=mask).logits
            ops["stock"] = linear_ops(lambda: model(input_ids=ids, attention_mask=mask))
    assert ops == {"onednn": {"mkldnn::_linear_pointwise"}, "aten": {"aten::addmm"}, "stock": ops["onednn"]}
    assert computed == {torch.bfloat16}
    torch.testing.assert_close(hidden["onednn"], hidden["aten"], atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(stock, expected, atol=5e-2, rtol=5e-2)


@needs_onednn
def test_stock_reference_runs_the_same_kernel_and_is_restored(kernel):
    """The throughput reference (stock HF) computes its linears with the engine's kernel while
    inside stock_linears, with the same logits, and is the plain model again afterwards."""
    kernel("onednn")
    model, _ = tiny_model("bert")
    model.eval()
    ids, mask = random_batch(batch=3, length=20)
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask).logits
        with stock_linears(model, pass_kernels(ids.device)):
            got = model(input_ids=ids, attention_mask=mask).logits
            ops = linear_ops(lambda: model(input_ids=ids, attention_mask=mask))
        with pytest.raises(RuntimeError), stock_linears(model, pass_kernels(ids.device)):
            raise RuntimeError("a failing timed call")
        after = linear_ops(lambda: model(input_ids=ids, attention_mask=mask))
    assert ops == {"mkldnn::_linear_pointwise"} and after == {"aten::addmm"}
    assert not any("forward" in vars(module) for module in model.modules())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_gpt2_reference_and_engine_run_every_linear_map_on_the_same_kernel(kernel, tmp_path, monkeypatch, dtype):
    """GPT-2's Conv1D layers (addmm) and its LM head: the stock reference and the engine pass both
    compute every linear map on oneDNN (in bf16 under bf16 autocast), and the reference builds no
    KV cache (engine passes keep none), with the plain HF model's logits."""
    if dtype == torch.bfloat16 and not ONEDNN_BF16:
        pytest.skip("oneDNN computes no bf16 on this CPU (no AVX-512)")
    kernel("onednn")
    module, batch = acc_module(tmp_path, restore=True), lm_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    computed = onednn_dtypes(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        expected = module.model(**inputs).logits  # plain HF: Conv1D addmm, the head on F.linear
        caches = []
        monkeypatch.setattr(DynamicCache, "__init__", lambda self, *a, **k: caches.append(1) or None)
        assert linear_ops(lambda: module.stock_logits(batch)) == {"mkldnn::_linear_pointwise"}
        assert linear_ops(lambda: module(batch)) == {"mkldnn::_linear_pointwise"}
        assert not caches
        torch.testing.assert_close(module.stock_logits(batch), expected, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(module(batch)[0], expected, atol=tolerance, rtol=tolerance)
    assert computed == {dtype}
    assert not any("forward" in vars(layer) for layer in module.model.modules())


def test_unknown_kernel_is_refused_naming_the_setting(kernel):
    with pytest.raises(ValueError, match=r"cpu_linear=mkl is not one of: onednn, aten"):
        kernel("mkl")
