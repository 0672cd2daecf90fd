"""LightningDataModule for sequence classification/regression tasks with dynamic padding, and for
causal language modelling on packed fixed-length blocks; the answer strings of rank
classification by a seq2seq model, tokenized."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import (
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    default_data_collator,
)

from tokenprune.checks import check_choice
from tokenprune.data.sampler import BucketShuffleSampler, OffsetBatchSampler, ResumableLoader
from tokenprune.data.sources import SPLITS

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")
# task.kind: `classification` (sequence or, with token_level, token labels) or `causal_lm`.
TASK_KINDS = ("classification", "causal_lm")
# The splits each Lightning stage reads, prepared by setup(stage): training reports on `report` after fitting.
STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": SPLITS,
    "validate": ("val",),
    "test": ("report",),
    "predict": ("report",),
}


def end_of_text_id(tokenizer: PreTrainedTokenizerBase, setting: str) -> int:
    """The token that ends a text: the tokenizer's eos, else its sep (WordPiece tokenizers)."""
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if token is None:
        raise ValueError(
            f"backbone.tokenizer ({type(tokenizer).__name__}) has neither an eos nor a sep token to end {setting}"
        )
    return int(token)


def answer_token_ids(tokenizer: str, answers: Sequence[str]) -> list[list[int]]:
    """Decoder targets of rank classification: each answer string's tokens (no special tokens)
    followed by the end-of-text token, as a seq2seq target is tokenized (T5: `</s>`)."""
    loaded = AutoTokenizer.from_pretrained(tokenizer)
    end = end_of_text_id(loaded, "each of task.answers")
    targets = [[*loaded(answer, add_special_tokens=False)["input_ids"], end] for answer in answers]
    for index, target in enumerate(targets):
        if target in targets[:index]:
            raise ValueError(
                f"task.answers={list(answers)}: {answers[index]!r} tokenizes like an earlier answer, "
                "so the two classes could never be told apart"
            )
    return targets


def first_subword_labels(word_ids: list[int | None], tags: list[int]) -> list[int]:
    """Word labels on each word's first sub-word; -100 (ignored) on the rest and on specials."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(-100 if word is None or word == previous else tags[word])
        previous = word
    return labels


class TaskDataModule(L.LightningDataModule):
    """Tokenizes a task source (train / val / report) and serves padded batches; sequence
    tasks (one text or a pair) or, with `token_level`, word-list tasks (e.g. NER).

    Validation runs on `val`, Lightning's test loop on `report`. Training batches are length-bucketed and
    shuffled per epoch from `seed`; evaluation batches are sorted by length. Both keep padding,
    and with it wasted work, small (per-example pruning keeps its speedup).

    `kind=causal_lm`: each split's texts are packed into blocks of `max_length` tokens without
    padding (`pack_blocks`), labels = input ids (the module shifts them).
    """

    def __init__(
        self,
        source: Callable[[], DatasetDict],
        tokenizer: str,
        text_columns: Sequence[str],
        max_length: int,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        label_column: str = "label",
        seed: int = 0,
        token_level: bool = False,
        num_labels: int | None = None,
        kind: str = "classification",
    ) -> None:
        super().__init__()
        check_choice("task.kind", kind, TASK_KINDS)
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} and data.eval_batch_size={eval_batch_size} must be >= 1")
        if not 1 <= len(text_columns) <= 2:
            raise ValueError(f"task.text_columns={list(text_columns)} must name one column or a pair")
        self.source = source
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.text_columns = list(text_columns)
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.label_column = label_column
        self.seed = seed
        self.token_level = token_level
        self.num_labels = num_labels
        if token_level and len(self.text_columns) != 1:
            raise ValueError(f"token-level task.text_columns={self.text_columns} must name one column of word lists")
        self.kind = kind
        if kind == "causal_lm" and (token_level or len(self.text_columns) != 1):
            raise ValueError(
                f"task.kind=causal_lm needs one text column and no token_level; got "
                f"task.text_columns={self.text_columns}, task.token_level={token_level}"
            )
        self.raw: DatasetDict | None = None
        self._splits: dict[str, Dataset] = {}
        self._lengths: dict[str, list[int]] = {}
        self.collate: Callable = (
            default_data_collator
            if kind == "causal_lm"
            else DataCollatorForTokenClassification(self.tokenizer)
            if token_level
            else DataCollatorWithPadding(self.tokenizer)
        )

    def setup(self, stage: str | None = None) -> None:
        """Load the task source, check every split's columns and labels, and prepare the splits
        `stage` reads (STAGE_SPLITS; None: all); any other split is prepared on first use, so a
        bench or a search never tokenizes the training split. `fit` prepares all three, the
        report split included: a training run reports on it, and a bad one fails before training."""
        if self.raw is None:
            raw = self.source()
            missing = [name for name in SPLITS if name not in raw]
            if missing:
                raise ValueError(f"task source returned splits {list(raw)}; missing {missing}")
            self._check_columns(raw["train"])
            if self.kind != "causal_lm":
                for name in SPLITS:
                    self._check_labels(raw[name], name)
            self.raw = raw
        for name in STAGE_SPLITS.get(stage, SPLITS):
            self.split(name)

    def split(self, name: str) -> Dataset:
        """Split `name` tokenized (packed into blocks for causal LM), made on first use."""
        assert self.raw is not None, "call setup() first"
        if name not in self._splits:
            prepare = self._pack if self.kind == "causal_lm" else self._tokenize
            self._splits[name] = prepare(self.raw[name], name)
        return self._splits[name]

    def split_lengths(self, name: str) -> list[int]:
        """Tokens per example of split `name`, in its order (evaluation splits: longest first)."""
        self.split(name)
        return self._lengths[name]

    def _check_columns(self, split: Dataset) -> None:
        """The task's text columns (and label column, but for causal LM) are the source's."""
        needed = {f"task.text_columns={list(self.text_columns)}": list(self.text_columns)}
        if self.kind != "causal_lm":
            needed[f"task.label_column={self.label_column}"] = [self.label_column]
        for setting, columns in needed.items():
            missing = [column for column in columns if column not in split.column_names]
            if missing:
                raise ValueError(f"{setting}: the task source has no column {missing}; it has {split.column_names}")

    def _check_labels(self, split: Dataset, name: str) -> None:
        """Classification labels must lie in [0, task.num_labels) (token tasks: -100 marks ignored words)."""
        if self.num_labels is None or self.num_labels == 1:  # regression: any real number
            return
        for row, label in enumerate(split[self.label_column]):
            values = label if self.token_level else [label]
            if any(not isinstance(v, int) or not 0 <= v < self.num_labels for v in values if v != -100):
                raise ValueError(
                    f"{name} split row {row} has label {label!r} outside [0, {self.num_labels}) "
                    f"(task.num_labels={self.num_labels}); row: {dict(split[row])}"
                )

    def _tokenize(self, split: Dataset, name: str) -> Dataset:
        """Tokenize without padding; evaluation splits are sorted longest first."""
        columns = self.text_columns

        def encode(batch: dict) -> dict:
            if self.token_level:
                encoded = self.tokenizer(
                    batch[columns[0]], is_split_into_words=True, truncation=True, max_length=self.max_length
                )
                encoded["labels"] = [
                    first_subword_labels(encoded.word_ids(i), tags) for i, tags in enumerate(batch[self.label_column])
                ]
            else:
                texts = [[text or "" for text in batch[column]] for column in columns]
                encoded = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
                encoded["labels"] = batch[self.label_column]
            encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
            return encoded

        encoded = split.map(encode, batched=True, remove_columns=split.column_names, desc="tokenizing")
        if name != "train":
            encoded = encoded.sort("length", reverse=True)
        self._lengths[name] = list(encoded["length"])
        encoded.set_format("torch", columns=[name for name in MODEL_INPUTS if name in encoded.column_names])
        return encoded

    def _pack(self, split: Dataset, name: str) -> Dataset:
        """Causal-LM blocks (the GPT-2 recipe: stride = block length): every text tokenized
        without special tokens and followed by the tokenizer's end-of-text token (eos, else sep),
        all concatenated in split order and cut into blocks of `max_length` tokens; the short tail
        is dropped, so no block has padding. labels = input_ids. Empty and blank texts (a third of
        WikiText's lines) are skipped: they would fill the stream with end-of-text runs."""
        separator = end_of_text_id(self.tokenizer, "each text of a task.kind=causal_lm task")
        texts = [text for text in split[self.text_columns[0]] if text and not text.isspace()]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        stream = np.fromiter((t for ids in encoded for t in (*ids, separator)), dtype=np.int64)
        blocks = len(stream) // self.max_length
        if blocks == 0:
            raise ValueError(
                f"the {name} split has {len(stream)} tokens, fewer than one block of task.max_length={self.max_length}"
            )
        ids = stream[: blocks * self.max_length].reshape(blocks, self.max_length)
        packed = Dataset.from_dict({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids})
        self._lengths[name] = [self.max_length] * blocks
        packed.set_format("torch")
        return packed

    def eval_dataloader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """Split `split` in its stored (length-sorted) order, in batches of `batch_size`
        (None: eval_batch_size)."""
        return DataLoader(
            self.split(split),
            batch_size=batch_size or self.eval_batch_size,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self, shard: bool = True) -> DataLoader:
        """The training batches of this process (under DDP: its share), or with `shard=False` all
        of them (one pass over the whole split: ACC's profile, head importance)."""
        train = self.split("train")
        order = BucketShuffleSampler(self.split_lengths("train"), self.batch_size, seed=self.seed, shard=shard)
        batches = OffsetBatchSampler(order, self.batch_size, drop_last=False)
        return ResumableLoader(train, batch_sampler=batches, collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("report")
