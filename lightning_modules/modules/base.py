"""What every method's LightningModule shares: backbone + engine + pruner, task loss, evaluation
with FLOPs and kept-token statistics, the optimizer and schedule from `_partial_` configs.

Task kinds (`task.kind`): `classification` (sequence or token labels) and `causal_lm`: next-token
cross entropy over the LM head's logits (GPT-2, `backbone.head=causal_lm`) and perplexity. With
`lm_restore` (default) the LM head reads Drop-and-Restore hidden states: every position is scored,
an eliminated position by the hidden state it had when it was eliminated (ACC's paper does not
say how its perplexity treats eliminated positions). Without, only the positions that survive to
the last layer are scored (each predicting the token after it).

Seq2seq backbones (`backbone.head=seq2seq_lm`, T5 / Flan-T5) classify by rank classification, the
way instruction-tuned models are evaluated without fine-tuning: class c's logit is the decoder's
summed log-likelihood of `task.answers[c]` given the encoder output, from one engine pass over the
encoder per batch (pruner applied: ACC eliminates in the encoder only, Kachuee and Sharifkhani,
arXiv 2201.03327) and one decoder pass over every (example, answer) pair, cross-attending to the
kept encoder tokens. Accuracy, FLOPs (the encoder's) and the searches then work as for encoders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torchmetrics import MetricCollection

from tokenprune.backbones import assert_same_backbone, load_backbone, tokenizer_location
from tokenprune.checkpoints import read_checkpoint
from tokenprune.checks import check_choice, check_optimizer
from tokenprune.config import plain
from tokenprune.data.datamodule import TASK_KINDS, answer_token_ids
from tokenprune.engine import EncoderOutput, PrunableEncoder
from tokenprune.engine.flops import EncoderDims
from tokenprune.engine.kernels import pass_kernels, stock_linears
from tokenprune.engine.pruner import TokenPruner
from tokenprune.modules.metrics import PruningStats
from tokenprune.pruners import build_pruner

# Backbone heads that classify whole sequences: a classifier over the encoder, or a seq2seq LM
# ranking task.answers.
SEQUENCE_HEADS = ("classification", "seq2seq_lm")


class TokenPruningModule(L.LightningModule):
    """Base of the method modules.

    backbone / task / pruner are the `conf/backbone`, `conf/task`, `conf/pruner` nodes, optimizer
    and scheduler `_partial_` nodes (lightning-hydra-template style); all are stored as plain-data
    hyperparameters so `load_from_checkpoint` rebuilds the same model. The HF model is
    `self.model` (state_dict keys `model.<HF keys>`), the pruner `self.pruner` (None = unpruned).
    `task_kinds`: the `task.kind`s a method supports; `seq2seq`: whether it trains and evaluates
    seq2seq backbones by rank classification; `lm_restore`: see the module doc.
    """

    task_kinds: tuple[str, ...] = TASK_KINDS
    seq2seq: bool = False
    answer_targets: Tensor  # rank classification buffers (register_answers)
    answer_mask: Tensor
    answer_inputs: Tensor

    def __init__(
        self,
        backbone: Mapping[str, Any],
        task: Mapping[str, Any],
        pruner: Mapping[str, Any] | None,
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        compare_unpruned: bool = True,
        init_from: str | None = None,
        lm_restore: bool = True,
    ) -> None:
        super().__init__()
        backbone, task, pruner = plain(backbone), plain(task), plain(pruner)
        optimizer, scheduler = plain(optimizer), plain(scheduler)
        check_optimizer(optimizer, scheduler)
        self.causal_lm = check_task_kind(type(self), task, backbone)
        if not isinstance(lm_restore, bool):
            raise TypeError(f"module.lm_restore={lm_restore!r} must be true or false")
        if init_from is not None and not Path(init_from).is_file():
            raise FileNotFoundError(f"module.init_from={init_from} does not exist")
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "task": task,
                "pruner": pruner,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "compare_unpruned": compare_unpruned,
                "init_from": init_from,
                "lm_restore": lm_restore,
            }
        )
        self.model, self.adapter = load_backbone(
            backbone, task["num_labels"], token_level=task.get("token_level", False)
        )
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes
        self.encoder = PrunableEncoder(self.adapter)
        self.dims = EncoderDims.of(self.adapter)
        self.lm_logits: Callable[[Tensor], Tensor] | None = (
            getattr(self.adapter, "lm_logits", None) if self.causal_lm else None
        )
        if self.causal_lm and self.lm_logits is None:
            raise ValueError(f"task.kind=causal_lm: backbone.adapter {type(self.adapter).__name__} has no LM head")
        self.decoder_logits: Callable[..., Tensor] | None = None
        if task.get("answers") is not None:
            self.decoder_logits = getattr(self.adapter, "decoder_logits", None)
            if self.decoder_logits is None:
                raise ValueError(
                    f"task.answers: backbone.adapter {type(self.adapter).__name__} has no decoder to rank answers"
                )
            self.register_answers(answer_token_ids(tokenizer_location(backbone), task["answers"]))
        self.pruner = self.build_pruner(pruner)
        self.regression = not self.causal_lm and task["num_labels"] == 1
        self.token_level = bool(task.get("token_level", False))
        metrics = MetricCollection({name: instantiate(spec) for name, spec in task["metrics"].items()})
        self.val_metrics = metrics.clone(prefix="val/")
        self.report_metrics = metrics.clone(prefix="report/")
        self.report_unpruned_metrics = metrics.clone(prefix="report/unpruned_")
        self.val_stats = PruningStats(self.dims)
        self.report_stats = PruningStats(self.dims)

    def register_answers(self, targets: list[list[int]]) -> None:
        """Answer targets (C, T) right-padded, their mask, and the decoder inputs (targets shifted
        right after the decoder start token), as non-persistent buffers that follow the device."""
        config = self.model.config
        if config.decoder_start_token_id is None or config.pad_token_id is None:
            raise ValueError(
                f"backbone={self.hparams['backbone']['name']}: task.answers needs the model config's "
                "decoder_start_token_id and pad_token_id"
            )
        length = max(len(target) for target in targets)
        padded = torch.tensor([target + [config.pad_token_id] * (length - len(target)) for target in targets])
        mask = torch.tensor([[1] * len(target) + [0] * (length - len(target)) for target in targets])
        start = padded.new_full((len(targets), 1), config.decoder_start_token_id)
        self.register_buffer("answer_targets", padded, persistent=False)
        self.register_buffer("answer_mask", mask, persistent=False)
        self.register_buffer("answer_inputs", torch.cat([start, padded[:, :-1]], dim=1), persistent=False)

    def setup(self, stage: str) -> None:
        """Before fitting: start from `init_from` (model weights, and the pruner's if it has any)."""
        if stage == "fit" and self.hparams["init_from"]:
            self.load_weights(self.hparams["init_from"])

    def load_weights(self, path: str) -> None:
        """Load `model.*` (strict) and `pruner.*` (when both sides have them) from a checkpoint (safely)."""
        checkpoint = read_checkpoint(path)
        assert_same_backbone(checkpoint.get("hyper_parameters", {}), self.hparams["backbone"])
        state = checkpoint["state_dict"]
        self.model.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
        pruner_state = {k[len("pruner.") :]: v for k, v in state.items() if k.startswith("pruner.")}
        if self.pruner is not None and pruner_state:
            self.pruner.load_state_dict(pruner_state)

    def build_pruner(self, spec: Mapping[str, Any] | None) -> TokenPruner | None:
        """A pruner config (`conf/pruner/*.yaml` node) built for this backbone and task."""
        return build_pruner(
            spec, self.adapter.num_layers, int(self.hparams["task"]["max_length"]), self.adapter.num_heads
        )

    # ----------------------------------------------------------------- forward and loss
    def forward(
        self, batch: Mapping[str, Tensor], pruner: TokenPruner | None = None, **engine: Any
    ) -> tuple[Tensor, EncoderOutput]:
        """Logits and the engine output for a tokenized batch, pruned by `pruner`.

        Token-level tasks get Drop-and-Restore: full-length outputs, one logit row per input token.
        Causal LM: next-token logits at every position (`lm_restore`) or at the surviving ones
        (`out.positions`); `targets` gives the labels aligned with them. Seq2seq: the answers'
        log-likelihoods (`rank_answers`), one logit per class.
        """
        out = self.encoder(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
            pruner=pruner,
            restore=self.token_level or (self.causal_lm and self.hparams["lm_restore"]),
            **engine,
        )
        if self.decoder_logits is not None:  # the decoder runs the same way in stock_logits
            return self.rank_answers(out.hidden, out.mask), out
        head = self.lm_logits or (self.adapter.token_logits if self.token_level else self.adapter.classify)
        with pass_kernels(out.hidden.device).modules():  # the kernel stock_logits gives the stock head
            return head(out.hidden), out

    def rank_answers(self, hidden: Tensor, mask: Tensor, decode: Callable[..., Tensor] | None = None) -> Tensor:
        """Rank classification: (B, C) summed log-likelihoods of each answer's tokens under the
        decoder, which cross-attends to the kept encoder tokens `hidden` (real slots: `mask`), all
        (example, answer) pairs in one decoder pass. `decode` defaults to the adapter's
        `decoder_logits` (engine outputs)."""
        decode = decode or self.decoder_logits
        assert decode is not None
        batch, classes = hidden.shape[0], self.answer_targets.shape[0]
        logits = decode(
            hidden.repeat_interleave(classes, dim=0),
            mask.repeat_interleave(classes, dim=0),
            self.answer_inputs.repeat(batch, 1),
            self.answer_mask.repeat(batch, 1),
        )
        targets = self.answer_targets.repeat(batch, 1)
        tokens = logits.float().log_softmax(dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        return (tokens * self.answer_mask.repeat(batch, 1)).sum(dim=-1).view(batch, classes)

    def stock_logits(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The stock HF model's logits for `batch`, no engine: the reference every throughput
        figure is measured against, its linear layers on the kernel an engine pass would use
        (engine/kernels.py). Seq2seq: the HF encoder, then the same answer ranking."""
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        kernels = pass_kernels(inputs["input_ids"].device)
        if self.decoder_logits is None:
            cache = {"use_cache": False} if self.causal_lm else {}  # engine passes build no KV cache either
            with stock_linears(self.model, kernels):
                return self.model(**inputs, **cache).logits
        mask = inputs["attention_mask"]
        with stock_linears(self.model.encoder, kernels):  # the decoder runs as in engine passes
            states = self.model.encoder(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        return self.rank_answers(states, mask.bool(), self.adapter.decode)

    def targets(self, batch: Mapping[str, Tensor], out: EncoderOutput) -> Tensor:
        """Labels aligned with `forward`'s logits: the batch's labels, or for causal LM the label
        of the position after each output slot (-100, ignored: after the last position, before
        padding, on padded or eliminated slots)."""
        labels = batch["labels"]
        if not self.causal_lm:
            return labels
        ignored = labels.new_full((labels.shape[0], 1), -100)
        following = torch.cat([labels[:, 1:].masked_fill(~batch["attention_mask"][:, 1:].bool(), -100), ignored], 1)
        return following.gather(1, out.positions).masked_fill(~out.mask, -100)

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """MSE (regression) or cross-entropy averaged over the labelled positions; 0 for a batch with
        none (one-token LM examples, an all-ignored token-level batch), where the mean is NaN."""
        if self.regression:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        total = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")
        return total / (labels != -100).sum().clamp(min=1)

    def update_metrics(self, metrics: MetricCollection, logits: Tensor, labels: Tensor) -> None:
        """Task metrics on predictions; token-level tasks skip sub-word/special positions (-100);
        causal LM: the logits themselves (perplexity, in float32), ignoring -100."""
        if self.causal_lm:
            metrics.update(logits.float(), labels)
            return
        if self.regression:
            metrics.update(logits.squeeze(-1), labels)
            return
        predictions = logits.argmax(dim=-1)
        if self.token_level:
            scored = labels != -100
            predictions, labels = predictions[scored], labels[scored]
        metrics.update(predictions, labels)

    # ----------------------------------------------------------------- evaluation
    def _evaluate(self, batch: Mapping[str, Tensor], metrics: MetricCollection, stats: PruningStats) -> Tensor:
        logits, out = self(batch, pruner=self.pruner)
        labels = self.targets(batch, out)
        self.update_metrics(metrics, logits, labels)
        stats.update(out.trace, batch["attention_mask"].sum(dim=1))
        return self.task_loss(logits, labels)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        loss = self._evaluate(batch, self.val_metrics, self.val_stats)
        self.log("val/loss", loss, batch_size=batch["labels"].shape[0], sync_dist=True)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        """Lightning's test loop runs on the report split; its metrics are logged as `report/*`."""
        loss = self._evaluate(batch, self.report_metrics, self.report_stats)
        self.log("report/loss", loss, batch_size=batch["labels"].shape[0], sync_dist=True)
        if self.pruner is not None and self.hparams["compare_unpruned"]:
            logits, out = self(batch)
            self.update_metrics(self.report_unpruned_metrics, logits, self.targets(batch, out))

    def _log_epoch(self, stage: str, metrics: MetricCollection, stats: PruningStats, *extra: MetricCollection) -> None:
        values = {**metrics.compute(), **{f"{stage}/{k}": v for k, v in stats.compute().items()}}
        for collection in extra:
            if any(metric.update_called for metric in collection.values()):
                values.update(collection.compute())
                collection.reset()
        # compute() already gathered every rank's state; sync_dist marks these epoch values as global
        self.log_dict({k: v.float() for k, v in values.items()}, sync_dist=True)
        metrics.reset()
        stats.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_metrics, self.val_stats)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("report", self.report_metrics, self.report_stats, self.report_unpruned_metrics)

    # ----------------------------------------------------------------- optimization
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups: weight decay on matrices, none on biases/LayerNorms. Methods add groups."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                (no_decay if parameter.ndim < 2 else decay).append(parameter)
        return [
            {"params": decay, "weight_decay": self.hparams["optimizer"].get("weight_decay", 0.0)},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """`optimizer` and `scheduler` are `_partial_` configs: optimizer(groups), scheduler(optimizer, total_steps)."""
        optimizer = instantiate(self.hparams["optimizer"])(self.parameter_groups())
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = instantiate(self.hparams["scheduler"])(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert_same_backbone(checkpoint.get("hyper_parameters", {}), self.hparams["backbone"])


def check_task_backbone(task: Mapping[str, Any], backbone: Mapping[str, Any]) -> None:
    """`task.kind` matches `backbone.head`; `task.answers` (rank classification, one answer string
    per class) is set exactly when the backbone is a seq2seq LM. Checked before anything loads."""
    kind = task.get("kind", "classification")
    check_choice("task.kind", kind, TASK_KINDS)
    head = backbone.get("head", "classification")
    name, answers = backbone.get("name"), task.get("answers")
    heads = SEQUENCE_HEADS if kind == "classification" and not task.get("token_level") else (kind,)
    if head not in heads:
        what = f"task.kind={kind}" + (" with task.token_level=true" if task.get("token_level") else "")
        raise ValueError(f"{what} needs a backbone with head {' or '.join(heads)}; backbone={name} has head {head}")
    if head != "seq2seq_lm":
        if answers is not None:
            raise ValueError(
                f"task.answers={answers} ranks answer strings with a seq2seq backbone (head seq2seq_lm, e.g. "
                f"backbone=flan_t5_base or tiny_t5); backbone={name} has head {head}: leave task.answers unset"
            )
        return
    labels = task.get("num_labels")
    if answers is None:
        raise ValueError(
            f"backbone={name} (head seq2seq_lm) classifies by ranking answer strings: set task.answers to one "
            f"string per class (task.num_labels={labels}), e.g. task=rt_sentiment_rank or "
            "'+task.answers=[negative,positive]'"
        )
    if (
        not isinstance(answers, list)
        or not all(isinstance(answer, str) and answer.strip() for answer in answers)
        or len(answers) != labels
        or labels < 2
    ):
        raise ValueError(
            f"task.answers={answers!r} must be a list of task.num_labels={labels} non-empty strings, one per class "
            "(at least two: rank classification cannot regress)"
        )


def check_task_kind(module: type[TokenPruningModule], task: Mapping[str, Any], backbone: Mapping[str, Any]) -> bool:
    """`task.kind` and a seq2seq backbone are ones the method supports, and the task fits the
    backbone (`check_task_backbone`); True for causal LM."""
    kind = task.get("kind", "classification")
    check_choice("task.kind", kind, TASK_KINDS)
    if kind not in module.task_kinds:
        raise ValueError(
            f"task.kind={kind} is not supported by {module.__name__} (it supports: {', '.join(module.task_kinds)})"
        )
    if backbone.get("head") == "seq2seq_lm" and not module.seq2seq:
        raise ValueError(
            f"backbone={backbone.get('name')} (head seq2seq_lm) is not supported by {module.__name__}; "
            "use module=finetune or module=acc"
        )
    check_task_backbone(task, backbone)
    return kind == "causal_lm"
