"""tokenprune-train end to end on the tiny backbone: results, resume, bad input, no overwrites."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from apps import FAST, compose_app, report_lengths, run_cli, stock_report_scores, topk_flops_ratio
from hydra.errors import HydraException

import tokenprune.apps.train as train_app
from tokenprune.apps.table import training_points
from tokenprune.apps.train import train, train_stages
from tokenprune.modules.loading import load_module


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    cfg = compose_app("train", [*FAST, "pruner=topk", "pruner.keep_ratio=0.5", "pruner.start_layer=1"], root / "topk")
    return train(cfg)


def test_train_reports_metrics_flops_and_kept_tokens(topk_run):
    report = topk_run["report"]
    assert 0.0 <= report["report/accuracy"] <= 1.0 and "report/unpruned_accuracy" in report
    dims = load_module(topk_run["last_checkpoint"]).dims
    expected = topk_flops_ratio(dims, report_lengths(topk_run), keep_ratio=0.5, start_layer=1)
    assert report["report/flops_ratio"] == pytest.approx(expected, rel=1e-6) and expected < 0.8
    assert report["report/kept_fraction/layer_0"] == 1.0
    assert report["report/kept_fraction/layer_1"] == pytest.approx(0.5, abs=0.05)
    run_dir = Path(topk_run["run_dir"])
    assert json.loads((run_dir / "results.json").read_text())["report"] == report
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = next((run_dir / "csv").rglob("metrics.csv")).read_text()
    assert "report/flops_ratio" in metrics and "val/accuracy" in metrics


def test_checkpoint_reloads_as_same_module_with_hf_keys(topk_run):
    module = load_module(topk_run["best_checkpoint"])
    assert type(module).__name__ == "FineTuneModule" and module.pruner is not None
    keys = set(module.model.state_dict())
    assert "bert.encoder.layer.0.attention.self.query.weight" in keys and "classifier.weight" in keys


class CrashAfterFirstEpoch(L.Callback):
    """Dies as the second epoch starts, after the first epoch's checkpoints were written."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def test_report_on_best_evaluates_the_best_checkpoint_not_the_last(tmp_path):
    """`report_on=best` reports the weights of the epoch the best checkpoint kept (here, with
    `mode=min`, the epoch of lowest val accuracy, so that it is not the last epoch's): its report
    loss is the stock model's on those weights, not on the last ones."""
    overrides = [*FAST, "pruner=none", "trainer.max_epochs=3", "report_on=best", "checkpoints.best.mode=min"]
    overrides.append("module.optimizer.lr=3e-3")  # epochs apart enough to score differently
    results = train(compose_app("train", overrides, tmp_path / "run"))
    best, last = results["best_checkpoint"], results["last_checkpoint"]
    assert results["reported_on"] == "best" and Path(best).name.startswith("best-epoch") and best != last
    scores = {name: stock_report_scores(path, batches=2) for name, path in (("best", best), ("last", last))}
    assert abs(scores["best"]["loss"] - scores["last"]["loss"]) > 1e-3, "the checkpoints must score apart"
    assert results["report"]["report/loss"] == pytest.approx(scores["best"]["loss"], abs=1e-5)
    assert results["report"]["report/accuracy"] == pytest.approx(scores["best"]["accuracy"], abs=1e-6)


def test_resume_from_last_matches_uninterrupted_run(tmp_path):
    """ckpt_path=last finds the crashed run by its run_name, also from a multirun job's folder."""
    overrides = [*FAST, "trainer.max_epochs=2", "seed=7"]
    straight = train(compose_app("train", overrides, tmp_path / "straight"))
    root, crashed = tmp_path / "root", tmp_path / "root" / "train" / "tiny-s7" / "t0"
    named = [*overrides, "run_name=tiny-s7"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose_app("train", named, crashed, root), extra_callbacks=[CrashAfterFirstEpoch()])
    other = root / "multirun" / "t0" / "0-other"  # another run's checkpoint, newer
    train(compose_app("train", [*FAST, "trainer.max_epochs=1", "run_name=other"], other, root))
    job = root / "multirun" / "t1" / "0-tiny-s7"
    resumed = train(compose_app("train", [*named, "ckpt_path=last"], job, root))
    assert resumed["resumed_from"] == str(crashed / "checkpoints" / "last.ckpt")
    assert resumed["report"] == pytest.approx(straight["report"], abs=1e-6)
    a = torch.load(Path(straight["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(Path(resumed["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_skip_done_rerun_resumes_an_interrupted_run_to_the_same_result(tmp_path):
    """A killed sweep's rerun (skip_done=true) continues the killed run from its last.ckpt."""
    overrides = [*FAST, "trainer.max_epochs=2", "seed=11"]
    straight = train(compose_app("train", overrides, tmp_path / "straight" / "run"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose_app("train", overrides, tmp_path / "sweep" / "killed"), extra_callbacks=[CrashAfterFirstEpoch()])
    rerun = train(compose_app("train", [*overrides, "skip_done=true"], tmp_path / "sweep" / "rerun"))
    assert rerun["resumed_from"] == str(tmp_path / "sweep" / "killed" / "checkpoints" / "last.ckpt")
    assert rerun["report"] == pytest.approx(straight["report"], abs=1e-6)
    other_seed = [*FAST, "trainer.max_epochs=2", "seed=12", "skip_done=true"]  # another run: starts afresh
    assert train(compose_app("train", other_seed, tmp_path / "sweep" / "s12"))["resumed_from"] is None


class CrashAtStep(L.Callback):
    """Dies as the batch of optimizer step `step` starts (after the interval checkpoint of the step
    before), or with `in_validation` as the validation after step `step` starts."""

    def __init__(self, step: int, in_validation: bool = False) -> None:
        self.step, self.in_validation = step, in_validation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.in_validation and trainer.global_step == self.step:
            raise RuntimeError("simulated crash")

    def on_validation_start(self, trainer, pl_module):
        if self.in_validation and trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_run_killed_mid_epoch_resumes_from_the_batch_it_reached_to_the_same_result(tmp_path):
    """checkpoints.interval.minutes=0: last.ckpt after every optimizer step, with the loader's
    position; the rerun continues epoch 1 at its 4th batch (step 9 of 12), not at its start."""
    overrides = [*FAST, "trainer.max_epochs=2", "seed=13", "checkpoints.interval.minutes=0"]
    straight = train(compose_app("train", overrides, tmp_path / "straight" / "run"))
    killed = tmp_path / "sweep" / "killed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose_app("train", overrides, killed), extra_callbacks=[CrashAtStep(9)])
    left = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert left["global_step"] == 9 and left["epoch"] == 1
    assert left["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 3}]
    rerun = train(compose_app("train", [*overrides, "skip_done=true"], tmp_path / "sweep" / "rerun"))
    assert rerun["resumed_from"] == str(killed / "checkpoints" / "last.ckpt")
    assert rerun["report"] == pytest.approx(straight["report"], abs=1e-6)
    a = torch.load(Path(straight["last_checkpoint"]), weights_only=True)
    b = torch.load(Path(rerun["last_checkpoint"]), weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], atol=1e-6, rtol=0)


def test_no_interval_checkpoint_before_a_validation_so_a_resume_runs_it(tmp_path):
    """Validation after every 3rd batch: the step-3 save would resume past the step-3 validation
    (Lightning does not repeat it), so the last save before it is step 2's, and the resumed run
    validates at step 3 and reports on the same best checkpoint as the uninterrupted one."""
    overrides = [*FAST, "seed=17", "checkpoints.interval.minutes=0", "trainer.val_check_interval=3"]
    overrides += ["report_on=best", "checkpoints.best.mode=min"]
    straight = train(compose_app("train", overrides, tmp_path / "straight" / "run"))
    killed = tmp_path / "sweep" / "killed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose_app("train", overrides, killed), extra_callbacks=[CrashAtStep(3, in_validation=True)])
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    rerun = train(compose_app("train", [*overrides, "skip_done=true"], tmp_path / "sweep" / "rerun"))
    assert rerun["resumed_from"] == str(killed / "checkpoints" / "last.ckpt")
    assert Path(rerun["best_checkpoint"]).name == Path(straight["best_checkpoint"]).name
    assert rerun["report"] == pytest.approx(straight["report"], abs=1e-6)


def test_skip_done_rerun_of_a_staged_run_reuses_finished_stages_and_resumes_the_killed_one(tmp_path, monkeypatch):
    overrides = [*FAST, "experiment=retrained_baseline", "pruner=topk", "pruner.keep_ratio=0.5", "skip_done=true"]
    command = [*overrides, f"paths.root={tmp_path}"]  # what each stage is composed from
    real_train = train_app.train

    def killed_in_second_stage(cfg, extra_callbacks=None, stage=None, group=None):
        crash = [CrashAfterFirstEpoch()] if stage == "pruned" else []
        return real_train(cfg, extra_callbacks=crash, stage=stage, group=group)

    monkeypatch.setattr(train_app, "train", killed_in_second_stage)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_stages(compose_app("train", overrides, tmp_path / "killed"), command)
    monkeypatch.setattr(train_app, "train", real_train)
    rerun = train_stages(compose_app("train", overrides, tmp_path / "rerun"), command)
    finetune, pruned = rerun["stages"]["finetune"], rerun["stages"]["pruned"]
    assert finetune["reused_by"] == str(tmp_path / "rerun" / "finetune")
    assert finetune["last_checkpoint"] == str(tmp_path / "killed" / "finetune" / "checkpoints" / "last.ckpt")
    assert not (tmp_path / "rerun" / "finetune" / "checkpoints").exists()  # not trained again
    assert pruned["resumed_from"] == str(tmp_path / "killed" / "pruned" / "checkpoints" / "last.ckpt")
    last = torch.load(pruned["last_checkpoint"], weights_only=True)
    assert last["global_step"] == 12 and last["hyper_parameters"]["init_from"] == finetune["last_checkpoint"]
    # the results table sees one run: neither the killed run's finished stage nor the reused copy
    assert [point["source"] for point in training_points(tmp_path)] == [str(tmp_path / "rerun")]


def test_resume_with_changed_settings_is_refused_unless_allowed(tmp_path):
    overrides = [*FAST, "trainer.max_epochs=1", "seed=3"]
    first = train(compose_app("train", overrides, tmp_path / "first"))
    changed = [
        *FAST,
        "trainer.max_epochs=2",
        "seed=3",
        "module.optimizer.lr=3e-4",
        f"ckpt_path={first['last_checkpoint']}",
    ]
    with pytest.raises(ValueError, match=r"module.optimizer.lr: 0.0001 -> 0.0003; trainer.max_epochs: 1 -> 2") as error:
        train(compose_app("train", changed, tmp_path / "refused"))
    assert "resume_allow_changes=[module.optimizer.lr,trainer.max_epochs]" in str(error.value)
    assert not (tmp_path / "refused").exists()
    allowed = [*changed, "resume_allow_changes=[trainer.max_epochs,module.optimizer.lr]"]
    resumed = train(compose_app("train", allowed, tmp_path / "allowed"))
    recorded = json.loads((tmp_path / "allowed" / "results.json").read_text())["resume_changes"]
    assert recorded == resumed["resume_changes"]
    assert recorded["settings"] == {"module.optimizer.lr": [1e-4, 3e-4], "trainer.max_epochs": [1, 2]}
    assert recorded["at_step"] == 6


def test_rerun_into_an_existing_run_folder_is_refused(topk_run):
    cfg = compose_app("train", FAST, Path(topk_run["run_dir"]))
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        train(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruner.keep_ratio=1.5", r"pruner.keep_ratio=1.5 is outside the allowed range \(0.0, 1.0\]"),
        ("pruner.keep_ratio=0", r"pruner.keep_ratio=0"),
        ("task.max_length=1000", r"task.max_length=1000 is outside \(1, 128\]"),
        ("module.optimizer.lr=-0.001", r"module.optimizer.lr=-0.001 is outside the allowed range \(0.0, inf\]"),
        ("pruner.start_layer=9", r"pruner.start_layer=9"),
    ],
)
def test_bad_settings_fail_before_training_with_the_setting_named(tmp_path, override, message):
    overrides = [*FAST, "pruner=topk", override]
    with pytest.raises(ValueError, match=message):
        train(compose_app("train", overrides, tmp_path / "bad"))
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_unknown_group_option_lists_the_valid_ones(tmp_path):
    with pytest.raises(HydraException, match=r"(?s)Available options in 'pruner'.*spatten.*topk"):
        compose_app("train", ["pruner=ltpx"], tmp_path / "x")


def test_checkpoint_from_another_backbone_is_refused(topk_run, tmp_path):
    cfg = compose_app("train", ["backbone=minilm_l6", f"ckpt_path={topk_run['best_checkpoint']}"], tmp_path / "other")
    with pytest.raises(ValueError, match="ckpt_path holds a 'tiny' checkpoint but backbone=minilm_l6"):
        train(cfg)


def test_cli_multirun_over_pruners_with_submitit(tmp_path):
    """(The basic launcher's multirun: tests/test_sweeps.py.)"""
    common = [*FAST, f"paths.root={tmp_path}", "hydra/launcher=submitit_local"]
    done = run_cli("tokenprune.apps.train", ["-m", "pruner=none,topk", *common], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(tmp_path.glob("multirun/*/*/results.json"))
    assert [json.loads(r.read_text())["run_name"] for r in results] == [
        "tiny-rt_sentiment-none-s42",
        "tiny-rt_sentiment-topk-s42",
    ]
    for log in sorted(tmp_path.glob("multirun/*/*/train.log")):  # no terminal: progress as log lines
        text = log.read_text()
        assert (
            "epoch 0 step 6/6 (global step 6): train/loss" in text
            and "val/accuracy=" in text.split("epoch 0 validation: ")[1]
        )
    # a rerun with one more job and skip_done=true trains only that job; the others reuse their results
    rerun = run_cli("tokenprune.apps.train", ["-m", "pruner=none,topk,random", *common, "skip_done=true"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    second = sorted(set(tmp_path.glob("multirun/*/*/results.json")) - set(results))
    reruns = [json.loads(r.read_text()) for r in second]
    assert [r["run_name"] for r in reruns] == [f"tiny-rt_sentiment-{p}-s42" for p in ("none", "topk", "random")]
    assert [r.get("reused_by") is not None for r in reruns] == [True, True, False]
    assert [r["run_dir"] for r in reruns[:2]] == [str(r.parent) for r in results]
    assert len(list(tmp_path.glob("multirun/*/*/checkpoints/last.ckpt"))) == 3


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["hydra/launcher=slurm"], (1, 1, None, 4, 1)),
        (["slurm=cpu", "hydra.launcher.partition=debug"], (1, 1, None, 4, 1)),
        (["slurm=cpu", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], (2, 1, None, 4, 1)),
        (["slurm=gpu", "trainer=gpu"], (1, 8, 1, 32, 8)),
        (["slurm=gpu_node", "trainer.devices=4"], (4, 8, 4, 0, 8)),
    ],
)
def test_slurm_presets_size_the_jobs(overrides, expected):
    """(tasks_per_node, cpus_per_task, gpus_per_node, mem_gb, threads); gpu_node runs DDP with one task per GPU."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_module(version_base="1.3", config_module="tokenprune.conf"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.tokenprune_launcher.TokenpruneSlurmLauncher"
    assert {"partition", "account", "qos", "timeout_min", "mem_gb"} <= set(launcher) and launcher.max_num_timeout == 3
    sizes = (launcher.tasks_per_node, launcher.cpus_per_task, launcher.gpus_per_node, launcher.mem_gb)
    assert (*sizes, cfg.get("threads") or 1) == expected
    if "slurm=gpu_node" in overrides:
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("debug", ["fdr", "limit"])
def test_debug_configs_and_trainer_flags_without_plus(tmp_path, debug):
    overrides = ["backbone=tiny", "data.batch_size=16", f"debug={debug}", "trainer.limit_train_batches=2"]
    cfg = compose_app("train", overrides, tmp_path / debug)
    assert list(cfg.logger) == ["csv"] and cfg.trainer.detect_anomaly
    results = train(cfg)
    assert 0.0 <= results["report"]["report/accuracy"] <= 1.0
    assert (results["last_checkpoint"] is None) == (debug == "fdr"), "fast_dev_run writes no checkpoints"
