"""`tokenprune-train`: fine-tune with a pruning method, evaluate on the report split, log.

tokenprune-train                                   # MiniLM-L6 x rt_sentiment, no pruning
tokenprune-train pruner=topk pruner.keep_ratio=0.4 task=trec6
tokenprune-train -m pruner=none,topk               # Hydra multirun
tokenprune-train backbone=flan_t5_base task=rt_sentiment_rank module=acc pruner=acc trainer.max_epochs=0
                                                   # no training: ACC profile, report, last.ckpt for the searches
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, cast

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from tokenprune.allocator import keep_freed_memory
from tokenprune.apps.cluster import process_rank, trainer_plugins
from tokenprune.apps.options import refusals_as_messages
from tokenprune.apps.runs import (
    TRAINING_RUN_KEY,
    build_loggers,
    log_files_artifact,
    one_run,
    sweep_group,
    training_run_record,
)
from tokenprune.apps.settings import (
    TRAINER,
    check_settings,
    claimed_by_this_job,
    claimed_run_dir,
    leaves,
    nothing_left_if_refused,
)
from tokenprune.backbones import assert_same_backbone, load_config
from tokenprune.checkpoints import read_checkpoint
from tokenprune.config import plain, plain_errors
from tokenprune.data.sources import check_source
from tokenprune.engine.adapters import usable_positions
from tokenprune.modules.base import check_task_backbone
from tokenprune.modules.callbacks import CheckpointRecord, LoaderPosition, ProgressLog, RunSettings, StepSeed
from tokenprune.pruners import build_pruner

log = logging.getLogger(__name__)
RUN_OUTPUTS = ("checkpoints", "results.json")  # what makes a folder another run's


def resolve_checkpoint(cfg: DictConfig) -> str | None:
    """`ckpt_path=last` -> the newest last.ckpt of an earlier run under paths.root with the same
    run_name (single runs and multirun jobs alike; not this run's)."""
    ckpt_path = cfg.ckpt_path
    if ckpt_path != "last":
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
        return ckpt_path
    run_dir = Path(cfg.paths.output_dir)
    candidates = [
        last
        for last in Path(cfg.paths.root).glob("**/checkpoints/last.ckpt")
        if run_dir not in last.parents and saved_settings(last.parent.parent).get("run_name") == cfg.run_name
    ]
    if not candidates:
        raise FileNotFoundError(
            f"ckpt_path=last but no earlier run named {cfg.run_name} left a last.ckpt under {cfg.paths.root}"
        )
    return str(max(candidates, key=lambda p: p.stat().st_mtime))


def saved_settings(run_dir: Path) -> DictConfig:
    """A run folder's resolved settings as claimed_run_dir saved them (empty: none saved)."""
    saved = run_dir / ".hydra" / "config.yaml"
    settings = OmegaConf.load(saved) if saved.is_file() else None
    return settings if isinstance(settings, DictConfig) else OmegaConf.create()


# Settings that may differ between a run and its resume without changing the model, data or
# objective; any other difference must be allowed by name (resume_allow_changes).
RESUME_FREE = (
    "module.init_from",
    "data.num_workers",
    "threads",
    "ckpt_path",
    "resume_allow_changes",
    "run_name",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
)
COMPARED = ("seed", "backbone", "task", "pruner", "module", "data", "trainer", "report_on")


def validate(cfg: DictConfig) -> None:
    """Fail on bad settings before any data or weights are loaded or any training starts."""
    check_settings(cfg, TRAINER)
    if cfg.trainer.get("use_distributed_sampler", False):
        raise ValueError(
            "trainer.use_distributed_sampler=true is not allowed: the training DataModule shards its "
            "length-bucketed batches across DDP ranks itself (allowed: false)"
        )
    check_task_backbone(plain(cfg.task), plain(cfg.backbone))
    check_source(plain(cfg.task.source), plain(cfg.task))
    config = load_config(cfg.backbone, int(cfg.task.num_labels))
    limit = usable_positions(config)
    if not 1 < cfg.task.max_length <= limit:
        raise ValueError(
            f"task.max_length={cfg.task.max_length} is outside (1, {limit}]: backbone={cfg.backbone.name} "
            f"has {limit} usable positions"
        )
    with plain_errors():
        build_pruner(plain(cfg.pruner), config.num_hidden_layers, int(cfg.task.max_length), config.num_attention_heads)
    for split, name in (("val", "limit_val_batches"), ("report", "limit_test_batches")):
        value = cfg.trainer.get(name)
        if value is not None and not (isinstance(value, float) and value == 1.0):
            log.warning(
                "trainer.%s=%s: evaluation batches are sorted longest first, so the %s split's numbers "
                "come from its longest examples, not from a sample (for smoke runs; leave it null to score it all)",
                name,
                value,
                split,
            )
    for name in cfg.resume_allow_changes:
        if str(name).split(".")[0] not in COMPARED:
            raise ValueError(
                f"resume_allow_changes entry {name!r} is not a setting a resume compares "
                f"(those under: {', '.join(COMPARED)})"
            )


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings a resume must match: flat `name -> value` of the compared config sections."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    flat = dict(leaves({key: resolved[key] for key in COMPARED if key in resolved}))
    return {name: value for name, value in flat.items() if not name.startswith(RESUME_FREE)}


def config_key(cfg: DictConfig) -> str:
    """What a finished run is recognised by (`skip_done`): a digest of the resolved settings that
    decide its result (the ones a resume compares, init_from included, and an experiment's stages)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    keyed = {key: resolved.get(key) for key in (*COMPARED, "stages", "epochs")}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_run(cfg: DictConfig) -> dict[str, Any] | None:
    """The results of a finished run under paths.root with this run's config key, if any."""
    key = config_key(cfg)
    for path in sorted(Path(cfg.paths.root).glob("**/results.json")):
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):  # a results.json being written or damaged: not finished
            continue
        if isinstance(results, dict) and results.get("config_key") == key:
            return results
    return None


def interrupted_checkpoint(cfg: DictConfig) -> str | None:
    """The last.ckpt of an unfinished run under paths.root with this run's config key (killed or
    timed out after its first epoch or interval checkpoint; the newest if several), for
    `skip_done` to resume from."""
    key = config_key(cfg)
    own = Path(cfg.paths.output_dir)
    candidates = []
    for last in Path(cfg.paths.root).glob("**/checkpoints/last.ckpt"):
        run_dir = last.parent.parent
        if run_dir == own or (run_dir / "results.json").exists():
            continue
        settings = saved_settings(run_dir)
        if settings and config_key(settings) == key:
            candidates.append(last)
    return str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None


def resume_changes(cfg: DictConfig, checkpoint: dict[str, Any], path: str) -> dict[str, list[Any]]:
    """Settings that differ from the checkpoint's run; refuse unless every one is allowed by name."""
    saved = checkpoint.get(RunSettings.KEY)
    if saved is None:
        raise ValueError(
            f"ckpt_path={path} has no saved run settings (written before settings were recorded); "
            f"resume is refused because its settings cannot be compared: start from it with "
            f"module.init_from={path} instead"
        )
    now = run_settings(cfg)
    changed = {
        name: [saved.get(name), now.get(name)]
        for name in sorted(set(saved) | set(now))
        if saved.get(name) != now.get(name)
    }
    allowed = tuple(str(name) for name in cfg.resume_allow_changes)
    refused = [name for name in changed if not any(name == a or name.startswith(a + ".") for a in allowed)]
    if refused:
        listing = "; ".join(f"{name}: {changed[name][0]!r} -> {changed[name][1]!r}" for name in refused)
        raise ValueError(
            f"ckpt_path={path} was trained with other settings ({listing}); resuming would mix "
            f"two runs. Allow on purpose with resume_allow_changes=[{','.join(refused)}]"
        )
    return changed


def train(
    cfg: DictConfig,
    extra_callbacks: list[L.Callback] | None = None,
    stage: str | None = None,
    group: str | None = None,
) -> dict[str, Any]:
    """Build everything from `cfg`, fit, test on the report split, write results.json; one W&B
    run (job_type train) per call, named after `stage` within an experiment's stages."""
    validate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    own_last = Path(cfg.checkpoints.last.dirpath) / f"{cfg.checkpoints.last.filename}.ckpt"
    if claimed_by_this_job(run_dir) and own_last.is_file():  # requeued (preempted, timed out): continue
        ckpt_path: str | None = str(own_last)
    elif cfg.skip_done and cfg.ckpt_path is None:  # a killed sweep's rerun continues its unfinished runs
        ckpt_path = interrupted_checkpoint(cfg)
        if ckpt_path is not None:
            log.info("skip_done: resuming the interrupted run of this configuration from %s", ckpt_path)
    else:
        ckpt_path = resolve_checkpoint(cfg)
    changes: dict[str, list[Any]] = {}
    resumed_step = None
    if ckpt_path is not None:
        checkpoint = read_checkpoint(ckpt_path)
        assert_same_backbone(checkpoint.get("hyper_parameters", {}), cfg.backbone)
        changes = resume_changes(cfg, checkpoint, ckpt_path)
        resumed_step = int(checkpoint.get("global_step", 0))
    if cfg.module.get("init_from"):
        start = read_checkpoint(cfg.module.init_from)
        assert_same_backbone(start.get("hyper_parameters", {}), cfg.backbone, setting="module.init_from")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    keep_freed_memory()  # long inputs: no page faults on every step's activations
    L.seed_everything(cfg.seed, workers=True)
    with plain_errors():  # the module checks its own settings before it loads any weights
        module = instantiate(cfg.module)
        datamodule = instantiate(cfg.data)
    with claimed_run_dir(run_dir, cfg, RUN_OUTPUTS, "train"), one_run():
        with plain_errors():
            loggers = build_loggers(cfg, "train", stage=stage, group=group)
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        checkpoints = {name: instantiate(node) for name, node in cfg.checkpoints.items()}
        callbacks = [
            *checkpoints.values(),
            StepSeed(cfg.seed),
            LoaderPosition(),
            RunSettings(run_settings(cfg)),
            CheckpointRecord(TRAINING_RUN_KEY, training_run_record(loggers, run_dir)),
            *(extra_callbacks or []),
        ]
        terminal = sys.stdout.isatty()  # a redirected log gets progress lines instead of a bar
        if not terminal:
            callbacks.append(ProgressLog(int(cfg.trainer.get("log_every_n_steps") or 50)))
        trainer = instantiate(
            cfg.trainer,
            logger=loggers or False,
            callbacks=callbacks,
            default_root_dir=run_dir,
            plugins=trainer_plugins(),
            enable_progress_bar=bool(cfg.trainer.enable_progress_bar) and terminal,
            use_distributed_sampler=False,  # the DataModule shards its bucketed batches itself, on any preset
        )

        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        last = checkpoints["last"].best_model_path or None
        if last is None and trainer.global_step == 0:  # trainer.max_epochs=0: the starting weights, for the searches
            last = checkpoints["last"].format_checkpoint_name({})
            trainer.save_checkpoint(last)
        best = checkpoints["best"].best_model_path or None
        report = trainer.test(
            module,
            datamodule=datamodule,
            ckpt_path=best if cfg.report_on == "best" else None,
            verbose=False,
            weights_only=True,
        )[0]
        results = {
            "run_name": cfg.run_name,
            "config_key": config_key(cfg),
            "run_dir": str(run_dir),
            "best_checkpoint": best,
            "last_checkpoint": last,
            "reported_on": cfg.report_on,
            "resumed_from": ckpt_path,
            "report": {k: float(v) for k, v in sorted(report.items())},
        }
        if stage is not None:  # a stage of an experiment, not a method's result (tokenprune-table skips it)
            results["stage"] = stage
        if changes:
            results["resume_changes"] = {"at_step": resumed_step, "settings": changes}
        if trainer.is_global_zero:
            (run_dir / "results.json").write_text(json.dumps(results, indent=2))
            summarize(cfg, results["report"])
            if cfg.log_artifacts:
                saved = sorted({Path(p) for p in (last, best) if p})
                log_files_artifact(loggers, f"model-{cfg.run_name}-{run_dir.name}", "model", saved)
        for logger in loggers:
            logger.finalize("success")
        return results


def reuse_finished(cfg: DictConfig, stage: str | None = None) -> dict[str, Any] | None:
    """With `skip_done`, the results of a finished run (or experiment `stage`) with this
    configuration, also written to this run's folder so that a sweep's folder is whole; None: it
    must be trained."""
    done = finished_run(cfg) if cfg.skip_done else None
    if done is None:
        return None
    run_dir = Path(cfg.paths.output_dir)
    results = {**done, "reused_by": str(run_dir), **({"stage": stage} if stage is not None else {})}
    with claimed_run_dir(run_dir, cfg, RUN_OUTPUTS, "train"):
        log.info("skip_done: this configuration finished in %s; not run again", done["run_dir"])
        if process_rank() == 0:
            (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def summarize(cfg: DictConfig, report: dict[str, float]) -> None:
    main = f"report/{cfg.task.main_metric}"
    kept = [report[k] for k in sorted(report) if k.startswith("report/kept_tokens/layer_")]
    log.info(
        "report split: %s=%.4f  relative FLOPs=%.3f (%.3f GFLOPs/example)  mean kept tokens per layer=%s",
        main,
        report.get(main, float("nan")),
        report["report/flops_ratio"],
        report["report/gflops"],
        [round(k, 1) for k in kept],
    )


def compose_stage(overrides: list[str]) -> DictConfig:
    """The train config for `overrides` (the command's own overrides plus a stage's)."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    with initialize_config_module(version_base="1.3", config_module="tokenprune.conf"):
        return compose(config_name="train", overrides=overrides)


def train_stages(cfg: DictConfig, command_overrides: list[str]) -> dict[str, Any]:
    """Run `cfg.stages` back to back: each stage = this command + the stage's overrides, starting
    from the previous stage's last checkpoint, writing into <run_dir>/<stage name>/."""
    if cfg.ckpt_path is not None:
        raise ValueError(
            "ckpt_path cannot be combined with stages; rerun the unfinished stage alone "
            "with module.init_from=<previous stage's last.ckpt>"
        )
    run_dir = Path(cfg.paths.output_dir)
    validate(cfg)
    with claimed_run_dir(run_dir, cfg, RUN_OUTPUTS, "train"):
        init_from = cfg.module.get("init_from")
        group = sweep_group(cfg, fallback=f"{cfg.run_name}-{run_dir.name}")  # the stages share one W&B group
        stages: dict[str, Any] = {}
        for stage in cfg.stages:
            stage_cfg = compose_stage([*command_overrides, *stage.overrides])
            with open_dict(stage_cfg):
                stage_cfg.pop("stages")
                stage_cfg.paths.output_dir = str(run_dir / stage.name)
                stage_cfg.module.init_from = init_from
            log.info("stage %s: %s", stage.name, " ".join(stage.overrides))
            stages[stage.name] = reuse_finished(stage_cfg, stage.name) or train(
                stage_cfg, stage=stage.name, group=group
            )
            init_from = stages[stage.name]["last_checkpoint"]
        final = {key: value for key, value in stages[cfg.stages[-1].name].items() if key != "stage"}
        results = {**final, "config_key": config_key(cfg), "run_dir": str(run_dir), "stages": stages}
        if process_rank() == 0:
            (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        return results


@hydra.main(version_base="1.3", config_path="pkg://tokenprune.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # stages get the command's overrides as typed: 'stages=${ltp_stages_from_finetuned}' stays unresolved
    typed = cast(list[str], OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False))
    run_dir = Path(cfg.paths.output_dir)
    with refusals_as_messages(), nothing_left_if_refused(run_dir, stop=Path(cfg.paths.root).parent):
        results = reuse_finished(cfg) or (train_stages(cfg, typed) if cfg.get("stages") else train(cfg))
    return results["report"][f"report/{cfg.task.main_metric}"]


if __name__ == "__main__":
    main()
