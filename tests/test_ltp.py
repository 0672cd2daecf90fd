"""Learned Token Pruning: thresholds learn, hard mode removes tokens per example, stages chain."""

from __future__ import annotations

import json

import pytest
import torch
from apps import FAST, compose_app, run_cli
from conftest import random_batch, tiny_model
from hydra.utils import instantiate

from tokenprune.apps.train import train, train_stages
from tokenprune.engine import PrunableEncoder
from tokenprune.pruners.ltp import LTPPruner


def test_soft_mask_gradients_reach_the_thresholds():
    _, adapter = tiny_model("bert")
    pruner = LTPPruner(adapter.num_layers, final_threshold=0.05, temperature=1e-2, reference_length=24, soft=True)
    ids, mask = random_batch()
    out = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
    penalty = sum((t.soft_mask * t.score_mask).sum() for t in out.trace)
    (adapter.classify(out.hidden).sum() + penalty).backward()
    assert pruner.offset.grad is not None and (pruner.offset.grad != 0).all()
    assert out.hidden.shape[1] == ids.shape[1], "the soft stage removes nothing"


def test_soft_masks_ignore_padding_and_keep_cls():
    _, adapter = tiny_model("bert")
    pruner = LTPPruner(adapter.num_layers, final_threshold=0.5, reference_length=24, soft=True)
    ids, mask = random_batch()
    with torch.no_grad():
        out = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
    for layer in out.trace:
        assert (layer.soft_mask[~mask.bool()] == 0).all()
        assert (layer.soft_mask[:, 0] == 1).all()


def test_hard_mode_shortens_tensors_per_example():
    _, adapter = tiny_model("bert")
    pruner = LTPPruner(adapter.num_layers, final_threshold=0.125, reference_length=24)  # layer 1: 1/24 = mean score
    ids, mask = random_batch(batch=4, length=24)
    with torch.no_grad():
        out = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
    kept = torch.stack([t.n_out for t in out.trace])
    assert (kept[1] < mask.sum(dim=1)).all(), "every example lost tokens at layer 1"
    fractions = (kept[1] / mask.sum(dim=1)).tolist()
    assert len(set(fractions)) == 4, "each example keeps its own share of tokens (not a fixed ratio)"
    assert out.hidden.shape[1] == int(kept[-1].max()) < ids.shape[1]
    assert (kept[1:] <= kept[:-1]).all()


def test_zero_thresholds_reproduce_unpruned_logits():
    model, adapter = tiny_model("bert")
    pruner = LTPPruner(adapter.num_layers, final_threshold=0.0, reference_length=24)
    ids, mask = random_batch()
    with torch.no_grad():
        got = adapter.classify(PrunableEncoder(adapter)(ids, mask, pruner=pruner).hidden)
        expected = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_threshold_removing_everything_still_keeps_cls():
    _, adapter = tiny_model("bert")
    pruner = LTPPruner(adapter.num_layers, final_threshold=1.0, reference_length=24)
    with torch.no_grad():
        pruner.offset.fill_(1.0)
        ids, mask = random_batch()
        out = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
        logits = adapter.classify(out.hidden)
    assert out.hidden.shape[1] == 1 and (out.positions[:, 0] == 0).all()
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruner.temperature=0", "pruner.temperature=0"),
        ("pruner.final_threshold=1.5", r"pruner.final_threshold=1.5 is outside the allowed range \[0.0, 1.0\]"),
        ("module.mask_penalty=-0.1", r"module.mask_penalty=-0.1 is outside the allowed range \[0.0, inf\]"),
        ("module.stage=hard", "module.stage=hard needs module.init_from"),
        ("module.stage=medium", "module.stage=medium is not one of: finetune, soft, hard"),
    ],
)
def test_bad_ltp_settings_are_refused(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train(compose_app("train", [*FAST, "pruner=ltp", "module=ltp", override], tmp_path / "bad"))
    assert not list((tmp_path / "bad").rglob("*.ckpt"))


def test_experiment_runs_finetune_soft_hard_back_to_back(tmp_path):
    overrides = [*FAST, "experiment=ltp", "pruner.final_threshold=0.05", "module.threshold_lr=0.05"]
    cfg = compose_app("train", overrides, tmp_path / "ltp")
    results = train_stages(cfg, overrides)
    stages = results["stages"]
    assert list(stages) == ["finetune", "soft", "hard"]
    soft_ckpt = torch.load(stages["soft"]["last_checkpoint"], weights_only=False)
    hard_ckpt = torch.load(stages["hard"]["last_checkpoint"], weights_only=False)
    assert hard_ckpt["hyper_parameters"]["init_from"] == stages["soft"]["last_checkpoint"]
    assert soft_ckpt["hyper_parameters"]["init_from"] == stages["finetune"]["last_checkpoint"]
    offset = "pruner.offset"
    assert (soft_ckpt["state_dict"][offset] != 0).any(), "thresholds moved in the soft stage"
    torch.testing.assert_close(hard_ckpt["state_dict"][offset], soft_ckpt["state_dict"][offset])
    assert results["report"]["report/flops_ratio"] < 1.0
    assert json.loads((tmp_path / "ltp" / "results.json").read_text())["stages"]["hard"]["report"] == results["report"]


def test_cli_runs_soft_and_hard_from_a_finetuned_checkpoint(tmp_path):
    """The documented command: experiment=ltp 'stages=${ltp_stages_from_finetuned}' module.init_from=...,
    as the sweeps run it: a multirun logging to W&B (which reads the sweep's overrides unresolved)."""
    finetuned = train(compose_app("train", FAST, tmp_path / "finetune"))["last_checkpoint"]
    args = [
        "-m",
        *FAST,
        "logger=wandb",
        "experiment=ltp",
        "stages=${ltp_stages_from_finetuned}",
        f"module.init_from={finetuned}",
        "run_name=ltp",
        f"paths.root={tmp_path}",
    ]
    done = run_cli("tokenprune.apps.train", args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(tmp_path.glob("multirun/*/0-ltp/results.json")).read_text())
    assert list(results["stages"]) == ["soft", "hard"]
    soft = torch.load(results["stages"]["soft"]["last_checkpoint"], weights_only=False)
    assert soft["hyper_parameters"]["init_from"] == finetuned


def test_reference_penalty_skips_layer_zero_and_counts_padded_positions(tmp_path):
    """experiment=ltp_reference: layer 0 is never masked or penalised; the penalty's mean runs over
    B x task.max_length positions, padding counting sigmoid(-theta/T) (DESIGN.md s.5)."""
    from hydra.utils import instantiate

    overrides = [*FAST, "experiment=ltp_reference", "task.max_length=40", "pruner.final_threshold=0.01"]
    module = instantiate(compose_app("train", overrides, tmp_path / "m").module)
    pruner = module.pruner
    pruner.soft = True
    ids, mask = random_batch(batch=4, length=24)
    out = module.encoder(ids, mask, pruner=pruner)
    assert out.trace[0].soft_mask is None and all(t.soft_mask is not None for t in out.trace[1:])
    padded = module.mask_penalty(out.trace)
    padded.backward()
    assert pruner.offset.grad[0] == 0 and (pruner.offset.grad[1:] != 0).all()
    real = sum((t.soft_mask * t.score_mask).sum() / t.score_mask.sum() for t in out.trace[1:])
    module.hparams["penalty_positions"] = "real"
    torch.testing.assert_close(module.mask_penalty(out.trace), real)
    gap = 4 * 40 - mask.sum()  # padding plus the positions up to task.max_length
    expected = sum(
        ((t.soft_mask * t.score_mask).sum() + gap * torch.sigmoid(-pruner.thresholds[i] / pruner.temperature))
        / (4 * 40)
        for i, t in enumerate(out.trace)
        if i > 0
    )
    torch.testing.assert_close(padded, expected)


def test_retrained_topk_baseline_trains_with_pruning_from_the_finetuned_start(tmp_path):
    """experiment=retrained_baseline: the LTP paper's top-k baseline (first max(3, ceil(0.15 L))
    layers unpruned, here all but the last of 3), retrained pruned after fine-tuning."""
    overrides = [*FAST, "experiment=retrained_baseline", "pruner=topk", "pruner.start_layer=null", "epochs.pruned=1"]
    results = train_stages(compose_app("train", overrides, tmp_path / "rb"), overrides)
    stages = results["stages"]
    assert list(stages) == ["finetune", "pruned"]
    pruned = torch.load(stages["pruned"]["last_checkpoint"], weights_only=True)
    finetuned = torch.load(stages["finetune"]["last_checkpoint"], weights_only=True)
    assert pruned["hyper_parameters"]["init_from"] == stages["finetune"]["last_checkpoint"]
    assert pruned["hyper_parameters"]["train_pruned"] and not finetuned["hyper_parameters"]["train_pruned"]
    assert 0.5 < results["report"]["report/flops_ratio"] < 1.0


@pytest.mark.parametrize(
    ("overrides", "thresholds_trained"),
    [
        (["module=finetune", "pruner=none"], None),
        (["module=ltp", "pruner=ltp", "module.stage=soft", "module.threshold_lr=0.05"], True),
        (["module=ltp", "pruner=ltp", "module.stage=hard"], False),
    ],
    ids=["finetune", "ltp-soft", "ltp-hard"],
)
def test_optimizer_groups_cover_each_trained_parameter_once(tmp_path, overrides, thresholds_trained):
    """Weight decay on the model's matrices only (biases, LayerNorm and embeddings' 1-d weights
    none); LTP's soft stage trains the threshold offsets in their own group at threshold_lr, the
    hard stage freezes them."""
    cfg = compose_app("train", [*FAST, *overrides, "module.optimizer.weight_decay=0.01"], tmp_path / "run")
    module = instantiate(cfg.module)
    groups = module.parameter_groups()
    grouped = [id(p) for group in groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter in two groups"
    trained = {id(p) for p in module.parameters() if p.requires_grad}
    assert set(grouped) == trained
    decayed = {id(p) for group in groups if group["weight_decay"] > 0 for p in group["params"]}
    assert decayed == {id(p) for p in module.model.parameters() if p.ndim >= 2}
    assert all(group["weight_decay"] in (0.0, 0.01) for group in groups)
    if thresholds_trained is not None:
        offset = module.pruner.offset
        assert (id(offset) in trained) is thresholds_trained
        if thresholds_trained:
            (group,) = [group for group in groups if any(p is offset for p in group["params"])]
            assert group["lr"] == 0.05 and group["weight_decay"] == 0.0 and len(group["params"]) == 1
