"""Callbacks shared by the apps."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader

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


class IntervalCheckpoint(ModelCheckpoint):
    """Write the checkpoint every `minutes` of training, in the middle of an epoch too, so that a
    killed or preempted run loses at most that much work rather than up to a whole epoch.

    With the training loader's position in it (`data.sampler.ResumableLoader`), a resume continues
    exactly where the checkpoint was taken. Saves wait for a batch that ends an optimizer step (a
    gradient being accumulated is in no checkpoint) and is not followed by a validation (a run
    resumed from such a save would skip that validation) or the epoch's end (the `last` checkpoint
    is written there). The interval is wall time, validation included. `minutes=0` saves after
    every such batch; `~checkpoints.interval` turns the saves off. Other arguments: Lightning's
    `ModelCheckpoint`.
    """

    def __init__(self, minutes: float, **kwargs: Any) -> None:  # >= 0: checked with the settings (apps/settings.py)
        super().__init__(train_time_interval=timedelta(minutes=minutes), **kwargs)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        epoch_loop, fetcher = trainer.fit_loop.epoch_loop, trainer.fit_loop._data_fetcher
        assert fetcher is not None
        mid_accumulation = (batch_idx + 1) % trainer.accumulate_grad_batches != 0
        if mid_accumulation or epoch_loop.batch_progress.is_last_batch or epoch_loop._should_check_val_fx(fetcher):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class LoaderPosition(L.Callback):
    """Hand the training loaders their position from the checkpoint a run resumes from.

    Lightning stores a stateful loader's `state_dict()` in every checkpoint, but when
    `configure_optimizers` reads `trainer.estimated_stepping_batches` (ours do: the schedule's
    length) it sets the loaders up before the checkpoint is restored and never gives the state
    back (Lightning issue #20550), so a mid-epoch resume would start its epoch over. This gives
    it back before the first batch is drawn (a no-op where Lightning already did).
    """

    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self.states = list(fit_loop.get("state_dict", {}).get("combined_loader", []))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states, self.states = self.states, []
        if not states or trainer.train_dataloader is None:
            return
        loaders = CombinedLoader(trainer.train_dataloader).flattened
        stateful = [loader for loader in loaders if hasattr(loader, "load_state_dict")]
        for loader, state in zip(stateful, states, strict=True):
            loader.load_state_dict(state)


class ProgressLog(L.Callback):
    """Training progress as log lines every `every` steps and after each validation: what a log
    redirected to a file (SLURM jobs, nohup) shows, where a terminal progress bar writes nothing."""

    def __init__(self, every: int = 50) -> None:
        if every < 1:
            raise ValueError(f"progress every={every} must be >= 1")
        self.every = every
        self.started = time.monotonic()
        self.first_batch: int | None = None  # this process's first batch of the epoch (> 0 after a resume)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_batch = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.first_batch is None:
            self.first_batch, self.started = batch_idx, time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done, total = batch_idx + 1, trainer.num_training_batches
        if done % self.every and done != total:
            return
        loss = trainer.callback_metrics.get("train/loss")
        seconds = (time.monotonic() - self.started) / (done - (self.first_batch or 0))
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
