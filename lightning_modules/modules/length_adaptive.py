"""Length-Adaptive Transformer as a LightningModule (Kim and Cho, ACL 2021).

Stage `finetune` is plain fine-tuning (LAT starts from a fine-tuned model). In stage `sandwich`
each training step applies the sandwich rule with inplace distillation: the full model learns from
the labels; the smallest sub-model (every layer keeps ceil((1-p) * previous length)) and
`num_sandwich` random sub-models (LengthDrop lengths, LayerDrop-skipped layers) learn from the
full model's detached logits; the losses are summed and divided by num_sandwich + 2 as in the
reference code. Sub-model lengths start from the batch's padded length, as the reference's started
from max_seq_length (with `pruner.length_unit=fraction`, from task.max_length). Token-level tasks
use Drop-and-Restore (the engine restores full-length outputs).

Reference settings (DESIGN.md s.5; `experiment=length_adaptive_reference` sets them):
`layer_drop_passes=all` applies LayerDrop to every pass of a step, the full model's and the
smallest sub-model's too (default `random`: only the random sub-models, so the full model and the
smallest one, the two ends of the search space, are trained whole); `min_length=2` (default 1).
Not reproduced: the reference's significance also summed the attention of padding query rows,
which the engine never computes (it removes padding rather than attending from it).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenprune.checks import check_choice
from tokenprune.modules.base import TokenPruningModule
from tokenprune.pruners.length import LengthConfigPruner, check_drop_prob, sample_gene, smallest_gene

log = logging.getLogger(__name__)
KD_DIRECTIONS = ("forward", "reverse")
STAGES = ("finetune", "sandwich")
LAYER_DROP_PASSES = ("random", "all")


def distillation_loss(student: Tensor, teacher: Tensor, direction: str, regression: bool) -> Tensor:
    """Inplace-distillation loss of a sub-model's logits against the full model's.

    forward: KL(teacher || student), standard knowledge distillation (the default);
    reverse: KL(student || teacher), what the reference implementation computed.
    Regression heads use the squared error to the teacher. Token-level logits (B, N, C) are
    flattened; rows whose teacher is all-zero padding still count equally (they are cheap).
    """
    if regression:
        return F.mse_loss(student, teacher)
    student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    if direction == "forward":
        return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    return F.kl_div(F.log_softmax(teacher, -1), F.log_softmax(student, -1), log_target=True, reduction="batchmean")


class LengthAdaptiveModule(TokenPruningModule):
    """LengthDrop + LayerDrop sandwich training; the length configuration is searched afterwards."""

    task_kinds = ("classification",)

    def __init__(
        self,
        backbone: Mapping[str, Any],
        task: Mapping[str, Any],
        pruner: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        stage: str = "sandwich",
        length_drop: float = 0.2,
        layer_drop: float = 0.2,
        num_sandwich: int = 2,
        kd_direction: str = "forward",
        init_from: str | None = None,
        compare_unpruned: bool = True,
        layer_drop_passes: str = "random",
        min_length: int = 1,
    ) -> None:
        check_choice("module.stage", stage, STAGES)
        check_choice("module.layer_drop_passes", layer_drop_passes, LAYER_DROP_PASSES)
        if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 1:
            raise ValueError(f"module.min_length={min_length!r} must be an integer >= 1 (the reference: 2)")
        check_drop_prob("module.length_drop", length_drop)
        check_drop_prob("module.layer_drop", layer_drop)
        if num_sandwich < 0:
            raise ValueError(f"module.num_sandwich={num_sandwich} must be >= 0")
        check_choice("module.kd_direction", kd_direction, KD_DIRECTIONS)
        super().__init__(backbone, task, pruner, optimizer, scheduler, compare_unpruned, init_from=init_from)
        if not isinstance(self.pruner, LengthConfigPruner):
            raise ValueError(f"module=length_adaptive needs pruner=length_adaptive, got {type(self.pruner).__name__}")
        self.save_hyperparameters(
            {
                "stage": stage,
                "length_drop": length_drop,
                "layer_drop": layer_drop,
                "num_sandwich": num_sandwich,
                "kd_direction": kd_direction,
                "layer_drop_passes": layer_drop_passes,
                "min_length": min_length,
            }
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams["init_from"] is None and self.hparams["stage"] == "sandwich":
            log.warning(
                "module.init_from is not set: Length-Adaptive training normally starts from a fine-tuned "
                "checkpoint (tokenprune-train pruner=none); training from the pretrained backbone instead"
            )
        super().setup(stage)

    def layer_drop(self, rng: random.Random) -> set[int]:
        """LayerDrop: each layer skipped with probability module.layer_drop."""
        return {layer for layer in range(self.adapter.num_layers) if rng.random() < self.hparams["layer_drop"]}

    def sub_models(self, attention_mask: Tensor, rng: random.Random) -> list[tuple[LengthConfigPruner, set[int]]]:
        """The smallest sub-model, then num_sandwich LengthDrop + LayerDrop samples, for one batch."""
        hp, layers, pruner = self.hparams, self.adapter.num_layers, self.pruner
        start = pruner.reference_length if pruner.length_unit == "fraction" else int(attention_mask.sum(dim=1).max())
        drop, shortest = hp["length_drop"], hp["min_length"]
        skipped = self.layer_drop(rng) if hp["layer_drop_passes"] == "all" else set()
        models = [(pruner.with_gene(smallest_gene(layers, start, drop, skipped, shortest)), skipped)]
        for _ in range(hp["num_sandwich"]):
            skipped = self.layer_drop(rng)
            models.append((pruner.with_gene(sample_gene(layers, start, drop, rng, skipped, shortest)), skipped))
        return models

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        rng = random.Random(int(torch.randint(2**31, ())))
        every_pass = self.hparams["stage"] == "sandwich" and self.hparams["layer_drop_passes"] == "all"
        logits, _ = self(batch, skip_layers=self.layer_drop(rng) if every_pass else set())
        full_loss = self.task_loss(logits, batch["labels"])
        if self.hparams["stage"] == "finetune":
            self.log("train/loss", full_loss, prog_bar=True, batch_size=batch["labels"].shape[0])
            return full_loss
        teacher = logits.detach()
        distill = torch.zeros((), device=logits.device)
        for pruner, skipped in self.sub_models(batch["attention_mask"], rng):
            student, _ = self(batch, pruner=pruner, skip_layers=skipped)
            distill = distill + distillation_loss(student, teacher, self.hparams["kd_direction"], self.regression)
        loss = (full_loss + distill) / (self.hparams["num_sandwich"] + 2)
        size = batch["labels"].shape[0]
        self.log("train/full_loss", full_loss, batch_size=size)
        self.log("train/distill_loss", distill, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss
