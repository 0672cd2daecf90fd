"""Lightning DDP on CPU: two processes over gloo, 32-bit, one writer of the run's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from apps import FAST, compose_app, run_cli, stock_report_scores
from omegaconf import OmegaConf

from tokenprune.apps.train import train


def test_ddp_on_two_cpu_processes_writes_once_in_32_bit(tmp_path):
    args = [*FAST, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "threads=1", f"paths.root={tmp_path}"]
    done = run_cli("tokenprune.apps.train", args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = tmp_path.glob("train/*/*")
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert config.trainer.precision == "32-true" and config.trainer.strategy == "ddp"
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in done.stderr + done.stdout  # two processes ran
    assert (done.stdout + done.stderr).count("report split:") == 1  # rank 1 neither summarizes nor writes
    assert "sync_dist" not in done.stderr  # epoch metrics are logged as synced
    results = json.loads((run_dir / "results.json").read_text())
    report = results["report"]
    assert report["report/flops_ratio"] == 1.0
    # as one process evaluates the same weights: the stock model on the first limit_test_batches (2)
    # report batches (every rank evaluates all of them: no distributed sampler; the ranks' metric
    # states are summed, so the accuracy is theirs)
    assert results["reported_on"] == "last" and config.trainer.limit_test_batches == 2
    expected = stock_report_scores(results["last_checkpoint"], 2, config.data.eval_batch_size)["accuracy"]
    assert report["report/accuracy"] == pytest.approx(expected, abs=1e-6)


def test_acc_profile_under_ddp_is_measured_once_over_the_whole_split(tmp_path):
    """The first process profiles every training batch, not its DDP share, and writes the one
    profile file; it equals the single-process profile of the same start."""
    finetuned = train(compose_app("train", FAST, tmp_path / "finetune"))["last_checkpoint"]
    profile = Path(f"{finetuned}.acc-profile.json")
    acc = ["pruner=acc", "module=acc", f"module.init_from={finetuned}", "module.profile_batches=6"]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "threads=1"]
    done = run_cli("tokenprune.apps.train", [*FAST, *acc, *ddp, f"paths.root={tmp_path / 'ddp'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    under_ddp = json.loads(profile.read_text())["acc"]
    profile.unlink()
    train(compose_app("train", [*FAST, *acc], tmp_path / "single"))
    assert json.loads(profile.read_text())["acc"] == under_ddp
