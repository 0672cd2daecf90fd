"""`tokenprune-train`: fine-tune with a pruning method, evaluate on the report split, log.

tokenprune-train                                   # MiniLM-L6 x rt_sentiment, no pruning
tokenprune-train pruner=topk pruner.keep_ratio=0.4 task=trec6
tokenprune-train -m pruner=none,topk               # Hydra multirun
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from tokenprune.backbones import assert_same_backbone, load_config, usable_positions
from tokenprune.checkpoints import read_checkpoint
from tokenprune.checks import check_choice
from tokenprune.config import plain_errors
from tokenprune.modules.callbacks import StepSeed

log = logging.getLogger(__name__)


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path, runs_root: Path) -> str | None:
    """`last` -> the newest last.ckpt of an earlier run of the same run_name (not this run's)."""
    if ckpt_path != "last":
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
        return ckpt_path
    candidates = [p for p in runs_root.glob("*/checkpoints/last.ckpt") if run_dir not in p.parents]
    if not candidates:
        raise FileNotFoundError(f"ckpt_path=last but no earlier run left a last.ckpt under {runs_root}")
    return str(max(candidates, key=lambda p: p.stat().st_mtime))


def validate(cfg: DictConfig) -> None:
    """Fail on bad settings before any data is loaded or any training starts."""
    config = load_config(cfg.backbone, int(cfg.task.num_labels))
    limit = usable_positions(config)
    if not 1 < cfg.task.max_length <= limit:
        raise ValueError(
            f"task.max_length={cfg.task.max_length} is outside (1, {limit}]: backbone={cfg.backbone.name} "
            f"has {limit} usable positions"
        )
    check_choice("report_on", cfg.report_on, ("last", "best"))
    if cfg.trainer.max_epochs is not None and cfg.trainer.max_epochs < 1:
        raise ValueError(f"trainer.max_epochs={cfg.trainer.max_epochs} must be >= 1")


def prepare_run_dir(run_dir: Path) -> None:
    """Refuse to write into a folder that already holds checkpoints or results."""
    for existing in ("checkpoints", "results.json"):
        if (run_dir / existing).exists():
            raise FileExistsError(f"{run_dir / existing} exists; refusing to overwrite an earlier run's outputs")


def train(cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Build everything from `cfg`, fit, test on the report split, write results.json."""
    validate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    prepare_run_dir(run_dir)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, run_dir, run_dir.parent)
    if ckpt_path is not None:
        assert_same_backbone(read_checkpoint(ckpt_path).get("hyper_parameters", {}), cfg.backbone)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True)

    with plain_errors():
        module = instantiate(cfg.module)
        datamodule = instantiate(cfg.data)
        loggers = [instantiate(node) for node in (cfg.logger or {}).values()]
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    checkpoints = {name: instantiate(node) for name, node in cfg.checkpoints.items()}
    callbacks = [*checkpoints.values(), StepSeed(cfg.seed), *(extra_callbacks or [])]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    best = checkpoints["best"].best_model_path or None
    report = trainer.test(
        module, datamodule=datamodule, ckpt_path=best if cfg.report_on == "best" else None, verbose=False
    )[0]
    results = {
        "run_name": cfg.run_name,
        "run_dir": str(run_dir),
        "best_checkpoint": best,
        "last_checkpoint": checkpoints["last"].best_model_path or None,
        "reported_on": cfg.report_on,
        "resumed_from": ckpt_path,
        "report": {k: float(v) for k, v in sorted(report.items())},
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    summarize(cfg, results["report"])
    for logger in loggers:
        logger.finalize("success")
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
    prepare_run_dir(run_dir)
    init_from = cfg.module.get("init_from")
    stages: dict[str, Any] = {}
    for stage in cfg.stages:
        stage_cfg = compose_stage([*command_overrides, *stage.overrides])
        with open_dict(stage_cfg):
            stage_cfg.pop("stages")
            stage_cfg.paths.output_dir = str(run_dir / stage.name)
            stage_cfg.module.init_from = init_from
        log.info("stage %s: %s", stage.name, " ".join(stage.overrides))
        stages[stage.name] = train(stage_cfg)
        init_from = stages[stage.name]["last_checkpoint"]
    final = stages[cfg.stages[-1].name]
    results = {**final, "run_dir": str(run_dir), "stages": stages}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


@hydra.main(version_base="1.3", config_path="pkg://tokenprune.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # stages get the command's overrides as typed: 'stages=${ltp_stages_from_finetuned}' stays unresolved
    results = train_stages(cfg, list(HydraConfig.get().overrides.task)) if cfg.get("stages") else train(cfg)
    return results["report"][f"report/{cfg.task.main_metric}"]


if __name__ == "__main__":
    main()
