"""Lightning DDP on CPU: two processes over gloo, 32-bit, one writer of the run's outputs."""

from __future__ import annotations

import json

from apps import FAST, run_cli
from omegaconf import OmegaConf


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
