"""ACC latency-adjustable Transformer as a LightningModule (Kachuee and Sharifkhani, arXiv 2201.03327).

Stage `finetune`: plain fine-tuning (ACC starts from a fine-tuned model). Stage `acc`: before the
first step, an ACC profiling pass over the training split with the starting weights (every layer
scored, every token kept; ACC_l = median SV over the real tokens of a batch, averaged over
batches), the fitted curve and the elimination profile (pruners/acc.py); then one stage of
fine-tuning with elimination on at the pruner's Speedup Coefficient and the task loss. The
profile is saved beside the starting checkpoint (`<checkpoint>.acc-profile.json` + `.png`, keyed
by the checkpoint's SHA-256 and the task) and reused; it travels in the pruner's settings, so the
trained checkpoint runs at any SC afterwards (`tokenprune-search search=acc_offline`).
Causal-LM tasks (GPT-2, eq. 8 scores, newest token protected) train on the next-token loss and
report perplexity (modules/base.py; `lm_restore` chooses how eliminated positions are scored).
Seq2seq backbones (Flan-T5, rank classification over `task.answers`) need no fine-tuned start: as
in the paper, stage `acc` may profile the pretrained weights (no `init_from`; the profile is then
written into the run folder) and, with `trainer.max_epochs=0`, evaluate them without training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from tokenprune.backbones import resolve_location
from tokenprune.checkpoints import file_digest
from tokenprune.checks import check_choice
from tokenprune.modules.base import TokenPruningModule
from tokenprune.pruners.acc import ACCPruner, ScoreEveryLayer, profile_from_acc

log = logging.getLogger(__name__)
STAGES = ("finetune", "acc")


@torch.no_grad()
def measure_acc(module: TokenPruningModule, loader: DataLoader, limit: int | None = None) -> list[float]:
    """ACC_l per layer: median score vector over a batch's real tokens, averaged over batches."""
    was_training = module.training
    module.eval()
    scorer = ScoreEveryLayer(module.adapter.num_layers)
    totals = torch.zeros(module.adapter.num_layers, dtype=torch.float64)
    batches = 0
    for index, batch in enumerate(tqdm(loader, desc="ACC profile", leave=False)):
        if limit is not None and index >= limit:
            break
        batch = {k: v.to(module.device) for k, v in batch.items()}
        _, out = module(batch, pruner=scorer)
        for layer, trace in enumerate(out.trace):
            assert trace.scores is not None and trace.score_mask is not None
            totals[layer] += float(trace.scores[trace.score_mask].median())
        batches += 1
    module.train(was_training)
    if batches == 0:
        raise ValueError("the ACC profiling pass saw no batch: the training split is empty")
    return (totals / batches).tolist()


def plot_profile(acc: Sequence[float], fitted: Sequence[float], profile: Sequence[float], path: Path) -> Path:
    """ACC per layer with its fitted curve, and the elimination profile (the paper's Fig. 4)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    layers = list(range(1, len(acc) + 1))
    left.plot(layers, acc, "o", label="ACC (median SV)")
    left.plot(layers, fitted, "-", color="red", label="fitted curve")
    left.set_xlabel("layer")
    left.set_ylabel("ACC")
    left.legend()
    right.bar(layers, profile)
    right.set_xlabel("layer")
    right.set_ylabel("elimination profile EP")
    right.set_ylim(0, 1.05)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class ACCModule(TokenPruningModule):
    """ACC fine-tuning: elimination on, task loss, profile measured on the starting weights."""

    seq2seq = True

    def __init__(
        self,
        backbone: Mapping[str, Any],
        task: Mapping[str, Any],
        pruner: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        stage: str = "acc",
        profile_batches: int | None = None,
        profile_path: str | None = None,
        init_from: str | None = None,
        compare_unpruned: bool = True,
        lm_restore: bool = True,
    ) -> None:
        check_choice("module.stage", stage, STAGES)
        if profile_batches is not None and (
            isinstance(profile_batches, bool) or not isinstance(profile_batches, int) or profile_batches < 1
        ):
            raise ValueError(f"module.profile_batches={profile_batches!r} must be an integer >= 1 or null (all)")
        super().__init__(
            backbone, task, pruner, optimizer, scheduler, compare_unpruned, init_from=init_from, lm_restore=lm_restore
        )
        if not isinstance(self.pruner, ACCPruner):
            raise ValueError(f"module=acc needs pruner=acc, got {type(self.pruner).__name__}")
        self.save_hyperparameters({"stage": stage, "profile_batches": profile_batches, "profile_path": profile_path})
        # a named profile must belong to this model and task: checked before any work, unless the
        # settings already hold the profile (a trained checkpoint rebuilt: its file is not needed)
        if profile_path is not None and self.hparams["pruner"].get("acc") is None:
            self.read_profile(Path(profile_path), strict=True)

    def setup(self, stage: str) -> None:
        if (
            stage == "fit"
            and self.hparams["stage"] == "acc"
            and self.hparams["init_from"] is None
            and self.decoder_logits is None
        ):
            raise ValueError(
                "module.stage=acc needs module.init_from=<fine-tuned checkpoint> (its ACC profile is "
                "measured first); experiment=acc runs fine-tuning and the ACC stage in one command "
                "(only a seq2seq backbone ranking task.answers starts from its pretrained weights)"
            )
        super().setup(stage)
        if stage == "fit" and self.hparams["stage"] == "acc" and self.hparams["pruner"].get("acc") is None:
            # measured (or read) once, by the first process over the whole split; every DDP rank gets it
            artifact = self.profile_artifact() if self.trainer.is_global_zero else None
            self.use_profile(self.trainer.strategy.broadcast(artifact, src=0))

    def identity(self) -> dict[str, Any]:
        """What a profile was measured on: the starting checkpoint's bytes (without one, the
        backbone's pretrained weights: their location), backbone and task (with its prompt)."""
        if not hasattr(self, "_identity"):
            init_from, task = self.hparams["init_from"], self.hparams["task"]
            start = (
                {"checkpoint_sha256": file_digest(str(init_from))}
                if init_from is not None
                else {"pretrained": resolve_location(self.hparams["backbone"].get("pretrained"))}
            )
            self._identity = {
                **start,
                "backbone": self.hparams["backbone"]["name"],
                "task": task["name"],
                "max_length": task["max_length"],
                "prompt": task.get("prompt"),
            }
        return self._identity

    def default_profile_path(self) -> Path:
        """`<init_from>.acc-profile.json`, or without a start checkpoint `acc-profile.json` in the
        trainer's root folder (the run folder of tokenprune-train)."""
        if self.hparams["init_from"] is not None:
            return Path(f"{self.hparams['init_from']}.acc-profile.json")
        return Path(self.trainer.default_root_dir) / "acc-profile.json"

    def read_profile(self, path: Path, strict: bool) -> dict[str, Any] | None:
        """A saved profile if it was measured on this model and task; otherwise None, or (strict,
        a file the user named) an error naming module.profile_path and what differs."""
        if not path.is_file():
            if strict:
                raise FileNotFoundError(f"module.profile_path={path} does not exist")
            return None
        saved = json.loads(path.read_text())
        mismatch = {k: (saved.get(k), v) for k, v in self.identity().items() if saved.get(k) != v}
        if mismatch and strict:
            raise ValueError(
                f"module.profile_path={path} was measured on another model or task "
                f"({'; '.join(f'{k}: {a!r} != {b!r}' for k, (a, b) in mismatch.items())})"
            )
        return None if mismatch else saved

    def profile_artifact(self) -> dict[str, Any]:
        """The starting checkpoint's profile: read when it matches, else measured and saved."""
        given = self.hparams["profile_path"]
        path = Path(given) if given else self.default_profile_path()
        saved = self.read_profile(path, strict=bool(given))
        if saved is not None:
            log.info("ACC profile from %s", path)
            return saved
        identity = self.identity()
        acc = measure_acc(self, self.trainer.datamodule.train_dataloader(shard=False), self.hparams["profile_batches"])
        pruner = self.pruner
        assert isinstance(pruner, ACCPruner)
        fitted, profile = profile_from_acc(acc, pruner.curve, pruner.degree, pruner.profile_rule)
        artifact = {
            **identity,
            "acc": acc,
            "fitted": fitted,
            "profile": profile,
            "curve": pruner.curve,
            "degree": pruner.degree,
            "profile_rule": pruner.profile_rule,
        }
        if not given:  # never write over a file the user named
            partial = path.with_suffix(".tmp")
            partial.write_text(json.dumps(artifact, indent=2))
            partial.replace(path)
            plot_profile(acc, fitted, profile, path.with_suffix(".png"))
            log.info("ACC profile written to %s (+ .png)", path)
        return artifact

    def use_profile(self, artifact: Mapping[str, Any]) -> None:
        """Put the profile into the pruner's settings (saved with every checkpoint) and rebuild it."""
        self.hparams["pruner"] = {**self.hparams["pruner"], "profile": artifact["profile"], "acc": artifact["acc"]}
        self.pruner = self.build_pruner(self.hparams["pruner"])
        image = self.default_profile_path().with_suffix(".png")
        for logger in self.loggers:
            logger.log_metrics(
                {f"acc/acc_layer_{i}": v for i, v in enumerate(artifact["acc"])}
                | {f"acc/profile_layer_{i}": v for i, v in enumerate(artifact["profile"])}
            )
            if image.is_file() and hasattr(logger, "log_image"):
                logger.log_image("acc/profile", images=[str(image)])

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        pruner = self.pruner if self.hparams["stage"] == "acc" else None
        logits, out = self(batch, pruner=pruner)
        loss = self.task_loss(logits, self.targets(batch, out))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss
