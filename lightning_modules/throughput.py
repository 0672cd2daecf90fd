"""Throughput harness (DESIGN.md s.8): sequences/s after warm-up, median of interleaved repeats,
same batch for every variant, one process, fixed threads."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tokenprune.allocator import keep_freed_memory


def packed_batch(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int, length: int
) -> dict[str, Tensor]:
    """A (batch_size, length) batch of real text with no padding, each row framed as the tokenizer
    frames one text ([CLS] text... [SEP] for BERT, text... </s> for T5, the bare text for GPT-2).

    Texts are concatenated and cut into rows, so every position is a real token and FLOPs on
    real lengths equal FLOPs on tensor lengths.
    """
    prefix, suffix = special_frame(tokenizer)
    body = length - len(prefix) - len(suffix)
    needed = batch_size * body
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(stream) >= needed:
            break
    if not stream:
        raise ValueError("no text to build a benchmark batch from")
    while len(stream) < needed:
        stream = stream + stream
    rows = torch.tensor(stream[:needed]).view(batch_size, body)
    framed = [torch.tensor(part, dtype=rows.dtype).expand(batch_size, -1) for part in (prefix, suffix)]
    input_ids = torch.cat([framed[0], rows, framed[1]], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def special_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text's tokens."""
    text = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a")["input_ids"]
    start = next(i for i in range(len(framed) - len(text) + 1) if framed[i : i + len(text)] == text)
    return framed[:start], framed[start + len(text) :]


def device_name(device: torch.device) -> str:
    """What timings were measured on: the GPU's name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    return f"cpu:{model}:{torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


AUTOCAST = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # bench `precision` -> autocast dtype


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision as training would run it (`32`: off)."""
    dtype = AUTOCAST[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _peak_memory_mb(device: torch.device, run: Callable[[], object]) -> float:
    """Peak GPU memory allocated while `run` executes (NaN off GPU, without running it: CPU
    allocations have no per-call statistics)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats(device)
    run()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def measure(
    variants: Mapping[str, Callable[[], object]],
    batch_size: int,
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
    grad: bool = False,
) -> dict[str, dict[str, float]]:
    """Time each zero-argument call `variants[name]` (inference mode unless `grad`); repeats are
    interleaved across variants, forward and reversed in turn, so that machine noise and the
    previous call's leftovers hit all of them alike, and on a GPU each
    call is synchronised before the clock stops. Returns median seconds, sequences/s, the
    relative spread and the peak GPU memory of one call (MB; NaN on CPU). Every timing runs
    with freed memory kept for reuse (allocator.keep_freed_memory)."""
    keep_freed_memory()
    with torch.inference_mode(not grad):
        return _measure(variants, batch_size, device, warmup, repeats)


def _measure(
    variants: Mapping[str, Callable[[], object]], batch_size: int, device: torch.device, warmup: int, repeats: int
) -> dict[str, dict[str, float]]:
    for run in variants.values():
        for _ in range(warmup):
            run()
    _sync(device)
    peak = {name: _peak_memory_mb(device, run) for name, run in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(repeats):
        # odd rounds run the variants in reverse order, so that no variant always follows the same
        # one (what ran just before a call can change its time: caches, thread pools)
        for name in names if repeat % 2 == 0 else names[::-1]:
            run = variants[name]
            start = time.perf_counter()
            run()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "median_s": statistics.median(samples),
            "seq_per_s": batch_size / statistics.median(samples),
            "spread": (max(samples) - min(samples)) / statistics.median(samples),
            "peak_mem_mb": peak[name],
        }
        for name, samples in times.items()
    }


def measure_batches(
    variants: Mapping[str, Callable[[dict[str, Tensor]], object]],
    batches: Sequence[dict[str, Tensor]],
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, dict[str, float]]:
    """`measure` over several batches (e.g. a whole split), interleaved batch by batch: each
    batch's variants are timed back to back, so slow drift of a shared machine hits every variant
    alike. Per-batch medians add up to the split's time; spread is their time-weighted mean."""
    per_batch = [
        measure(
            {name: partial(run, batch) for name, run in variants.items()},
            len(batch["input_ids"]),
            device,
            warmup,
            repeats,
        )
        for batch in batches
    ]
    sequences = sum(len(batch["input_ids"]) for batch in batches)
    result = {}
    for name in variants:
        median = sum(timing[name]["median_s"] for timing in per_batch)
        spread = sum(timing[name]["spread"] * timing[name]["median_s"] for timing in per_batch) / median
        peak = max(timing[name]["peak_mem_mb"] for timing in per_batch)
        result[name] = {"median_s": median, "seq_per_s": sequences / median, "spread": spread, "peak_mem_mb": peak}
    return result
