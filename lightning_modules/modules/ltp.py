"""Learned Token Pruning as a LightningModule (Kim et al., KDD 2022).

Stage `finetune`: plain fine-tuning (LTP starts from a fine-tuned model).
Stage `soft`: task loss + lambda * sum_l mean(m_l) over real tokens (the paper's L1 penalty on the
soft masks, Eq. 6), thresholds trained in their own AdamW group (own lr, no weight decay).
Stage `hard`: thresholds frozen, tokens below them removed, the model fine-tuned with the task
loss only; it must start from a soft-stage checkpoint (`init_from`). Evaluation is always hard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from tokenprune.checkpoints import read_checkpoint
from tokenprune.checks import check_choice, check_range
from tokenprune.modules.base import TokenPruningModule
from tokenprune.pruners.ltp import LTPPruner

STAGES = ("finetune", "soft", "hard")


class LTPModule(TokenPruningModule):
    """Two-stage LTP training on the shared engine."""

    task_kinds = ("classification",)

    def __init__(
        self,
        backbone: Mapping[str, Any],
        task: Mapping[str, Any],
        pruner: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        stage: str = "soft",
        mask_penalty: float = 0.1,
        threshold_lr: float = 5e-5,
        init_from: str | None = None,
        compare_unpruned: bool = True,
    ) -> None:
        check_choice("module.stage", stage, STAGES)
        check_range("module.mask_penalty", mask_penalty, 0.0, math.inf)  # lambda; the paper uses 0.01 .. 0.2
        if not threshold_lr > 0:
            raise ValueError(f"module.threshold_lr={threshold_lr} must be > 0")
        super().__init__(backbone, task, pruner, optimizer, scheduler, compare_unpruned, init_from=init_from)
        if not isinstance(self.pruner, LTPPruner):
            raise ValueError(f"module=ltp needs pruner=ltp, got {type(self.pruner).__name__}")
        self.save_hyperparameters({"stage": stage, "mask_penalty": mask_penalty, "threshold_lr": threshold_lr})
        self.pruner.offset.requires_grad_(stage == "soft")

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams["stage"] == "hard":
            self._check_soft_checkpoint(self.hparams["init_from"])
        super().setup(stage)

    @staticmethod
    def _check_soft_checkpoint(init_from: str | None) -> None:
        if init_from is None:
            raise ValueError(
                "module.stage=hard needs module.init_from=<soft-stage checkpoint>; "
                "run the soft stage first (or experiment=ltp, which runs both)"
            )
        hparams = read_checkpoint(init_from).get("hyper_parameters", {})
        if hparams.get("stage") != "soft":
            raise ValueError(
                f"module.init_from={init_from} is not an LTP soft-stage checkpoint "
                f"(its stage is {hparams.get('stage')!r}); the hard stage needs the learned thresholds"
            )

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        soft = self.hparams["stage"] == "soft"
        self.pruner.soft = soft
        try:
            logits, out = self(batch, pruner=None if self.hparams["stage"] == "finetune" else self.pruner)
        finally:
            self.pruner.soft = False  # evaluation is always hard
        loss = task = self.task_loss(logits, batch["labels"])
        size = batch["labels"].shape[0]
        if soft:
            penalty = sum(
                (layer.soft_mask * layer.score_mask).sum() / layer.score_mask.sum().clamp(min=1) for layer in out.trace
            )
            loss = task + self.hparams["mask_penalty"] * penalty
            self.log("train/mask_penalty", penalty, batch_size=size)
        self.log("train/task_loss", task, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def on_train_epoch_end(self) -> None:
        thresholds = self.pruner.thresholds.detach()  # the same on every rank (DDP syncs parameters)
        self.log_dict({f"ltp/threshold/layer_{i}": t for i, t in enumerate(thresholds)}, sync_dist=True)

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = super().parameter_groups()
        if self.hparams["stage"] == "soft":
            groups.append({"params": [self.pruner.offset], "weight_decay": 0.0, "lr": self.hparams["threshold_lr"]})
        return groups
