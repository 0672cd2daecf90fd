"""Sweeps as W&B users see them: one run per job and stage, grouped, typed, tagged, linked to the
training run; every multirun aggregated into a table and Pareto fronts; the offline report.
The W&B checks read the offline run files back (tests/wandb_files.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from apps import FAST, compose_app, run_cli
from omegaconf import OmegaConf
from PIL import Image
from wandb_files import runs_under

from tokenprune.apps.bench import measure_and_write
from tokenprune.apps.options import GROUP_ENV
from tokenprune.apps.report import sweep_mode, wandb_report
from tokenprune.apps.search import run_search
from tokenprune.apps.train import train

WANDB_FAST = [o for o in FAST if o != "logger=csv"] + ["logger=wandb"]


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    args = ["-m", *WANDB_FAST, "pruner=none,topk,random", f"paths.root={root}"]
    done = run_cli("tokenprune.apps.train", args, root)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (root / "multirun").iterdir()
    return sweep


def test_basic_launcher_multirun_logs_one_wandb_run_per_job_in_one_group(basic_sweep):
    runs = runs_under(basic_sweep)
    trains = [r for r in runs if r.job_type == "train"]
    assert len(trains) == 3 and len({r.id for r in trains}) == 3
    assert {r.group for r in runs} == {f"train-{basic_sweep.name}"}
    assert sorted(r.name for r in trains) == [
        f"tiny-rt_sentiment-{p}-s42[pruner={p}]" for p in ("none", "random", "topk")
    ]
    for run in trains:
        pruner = run.name.split("[pruner=")[1].rstrip("]")
        assert set(run.tags) == {"backbone:tiny", "task:rt_sentiment", f"pruner:{pruner}", "method:finetune"}
        assert run.config["run_name"] == run.name.split("[")[0]  # its own job's settings, not the first job's
        reported = [row for row in run.history if "report/accuracy" in row]
        result = json.loads(next(basic_sweep.glob(f"*-{run.config['run_name']}/results.json")).read_text())
        assert len(reported) == 1 and reported[0]["report/accuracy"] == pytest.approx(
            result["report"]["report/accuracy"]
        )
    for log in sorted(basic_sweep.glob("*/train.log")):  # no terminal: progress as log lines
        text = log.read_text()
        assert "epoch 0 step 6/6 (global step 6): train/loss" in text
        assert "val/accuracy=" in text.split("epoch 0 validation: ")[1]


def test_multirun_aggregates_its_jobs_into_a_table_fronts_and_a_compare_run(basic_sweep):
    table = pd.read_csv(basic_sweep / "sweep.csv")
    assert sorted(table.pruner) == ["none", "random", "topk"] and set(table.kind) == {"train"}
    for row in table.itertuples():
        result = json.loads((basic_sweep / row.job / "results.json").read_text())["report"]
        assert row.score == pytest.approx(result["report/accuracy"])
        assert row.flops_ratio == pytest.approx(result["report/flops_ratio"])
    assert table.set_index("pruner").flops_ratio["none"] == pytest.approx(1.0)
    assert "## Pareto front per method" in (basic_sweep / "report.md").read_text()
    assert Image.open(basic_sweep / "fronts.png").size[0] > 300
    (compare,) = [r for r in runs_under(basic_sweep) if r.job_type == "compare"]
    assert compare.group == f"train-{basic_sweep.name}" and compare.history[0]["compare/sweep/nrows"] == 3


def test_report_writes_markdown_and_png_offline_and_builds_the_wandb_report(basic_sweep, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "tokenprune.apps.report", str(basic_sweep), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    markdown = (out / "report.md").read_text()
    assert "![fronts](fronts.png)" in markdown and markdown.count("tiny-rt_sentiment") >= 3
    assert (out / "fronts.png").stat().st_size > 10_000
    report = wandb_report(markdown, "tokenprune", f"train-{basic_sweep.name}", "someone")
    assert report.blocks[0].text == markdown
    assert report.blocks[1].runsets[0].filters == f"Group = 'train-{basic_sweep.name}'"


def test_experiment_stages_log_one_run_each_in_one_group(tmp_path):
    short = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    args = [*WANDB_FAST, *short, "experiment=length_adaptive", "module.num_sandwich=1", f"paths.root={tmp_path}"]
    done = run_cli("tokenprune.apps.train", args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = runs_under(tmp_path)
    assert sorted(r.name.rsplit("/", 1)[1] for r in runs) == ["finetune", "length_adaptive"]
    assert len({r.group for r in runs}) == 1 and runs[0].group.startswith(runs[0].name.rsplit("/", 1)[0])
    for run in runs:  # a stage's steps restart at 0: in one shared run they would go backwards
        steps = [row["trainer/global_step"] for row in run.history if "trainer/global_step" in row]
        assert steps and steps == sorted(steps) and max(steps) <= 3


def test_search_and_bench_runs_link_to_the_training_run_and_log_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv(GROUP_ENV, "study-1")
    trained = train(compose_app("train", [*WANDB_FAST, "pruner=topk", "log_artifacts=true"], tmp_path / "train"))
    (training,) = runs_under(tmp_path / "train")
    assert training.group == "study-1" and training.job_type == "train"
    assert "model" in [a.split(":")[0] for a in training.artifacts]
    monkeypatch.delenv(GROUP_ENV)  # later steps find the group through the checkpoint
    checkpoint = trained["last_checkpoint"]

    bench = ["logger=wandb", f"checkpoint={checkpoint}", "batch_sizes=[2]", "lengths=[16]", "warmup=0", "repeats=1"]
    measure_and_write(compose_app("bench", ["backbone=tiny", *bench], tmp_path / "bench"))
    (benched,) = runs_under(tmp_path / "bench")
    assert (benched.job_type, benched.group) == ("bench", "study-1")
    assert benched.config["training_run"]["wandb_id"] == training.id
    metrics = {k: v for row in benched.history for k, v in row.items()}
    assert isinstance(metrics["bench/b2_l16/engine_pruned/speedup"], float)
    assert metrics["bench/b2_l16/engine_pruned/flops_speedup"] > 1.0

    search = ["logger=wandb", "log_artifacts=true", f"checkpoint={checkpoint}", "search.values=[0.5,1.0]"]
    run_search(compose_app("search", search, tmp_path / "search"))
    (searched,) = runs_under(tmp_path / "search")
    assert (searched.job_type, searched.group) == ("search", "study-1")
    assert searched.config["training_run"]["run_dir"] == str(tmp_path / "train")
    assert "backbone:tiny" in searched.tags and "method:keep_ratio_grid" in searched.tags
    assert "search-cache" in [a.split(":")[0] for a in searched.artifacts]  # (tables are run_table artifacts)


def test_a_search_sweep_of_perplexity_keeps_the_lowest_scores(tmp_path):
    """A search job's settings name a checkpoint, not a task: its summary.json says min or max."""
    job = tmp_path / "0-acc_offline"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("checkpoint: lm.ckpt\nrun_name: acc_offline\n")
    (job / "summary.json").write_text('{"main_metric": "perplexity", "main_mode": "min"}')
    assert sweep_mode(tmp_path) == "min"


def test_methods_table_refuses_a_rerun_whose_fine_tuned_start_changed(tmp_path):
    """start/s<seed>.ckpt keys every method's runs (module.init_from): a rerun into the same folder
    whose fine-tune is another checkpoint (FINETUNE_EPOCHS changed) must stop, not reuse them.
    The apps are stubbed: this checks the script's own bookkeeping."""
    bin_dir, root = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    for app in ("tokenprune-train", "tokenprune-search", "tokenprune-table", "tokenprune-bench"):
        (bin_dir / app).write_text("#!/bin/bash\nexit 0\n")
        (bin_dir / app).chmod(0o755)
    old, new = tmp_path / "old.ckpt", tmp_path / "new.ckpt"
    old.touch()
    new.touch()
    for folder, checkpoint in (("t1", old), ("t2", new)):  # the first fine-tune, then the rerun's own
        job = root / "multirun" / folder / "0-unpruned-s1"
        job.mkdir(parents=True)
        (job / "results.json").write_text(json.dumps({"run_name": "unpruned-s1", "last_checkpoint": str(checkpoint)}))
    (root / "start").mkdir()
    (root / "start" / "s1.ckpt").symlink_to(old)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TOKENPRUNE_OUTPUTS": str(root)}
    script = Path(__file__).parents[1] / "sweeps" / "methods_table.sh"
    done = subprocess.run(
        ["bash", str(script)], env={**env, "SEEDS": "1", "METHODS": "ltp"}, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2 and f"not to this rerun's fine-tune {new}" in done.stderr, done.stderr
    assert (root / "start" / "s1.ckpt").resolve() == old, "the link is left as it was"


def test_methods_table_runs_end_to_end_and_a_rerun_does_nothing_again(tmp_path):
    """sweeps/methods_table.sh for real on the tiny backbone (one seed, top-k's post-hoc grid):
    fine-tune, search, table, the bench of the chosen point, results page; then the same command
    into the same folder reuses the fine-tune, skips the search and runs no bench again."""
    root, page = tmp_path / "out", tmp_path / "page.md"
    extra = "backbone=tiny logger=csv data.batch_size=16 trainer.limit_train_batches=4"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "TOKENPRUNE_OUTPUTS": str(root),
        "SEEDS": "1",
        "METHODS": "topk",
        "FINETUNE_EPOCHS": "1",
        "LEVELS": "0.9",  # the tiny model's top-k grid reaches 0.82x FLOPs at best
        "BENCH_WARMUP": "0",
        "BENCH_REPEATS": "2",
        "PAGE": str(page),
        "EXTRA": f"{extra} trainer.limit_val_batches=2 trainer.limit_test_batches=2",
    }
    script = Path(__file__).parents[1] / "sweeps" / "methods_table.sh"

    def sweep() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    first = sweep()
    assert first.returncode == 0, first.stderr[-3000:]
    table = pd.read_csv(root / "table" / "table.csv")
    assert table.method.tolist() == ["topk"] and table.level.tolist() == [0.9]
    assert table.flops_ratio[0] <= 0.9 and table.measured_speedup.notna().all(), "the chosen point was benched"
    benches = sorted((root / "bench").glob("*/*/bench.csv"))
    assert len(benches) == 1 and "| topk |" in page.read_text()
    bench_config = OmegaConf.load(benches[0].parent / ".hydra" / "config.yaml")
    assert (bench_config["warmup"], bench_config["repeats"]) == (0, 2), "BENCH_WARMUP/BENCH_REPEATS reached the bench"
    trained = sorted(root.glob("multirun/*/*/results.json"))

    again = sweep()
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted((root / "bench").glob("*/*/bench.csv")) == benches, "no bench ran again"
    assert len(list((root / "search").glob("topk-s1/*/front.csv"))) == 1, "the search was skipped"
    rerun = sorted(set(root.glob("multirun/*/*/results.json")) - set(trained))
    assert len(rerun) == 1 and "reused_by" in json.loads(rerun[0].read_text()), "the fine-tune was reused"
    assert pd.read_csv(root / "table" / "table.csv").equals(table)
    none_reached = run_cli(
        "tokenprune.apps.table", [str(root), "--levels", "0.3", "--out", str(tmp_path / "t")], tmp_path
    )
    assert none_reached.returncode == 0, none_reached.stderr[-3000:]
    assert "No method has a point at or below any of the levels" in (tmp_path / "t" / "table.md").read_text()
