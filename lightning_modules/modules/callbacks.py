"""Callbacks shared by the apps."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.fabric.utilities.seed import seed_everything


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
