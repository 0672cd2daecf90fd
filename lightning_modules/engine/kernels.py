"""Which CPU kernel computes the linear layers of an engine pass without autograd.

PyTorch's fp32 `F.linear` on CPU calls MKL's sgemm. oneDNN's inner product (the kernel PyTorch's
compiler gives frozen CPU linears, `torch.ops.mkldnn._linear_pointwise`) computes the same map
and measured 15-30% faster on this project's 2-core AMD EPYC machine for the engine's shapes,
most at the few rows per batch of late pruned layers, and 1.7x faster on another machine of the
same kind (README "Measured"; MKL is known to pick slower code paths on non-Intel CPUs). With
`cpu_linear=onednn` (the default where PyTorch has oneDNN) every fp32 linear of a CPU inference
pass's layers (the engine's projections and the HF modules a layer calls, GPT-2's Conv1D
included) and of the LM head runs on oneDNN;
training (autograd), fp16 autocast and GPUs keep `F.linear`. `aten` keeps `F.linear` everywhere.

Under bf16 autocast (`tokenprune-bench precision=bf16`) `F.linear` casts its fp32 weight to bf16
on every call, and oneDNN then reorders it: on the AMX cores of a 2-core Intel Xeon VM a bf16
linear at 64 rows took as long as the fp32 one, so a pruned layer's few rows gained nothing from
bf16. On CPUs with AVX-512 (`ONEDNN_BF16`) oneDNN computes those linears in bf16 from a weight
converted once (README "Measured"): the input is cast to bf16 and the output is bf16, as
autocast's linear gives, accumulated in fp32.

oneDNN computes from weights in its own blocked layout. Given a plain weight it reorders it on
every call, a cost that does not shrink with the rows: at the 64 rows of a late pruned layer it
was 10-15% of a MiniLM-sized linear, at 832 rows 2-5%. Each weight is therefore reordered once
per value (`_converted`) and the blocked copy reused until the weight changes.

The stock HF model that throughput is measured against gets the same kernel (`stock_linears`):
a speedup then measures what pruning saves, not which GEMM library each side called.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from transformers.pytorch_utils import Conv1D

from tokenprune.checks import check_choice

CPU_LINEAR_KERNELS = ("onednn", "aten")
ONEDNN_AVAILABLE = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
)
# oneDNN computes bf16 on CPUs with AVX-512 (AMX where present); elsewhere bf16 keeps F.linear
ONEDNN_BF16 = ONEDNN_AVAILABLE and torch.ops.mkldnn._is_mkldnn_bf16_supported()
_cpu_linear = "onednn" if ONEDNN_AVAILABLE else "aten"


def set_cpu_linear(kernel: str) -> None:
    """Choose the kernel of CPU inference linears for this process (`onednn` or `aten`)."""
    global _cpu_linear
    check_choice("cpu_linear", kernel, CPU_LINEAR_KERNELS)
    if kernel == "onednn" and not ONEDNN_AVAILABLE:
        raise ValueError("cpu_linear=onednn needs a PyTorch build with oneDNN (mkldnn); use cpu_linear=aten")
    _cpu_linear = kernel


def cpu_linear() -> str:
    """The kernel CPU inference linears use now."""
    return _cpu_linear


def _onednn_serves(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> bool:
    """fp32: fp32 CPU tensors only; bf16: fp32 or bf16 ones, cast to bf16 as autocast would, while
    autocast is on (an HF region that turns it off keeps F.linear)."""
    if dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu"):
        return False
    given = (torch.float32, torch.bfloat16) if dtype == torch.bfloat16 else (dtype,)
    tensors_fit = x.dtype in given and weight.dtype in given and (bias is None or bias.dtype in given)
    return tensors_fit and x.device.type == "cpu" and x.dim() >= 2 and weight.dim() == 2


def value_key(tensor: Tensor) -> tuple[Hashable, ...]:
    """What identifies the values of `tensor`: its data, view geometry and version counter (which
    in-place updates such as optimizer steps or checkpoint loads bump). Inference tensors have no
    version counter; they cannot be changed outside inference mode, and the engine's (the head
    slicer's cached weights) are never changed in place."""
    version = None if tensor.is_inference() else tensor._version
    return tensor.data_ptr(), tensor.shape, tensor.stride(), version


# (id(owner), dtype) -> (a weak reference to the owner, the key of the tensor's values, its copy for
# oneDNN); the owner is the tensor, or the tensor it views (GPT-2's out-projection is a fresh `.T` of
# its Conv1D weight on every pass, so a view's own identity would never hit)
_onednn_copies: dict[tuple[int, torch.dtype], tuple[weakref.ref[Tensor], tuple[Hashable, ...], Tensor]] = {}


def _converted(tensor: Tensor, dtype: torch.dtype, make: Callable[[Tensor], Tensor]) -> Tensor:
    """`make(tensor in dtype)`, made once per tensor value and dtype: the copy is kept while the
    tensor (or the tensor it views) lives and remade when its values change."""
    owner = tensor if tensor._base is None else tensor._base
    identity = id(owner), dtype
    key = value_key(tensor)
    hit = _onednn_copies.get(identity)
    if hit is not None and hit[0]() is owner and hit[1] == key:
        return hit[2]
    converted = make(tensor.to(dtype))
    forget = weakref.ref(owner, lambda _: _onednn_copies.pop(identity, None))
    _onednn_copies[identity] = (forget, key, converted)
    return converted


def _reordered(weight: Tensor) -> Tensor:
    """`weight` in oneDNN's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x @ weight.T + bias computed by oneDNN in `dtype`, from the weight (and bias) converted once."""
    blocked = _converted(weight, dtype, _reordered)
    bias = None if bias is None else bias if bias.dtype == dtype else _converted(bias, dtype, Tensor.contiguous)
    x = x if x.dtype == dtype else x.to(dtype)
    return torch.ops.mkldnn._linear_pointwise(x, blocked, bias, "none", [], "")


class _OneDnnLinear(TorchFunctionMode):
    """F.linear, and the `torch.addmm(bias, x, weight)` of GPT-2's Conv1D layers, -> oneDNN's inner
    product in `dtype` for the CPU tensors it serves; every other call unchanged. A mode sees every
    torch call made under it, so it is entered only around the HF modules a layer calls."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _onednn_serves(x, weight, bias, self.dtype):
                return _onednn_linear(x, weight, bias, self.dtype)
        elif func is torch.addmm and len(args) == 3 and not kwargs:  # bias + x @ weight, beta = alpha = 1
            bias, x, weight = args
            if bias.dim() == 1 and _onednn_serves(x, weight.T, bias, self.dtype):
                return _onednn_linear(x, weight.T, bias, self.dtype)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class PassKernels:
    """The linear kernel of one engine pass: `linear` for the engine's own projections,
    `modules()` as the context of the HF modules it calls (their nn.Linear layers). `onednn_dtype`:
    what oneDNN computes in (None: F.linear)."""

    onednn_dtype: torch.dtype | None

    @property
    def onednn(self) -> bool:
        return self.onednn_dtype is not None

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.onednn_dtype is not None and _onednn_serves(x, weight, bias, self.onednn_dtype):
            return _onednn_linear(x, weight, bias, self.onednn_dtype)
        return F.linear(x, weight, bias)

    def modules(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext() if self.onednn_dtype is None else _OneDnnLinear(self.onednn_dtype)


def pass_kernels(device: torch.device) -> PassKernels:
    """The kernels of one engine pass on `device`: oneDNN linears for a CPU pass that records no
    autograd graph (when `cpu_linear` is onednn), in fp32, or in bf16 under bf16 autocast where the
    CPU computes bf16 (ONEDNN_BF16); else (training, fp16 autocast, GPUs) F.linear."""
    if _cpu_linear != "onednn" or device.type != "cpu" or torch.is_grad_enabled():
        return PassKernels(None)
    if not torch.is_autocast_enabled("cpu"):
        return PassKernels(torch.float32)
    bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and ONEDNN_BF16
    return PassKernels(torch.bfloat16 if bf16 else None)


def _layer_on(kernels: PassKernels, layer: nn.Linear, x: Tensor) -> Tensor:
    return kernels.linear(x, layer.weight, layer.bias)


def _conv1d_linear(kernels: PassKernels, layer: Conv1D, x: Tensor) -> Tensor:
    """GPT-2's Conv1D (weight stored (in, out), computed with addmm) as the linear map it is."""
    return kernels.linear(x, layer.weight.T, layer.bias)


@contextlib.contextmanager
def stock_linears(model: nn.Module, kernels: PassKernels) -> Iterator[None]:
    """Inside, the nn.Linear and GPT-2 Conv1D layers of `model` compute with `kernels.linear` (the
    throughput reference: a stock HF model with the engine's GEMM kernel). Each layer's forward is
    swapped for the duration rather than a TorchFunctionMode entered, whose interception of every
    torch call (1-4% of a stock pass, measured) would slow the reference and flatter the engine."""
    if not kernels.onednn:
        yield
        return
    swaps: dict[type[nn.Module], Callable[[PassKernels, Any, Tensor], Tensor]] = {
        nn.Linear: _layer_on,
        Conv1D: _conv1d_linear,
    }
    layers = [module for module in model.modules() if type(module) in swaps]
    for layer in layers:
        layer.forward = functools.partial(swaps[type(layer)], kernels, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
