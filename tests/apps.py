"""Helpers for tests that compose the real Hydra configs in-process or run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import tokenprune.apps.search as search_app

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
