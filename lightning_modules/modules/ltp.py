"""Learned Token Pruning as a LightningModule (Kim et al., KDD 2022).

Stage `finetune`: plain fine-tuning (LTP starts from a fine-tuned model).
Stage `soft`: task loss + lambda * sum_l mean(m_l) (the paper's L1 penalty on the soft masks,
Eq. 6), thresholds trained in their own AdamW group (own lr, no weight decay). `penalty_positions`
says what the mean runs over: `real` tokens (default: the pressure does not depend on how long a
batch's texts are), or `padded`, the reference's B x n_ref positions (inputs padded to
task.max_length; a padding position's mask is sigmoid(-theta_l / T), its score being 0), which is
the scale the paper's lambda 0.01..0.2 is on.
Stage `hard`: thresholds frozen, tokens below them removed, the model fine-tuned with the task
loss only; it must start from a soft-stage checkpoint (`init_from`). Evaluation is always hard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tokenprune.checkpoints import read_checkpoint
from tokenprune.checks import check_choice, check_range
from tokenprune.engine.state import LayerTrace
from tokenprune.modules.base import TokenPruningModule
from tokenprune.pruners.ltp import LTPPruner

STAGES = ("finetune", "soft", "hard")
PENALTY_POSITIONS = ("real", "padded")


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
        penalty_positions: str = "real",
    ) -> None:
        check_choice("module.stage", stage, STAGES)
        check_choice("module.penalty_positions", penalty_positions, PENALTY_POSITIONS)
        check_range("module.mask_penalty", mask_penalty, 0.0, math.inf)  # lambda; the paper uses 0.01 .. 0.2
        if not threshold_lr > 0:
            raise ValueError(f"module.threshold_lr={threshold_lr} must be > 0")
        super().__init__(backbone, task, pruner, optimizer, scheduler, compare_unpruned, init_from=init_from)
        if not isinstance(self.pruner, LTPPruner):
            raise ValueError(f"module=ltp needs pruner=ltp, got {type(self.pruner).__name__}")
        self.save_hyperparameters(
            {
                "stage": stage,
                "mask_penalty": mask_penalty,
                "threshold_lr": threshold_lr,
                "penalty_positions": penalty_positions,
            }
        )
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
            penalty = self.mask_penalty(out.trace)
            loss = task + self.hparams["mask_penalty"] * penalty
            self.log("train/mask_penalty", penalty, batch_size=size)
        self.log("train/task_loss", task, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def mask_penalty(self, trace: Sequence[LayerTrace]) -> Tensor:
        """sum over soft-masked layers of the mean mask (see `penalty_positions` in the module doc)."""
        pruner = self.pruner
        assert isinstance(pruner, LTPPruner)
        total = torch.zeros((), device=pruner.offset.device)
        for index, layer in enumerate(trace):
            if layer.soft_mask is None:  # a layer before pruner.start_layer
                continue
            kept = (layer.soft_mask * layer.score_mask).sum()
            if self.hparams["penalty_positions"] == "real":
                total = total + kept / layer.score_mask.sum().clamp(min=1)
                continue
            positions = layer.score_mask.shape[0] * pruner.reference_length
            padding = positions - layer.score_mask.sum()
            padding_mask = torch.sigmoid(-pruner.thresholds[index] / pruner.temperature)
            total = total + (kept + padding * padding_mask) / positions
        return total

    def on_train_epoch_end(self) -> None:
        thresholds = self.pruner.thresholds.detach()  # the same on every rank (DDP syncs parameters)
        self.log_dict({f"ltp/threshold/layer_{i}": t for i, t in enumerate(thresholds)}, sync_dist=True)

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = super().parameter_groups()
        if self.hparams["stage"] == "soft":
            groups.append({"params": [self.pruner.offset], "weight_decay": 0.0, "lr": self.hparams["threshold_lr"]})
        return groups
