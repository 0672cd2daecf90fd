"""Token and Head Adaptive Transformer as a LightningModule (THAT; Lee et al., COLING 2022).

Stage `finetune` is plain fine-tuning. Stage `sandwich` first measures head importance on the
starting weights (one pass over the whole training split: task loss, dropout on, no optimizer
step; per head `sum_b sum_t |<context_h, dL/dcontext_h>|` over tokens and examples, each layer's
row L2-normalised; DESIGN.md s.5), saves it beside the starting checkpoint
(`<checkpoint>.head-importance-<key>.json`, keyed by the checkpoint's SHA-256 and the data) and
in the pruner's `head_importance` buffer, then runs the Length-Adaptive sandwich
(modules/length_adaptive.py) where every sub-model also loses heads: the smallest one the cap
(pruners/token_head.head_cap) with the smallest lengths, the random ones
`h_l ~ randint(h_{l-1}, cap_l)`. `prune` chooses what the sub-models prune: `joint` (the
method), `tokens` (Length-Adaptive) or `heads` (heads only, full lengths), so the three compare
from the same start under the same budget (sweeps/token_head_adaptive.sh).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from tokenprune.checkpoints import file_digest
from tokenprune.checks import check_choice
from tokenprune.engine.pruner import TokenPruner
from tokenprune.modules.base import TokenPruningModule
from tokenprune.modules.length_adaptive import LengthAdaptiveModule
from tokenprune.pruners.length import LengthConfigPruner
from tokenprune.pruners.token_head import TokenHeadPruner, head_cap, sample_head_gene

log = logging.getLogger(__name__)
PRUNED_PARTS = ("joint", "tokens", "heads")


def head_importance(module: TokenPruningModule, loader: DataLoader) -> Tensor:
    """Head importance (L, H) over every batch of `loader`: dropout on, task loss, no optimizer
    step and no parameter gradient kept. Each head's context is multiplied by a gate of ones;
    the gate's gradient at (b, h, t) is sum_i ctx[b,h,t,i] * dL/dctx[b,h,t,i]; its absolute value
    is summed over examples and tokens, then each layer's row is L2-normalised."""
    was_training = module.training
    module.train()
    dims = module.dims
    totals = torch.zeros(dims.num_layers, dims.num_heads, dtype=torch.float64)
    batches = 0
    for batch in tqdm(loader, desc="head importance", leave=False):
        batch = {k: v.to(module.device) for k, v in batch.items()}
        gates: dict[int, Tensor] = {}

        def gate(layer: int, context: Tensor) -> Tensor:
            gates[layer] = torch.ones(*context.shape[:3], 1, device=context.device, requires_grad=True)
            return context * gates[layer]

        logits, out = module(batch, context_hook=gate)
        loss = module.task_loss(logits, module.targets(batch, out))
        grads = torch.autograd.grad(loss, [gates[layer] for layer in sorted(gates)])
        for layer, grad in zip(sorted(gates), grads, strict=True):
            totals[layer] += grad.detach().abs().sum(dim=(0, 2, 3)).double().cpu()
        batches += 1
    module.train(was_training)
    if batches == 0:
        raise ValueError("the head-importance pass saw no batch: the training split is empty")
    return (totals / (totals.norm(dim=1, keepdim=True) + 1e-20)).float()


class TokenHeadAdaptiveModule(LengthAdaptiveModule):
    """Length-Adaptive sandwich training whose sub-models also drop their least important heads."""

    def __init__(
        self,
        backbone: Mapping[str, Any],
        task: Mapping[str, Any],
        pruner: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        stage: str = "sandwich",
        prune: str = "joint",
        length_drop: float = 0.2,
        layer_drop: float = 0.2,
        num_sandwich: int = 2,
        kd_direction: str = "forward",
        init_from: str | None = None,
        compare_unpruned: bool = True,
        layer_drop_passes: str = "random",
        min_length: int = 1,
    ) -> None:
        check_choice("module.prune", prune, PRUNED_PARTS)
        super().__init__(
            backbone,
            task,
            pruner,
            optimizer,
            scheduler,
            stage=stage,
            length_drop=length_drop,
            layer_drop=layer_drop,
            num_sandwich=num_sandwich,
            kd_direction=kd_direction,
            init_from=init_from,
            compare_unpruned=compare_unpruned,
            layer_drop_passes=layer_drop_passes,
            min_length=min_length,
        )
        if not isinstance(self.pruner, TokenHeadPruner):
            raise ValueError(
                f"module=token_head_adaptive needs pruner=token_head_adaptive, got {type(self.pruner).__name__}"
            )
        self.save_hyperparameters({"prune": prune})
        self.head_cap = head_cap(self.dims.num_layers, self.dims.num_heads)

    def build_pruner(self, spec: Mapping[str, Any] | None) -> TokenPruner | None:
        """A pruner from a config; Token+Head pruners share this model's head importance (the
        search and the bench build theirs this way)."""
        pruner = super().build_pruner(spec)
        own = getattr(self, "pruner", None)  # None while __init__ builds the module's own pruner
        if isinstance(pruner, TokenHeadPruner) and isinstance(own, TokenHeadPruner):
            pruner.head_importance = own.head_importance
        return pruner

    # ----------------------------------------------------------------- head importance
    def on_fit_start(self) -> None:
        """Before the first sandwich step: head importance of the starting weights (on the
        training device), unless the pruner already has it (a resumed run or a THAT checkpoint)."""
        pruner = self.pruner
        assert isinstance(pruner, TokenHeadPruner)
        if self.hparams["stage"] != "sandwich" or pruner.has_head_importance:
            return
        importance = (
            self.importance_artifact() if self.trainer.is_global_zero else torch.zeros_like(pruner.head_importance)
        )
        pruner.set_head_importance(self.trainer.strategy.broadcast(importance.to(self.device), src=0))
        for logger in self.loggers:
            logger.log_metrics(
                {
                    f"head_importance/layer_{layer}_head_{head}": float(value)
                    for layer, row in enumerate(pruner.head_importance)
                    for head, value in enumerate(row)
                }
            )

    def importance_identity(self) -> dict[str, Any]:
        """What importance depends on: the starting checkpoint's bytes, backbone, task and batching."""
        datamodule = self.trainer.datamodule
        task = self.hparams["task"]
        return {
            "checkpoint_sha256": file_digest(str(self.hparams["init_from"])),
            "backbone": self.hparams["backbone"]["name"],
            "task": {key: task.get(key) for key in ("name", "source", "text_columns", "max_length")},
            "batch_size": datamodule.batch_size,
            "seed": datamodule.seed,
        }

    def importance_artifact(self) -> Tensor:
        """Importance of the starting checkpoint: read from its cache file, or measured and cached
        (a new file per checkpoint digest and data; written atomically, nothing overwritten)."""
        loader = self.trainer.datamodule.train_dataloader(shard=False)  # the whole split, also under DDP
        if self.hparams["init_from"] is None:
            log.warning("module.init_from is not set: head importance of the pretrained weights, not cached")
            return head_importance(self, loader)
        identity = self.importance_identity()
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(f"{self.hparams['init_from']}.head-importance-{key}.json")
        if path.is_file():
            saved = json.loads(path.read_text()).get("identity") or {}
            if saved != identity:
                differs = ", ".join(sorted(k for k in identity if saved.get(k) != identity[k]))
                raise ValueError(
                    f"{path} holds the head importance of another checkpoint or data ({differs} differ from "
                    f"module.init_from={self.hparams['init_from']} and this task); it is not overwritten: "
                    f"move it away to measure the importance again"
                )
            log.info("head importance from %s", path)
            return torch.tensor(json.loads(path.read_text())["importance"], dtype=torch.float32)
        importance = head_importance(self, loader)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps({"identity": identity, "importance": importance.tolist()}, indent=1))
        partial.replace(path)
        log.info("head importance written to %s", path)
        return importance

    # ----------------------------------------------------------------- sandwich
    def sub_models(self, attention_mask: Tensor, rng: random.Random) -> list[tuple[LengthConfigPruner, set[int]]]:
        """The Length-Adaptive sub-models with heads: the smallest loses the cap, the random ones a
        sample under it; `prune=heads` keeps full lengths, `prune=tokens` every head."""
        prune, layers = self.hparams["prune"], self.dims.num_layers
        full = (self.pruner.reference_length,) * layers
        models: list[tuple[LengthConfigPruner, set[int]]] = []
        for index, (pruner, skipped) in enumerate(super().sub_models(attention_mask, rng)):
            assert isinstance(pruner, TokenHeadPruner)
            lengths = full if prune == "heads" else pruner.gene
            heads = self.head_cap if index == 0 else sample_head_gene(self.head_cap, rng, skipped)
            models.append((pruner.with_genes(lengths, (0,) * layers if prune == "tokens" else heads), skipped))
        return models
