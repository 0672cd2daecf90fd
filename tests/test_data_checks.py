"""Data settings refused before any work, the source's columns checked, causal-LM packing of
blank lines and WikiText's own validation split, HTML e-mail bodies' style and script text."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from apps import FAST, compose_app
from datasets import Dataset, DatasetDict
from hydra.utils import instantiate

from tokenprune.apps.train import train, validate
from tokenprune.data.mail import mail_text
from tokenprune.data.sampler import BucketShuffleSampler


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+task.source.val_fraction=0"], r"task.source.val_fraction=0 is outside the allowed range \(0.0, 1.0\)"),
        (["+task.source.report_fraction=1"], r"task.source.report_fraction=1 is outside the allowed range"),
        (
            ["+task.source.val_fraction=0.5", "+task.source.report_fraction=0.5"],
            r"task.source.val_fraction=0.5 \+ task.source.report_fraction=0.5 must be below 1",
        ),
        (["+task.source.val_fracton=0.2"], r"task.source \(tokenprune.data.sources.rt_sentiment\): .*'val_fracton'"),
        (
            ["backbone=tiny_t5", "task=rt_sentiment_rank", "+task.source.column=sentence"],
            r"task.source.column \(the column the prompt fills\)=sentence is not one of: text",
        ),
        (["+trainer.use_distributed_sampler=true"], r"trainer.use_distributed_sampler=true is not allowed"),
    ],
)
def test_bad_data_settings_are_refused_before_anything_loads(tmp_path, overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        train(compose_app("train", [*FAST, *overrides], tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["task.text_columns=[sentence]"],
            r"task.text_columns=\['sentence'\]: the task source has no column \['sentence'\]",
        ),
        (
            ["+task.label_column=sentiment"],
            r"task.label_column=sentiment: the task source has no column \['sentiment'\]",
        ),
    ],
)
def test_columns_the_source_lacks_are_named_with_the_ones_it_has(tmp_path, overrides, message):
    data = instantiate(compose_app("train", [*FAST, *overrides], tmp_path / "run").data)
    with pytest.raises(ValueError, match=rf"{message}; it has \['text', 'label'\]"):
        data.setup()


def test_wikitext_reads_its_own_validation_split_and_packs_no_blank_lines(tmp_path):
    """WikiText's validation split (in order) is the val split, its test split the report split;
    blank lines (a third of WikiText's) add no end-of-text runs to the packed stream."""
    local = tmp_path / "wikitext"
    words = {
        split: [f" {split} line {i} about valkyria chronicles . " for i in range(40)]
        for split in ("train", "validation", "test")
    }
    splits = {split: [text for line in lines for text in ("", line, " \n")] for split, lines in words.items()}
    DatasetDict({split: Dataset.from_dict({"text": texts}) for split, texts in splits.items()}).save_to_disk(local)
    cfg = compose_app(
        "train",
        ["backbone=tiny_gpt2", "task=wikitext103", "task.max_length=16", f"task.source.local_path={local}"],
        tmp_path / "run",
    )
    data = instantiate(cfg.data)
    data.setup()
    separator = data.tokenizer.eos_token_id or data.tokenizer.sep_token_id  # end of each text
    for name, split in (("train", "train"), ("val", "validation"), ("report", "test")):
        stream = data.split(name)["input_ids"][:].flatten().tolist()
        expected = [
            t
            for line in words[split]
            for t in (*data.tokenizer(line, add_special_tokens=False)["input_ids"], separator)
        ]
        assert stream == expected[: len(stream)] and len(expected) - len(stream) < 16


def test_style_and_script_text_of_html_bodies_is_kept_unless_dropped():
    html = (
        b"Subject: offer\r\nContent-Type: text/html\r\n\r\n<html><head><style>p { color: red }</style>"
        b"<script type='text/javascript'>track();</script></head><body><p>Buy now</p></body></html>"
    )
    assert mail_text(html) == "offer p { color: red }track();Buy now"
    assert mail_text(html, drop_style_script=True) == "offer Buy now"


def test_a_split_with_fewer_batches_than_ranks_is_refused_naming_the_batch_size(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    assert len(BucketShuffleSampler([5] * 10, batch_size=2).batches()) == 1  # 5 batches: 4 used, one each
    with pytest.raises(ValueError, match=r"3 batch\(es\) of data.batch_size=4 for 4 DDP processes"):
        BucketShuffleSampler([5] * 10, batch_size=4).batches()


def test_a_capped_evaluation_split_is_flagged_as_its_longest_examples(tmp_path, caplog):
    cfg = compose_app("train", [*FAST, "trainer.limit_test_batches=0.5", "trainer.limit_val_batches=null"], tmp_path)
    with caplog.at_level("WARNING", logger="tokenprune.apps.train"):
        validate(cfg)
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith("trainer.limit_test_batches=0.5: evaluation batches are sorted longest first")
    assert "the report split's numbers come from its longest examples" in warning
