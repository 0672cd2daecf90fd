"""Lightning DDP on CPU: two processes over gloo, 32-bit, one writer of the run's outputs."""

from __future__ import annotations

import json
from pathlib import Path

from apps import FAST, compose_app, run_cli
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
    report = json.loads((run_dir / "results.json").read_text())["report"]
    assert 0.0 <= report["report/accuracy"] <= 1.0 and report["report/flops_ratio"] == 1.0


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
