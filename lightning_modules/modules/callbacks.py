"""Callbacks shared by the apps."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from lightning.fabric.utilities.seed import seed_everything

log = logging.getLogger(__name__)


class StepSeed(L.Callback):
    """Reseed every RNG before each training step from (seed, global step).

    Dropout, LengthDrop/LayerDrop sampling and any other randomness of step t then depend only
    on the seed and t, whatever else consumed random numbers before (data loader start-up,
    validation), so a resumed run continues exactly as the uninterrupted run would have.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        seed_everything((self.seed * 1_000_003 + trainer.global_step) % 2**32, verbose=False)


class RunSettings(L.Callback):
    """Store the run's resolved settings (flat `name -> value`, plain data) in every checkpoint,
    so that a resume can compare them with the settings it is asked to continue with."""

    KEY = "tokenprune_settings"

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.KEY] = self.settings


class CheckpointRecord(L.Callback):
    """Store a plain-data `record` under `key` in every checkpoint (e.g. the W&B run that trained it)."""

    def __init__(self, key: str, record: dict[str, Any]) -> None:
        self.key = key
        self.record = record

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.key] = self.record


class ProgressLog(L.Callback):
    """Training progress as log lines every `every` steps and after each validation: what a log
    redirected to a file (SLURM jobs, nohup) shows, where a terminal progress bar writes nothing."""

    def __init__(self, every: int = 50) -> None:
        if every < 1:
            raise ValueError(f"progress every={every} must be >= 1")
        self.every = every
        self.started = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done, total = batch_idx + 1, trainer.num_training_batches
        if done % self.every and done != total:
            return
        loss = trainer.callback_metrics.get("train/loss")
        seconds = (time.monotonic() - self.started) / done
        log.info(
            "epoch %d step %d/%s (global step %d): train/loss %s, %.2f s/step",
            trainer.current_epoch,
            done,
            total,
            trainer.global_step,
            f"{float(loss):.4f}" if loss is not None else "n/a",
            seconds,
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and "/layer_" not in k and v.numel() == 1
        }
        log.info("epoch %d validation: %s", trainer.current_epoch, ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
