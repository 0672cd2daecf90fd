"""Helpers for tests that compose the real Hydra configs in-process or run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import tokenprune.apps.search as search_app
import tokenprune.search.latency as latency
from tokenprune.engine.flops import EncoderDims, layer_macs
from tokenprune.modules.loading import load_module
from tokenprune.search.evaluate import datamodule_for

# Small and fast: tiny random-weight backbone on the offline default task, few batches.
FAST = [
    "backbone=tiny",
    "logger=csv",
    "data.batch_size=16",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


def compose_app(config: str, overrides: list[str], output_dir: Path, root: Path | None = None) -> DictConfig:
    """Compose `conf/<config>.yaml` as the CLI would, writing into `output_dir` (paths.root: `root`,
    by default the folder above it)."""
    root = output_dir.parent if root is None else root
    with initialize_config_module(version_base="1.3", config_module="tokenprune.conf"):
        cfg = compose(config, overrides=[*overrides, f"paths.root={root}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]  # as in a real run: the app sees the hydra node only through HydraConfig
    return cfg


def run_cli(app: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m <app>` (e.g. tokenprune.apps.train) offline, as a user would."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", app, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def record_search_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make tokenprune-search append each real evaluation's description ("<split> <candidate>")
    to the returned list, so tests can see which candidates were scored rather than cached."""
    scored: list[str] = []
    real = search_app.evaluate

    def recording(*args, **kwargs):
        scored.append(kwargs["desc"])
        return real(*args, **kwargs)

    monkeypatch.setattr(search_app, "evaluate", recording)
    return scored


def searched(scored: list[str]) -> list[str]:
    """The val-split entries of `record_search_evaluations`'s list."""
    return [desc for desc in scored if desc.startswith("val ")]


def report_lengths(run: dict) -> list[int]:
    """Real lengths of the report-split examples a finished tokenprune-train run reported on:
    its first trainer.limit_test_batches batches of data.eval_batch_size (the split is sorted
    longest first), tokenized as its checkpoint's task and tokenizer say."""
    settings = OmegaConf.load(Path(run["run_dir"]) / ".hydra" / "config.yaml")
    data = datamodule_for(load_module(run["last_checkpoint"]), int(settings.data.eval_batch_size))
    return data.split_lengths("report")[: int(settings.trainer.limit_test_batches) * int(settings.data.eval_batch_size)]


def topk_flops_ratio(dims: EncoderDims, lengths: list[int], keep_ratio: float, start_layer: int) -> float:
    """Relative FLOPs of top-k at a constant `keep_ratio` from `start_layer` on over inputs of
    `lengths` real tokens, from the pruner's rule (keep ceil(keep_ratio * n)) and the counter's
    per-layer formula (engine/flops.py), not from an engine trace: earlier layers run whole; layer
    start_layer computes every token's attention, scores it and keeps k; later layers run on k."""
    n = torch.tensor(lengths, dtype=torch.float64)
    assert (n >= 2).all(), "every example loses tokens (a batch of 1-token rows would not score)"
    k = torch.ceil(n * keep_ratio)
    heads = dims.num_heads
    total = torch.zeros_like(n)
    for layer in range(dims.num_layers):
        if layer < start_layer:
            total += layer_macs(dims, n, n, n, heads)
        elif layer == start_layer:
            total += layer_macs(dims, n, n, k, heads, scored=True)
        else:
            total += layer_macs(dims, k, k, k, heads)
    return float(total.sum() / (dims.num_layers * layer_macs(dims, n, n, n, heads)).sum())


def record_speedup_timings(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, dict[str, float]]]:
    """Make the searches' speedup measurements (search/latency.measured_speedups) append the
    timings they measured (variant -> median_s, ...) to the returned list, one entry per call."""
    timed: list[dict[str, dict[str, float]]] = []
    real = latency.measure_batches

    def recording(*args, **kwargs):
        timed.append(real(*args, **kwargs))
        return timed[-1]

    monkeypatch.setattr(latency, "measure_batches", recording)
    return timed


@torch.inference_mode()
def stock_report_scores(checkpoint: str | Path, batches: int | None = None, batch_size: int = 128) -> dict[str, float]:
    """Accuracy and mean cross entropy of the stock HF model in `checkpoint` (no engine, no
    pruning) on the report split in batches of `batch_size` as evaluation serves it, the first
    `batches` of them (None: all)."""
    module = load_module(checkpoint).eval()
    correct = total = 0
    loss = 0.0
    for index, batch in enumerate(datamodule_for(module, batch_size).test_dataloader()):
        if index == batches:
            break
        labels = batch.pop("labels")
        logits = module.model(**batch).logits
        correct += int((logits.argmax(dim=-1) == labels).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        total += len(labels)
    return {"accuracy": correct / total, "loss": loss / total}
