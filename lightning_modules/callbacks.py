"""Callbacks shared by the apps."""
from __future__ import annotations

import lightning as L
from lightning.fabric.utilities.seed import seed_everything


class EpochSeed(L.Callback):
    """Reseed every RNG at the start of each training epoch from (seed, epoch).

    Shuffling and dropout of epoch e then depend only on the seed and e, so a run resumed from
    an end-of-epoch checkpoint continues exactly as the uninterrupted run would have.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed_everything(self.seed * 1000 + trainer.current_epoch, workers=True, verbose=False)
