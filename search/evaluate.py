"""Score one pruning configuration of a trained model on a data split (physically pruned forwards)."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader
from tqdm import tqdm

from tokenprune.backbones import tokenizer_location
from tokenprune.data.datamodule import TaskDataModule
from tokenprune.engine.pruner import TokenPruner
from tokenprune.modules.base import TokenPruningModule
from tokenprune.modules.metrics import PruningStats


def datamodule_for(module: TokenPruningModule, eval_batch_size: int = 128, stage: str | None = None) -> TaskDataModule:
    """The task's data as the module was trained on it (task and tokenizer from its hparams), set
    up for `stage` (TaskDataModule.setup: its splits are prepared now, any other on first use)."""
    task, backbone = module.hparams.task, module.hparams.backbone
    datamodule = TaskDataModule(
        source=instantiate(task["source"]),
        tokenizer=tokenizer_location(backbone),
        text_columns=task["text_columns"],
        max_length=task["max_length"],
        eval_batch_size=eval_batch_size,
        label_column=task.get("label_column", "label"),
        token_level=task.get("token_level", False),
        num_labels=task["num_labels"],
        kind=task.get("kind", "classification"),
    )
    datamodule.setup(stage)
    return datamodule


@torch.inference_mode()
def evaluate(
    module: TokenPruningModule, loader: DataLoader, pruner: TokenPruner | None, desc: str = "eval"
) -> dict[str, Any]:
    """Task metrics, relative FLOPs and kept tokens of `module` pruned by `pruner` on `loader`."""
    module.eval()
    metrics = module.report_metrics.clone().to(module.device)
    stats = PruningStats(module.dims).to(module.device)
    for batch in tqdm(loader, desc=desc, leave=False):
        batch = {k: v.to(module.device) for k, v in batch.items()}
        logits, out = module(batch, pruner=pruner)
        module.update_metrics(metrics, logits, module.targets(batch, out))
        stats.update(out.trace, batch["attention_mask"].sum(dim=1))
    result = {k.removeprefix("report/"): float(v) for k, v in metrics.compute().items()}
    result.update({k: float(v) for k, v in stats.compute().items()})
    return result
