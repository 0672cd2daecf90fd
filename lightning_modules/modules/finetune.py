"""Baseline fine-tuning (`pruner=none`) and static pruning baselines (`topk`, `spatten`, `random`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from tokenprune.modules.base import TokenPruningModule


class FineTuneModule(TokenPruningModule):
    """Fine-tunes the backbone on the task loss.

    A static pruner is applied at every evaluation; with `train_pruned` it is applied during
    training too (PoWER-BERT style re-training with the retention configuration fixed).
    Seq2seq backbones train on the rank-classification logits (cross entropy over the answers).
    """

    seq2seq = True

    def __init__(
        self,
        backbone: Mapping[str, Any],
        task: Mapping[str, Any],
        pruner: Mapping[str, Any] | None,
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        compare_unpruned: bool = True,
        train_pruned: bool = False,
        init_from: str | None = None,
        lm_restore: bool = True,
    ) -> None:
        super().__init__(backbone, task, pruner, optimizer, scheduler, compare_unpruned, init_from, lm_restore)
        self.save_hyperparameters({"train_pruned": train_pruned})

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        logits, out = self(batch, pruner=self.pruner if self.hparams["train_pruned"] else None)
        loss = self.task_loss(logits, self.targets(batch, out))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss
