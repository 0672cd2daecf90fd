"""W&B run hierarchy shared by the apps: one run per job and per stage, whatever the launcher.

- group: the sweep, so every job and step of one sweep is one W&B group. In order: an explicit
  `logger.wandb.group`; `$TOKENPRUNE_GROUP` (the shell sweeps in `sweeps/` export it); a Hydra
  multirun's `<app>-<sweep folder name>` (the sweep's time); for search and bench runs, the group
  of the checkpoint's training run; else none.
- job_type: train / search / bench / compare (the app step).
- tags: `backbone:`, `task:`, `pruner:`, `method:` (the training module, or the search strategy).
- name: the run name, plus the values of the settings a multirun sweeps (`run_name[k=v,...]`),
  plus `/<stage>` for the stages of `experiment=...`.
- link: training stores its W&B run (id, project, group, name, folder) in every checkpoint under
  `TRAINING_RUN_KEY`; search and bench runs record it as `config.training_run`.

The run is finished when the job or stage ends (`one_run`): Hydra's basic launcher runs every
job of a multirun in one process, and without `wandb.finish` each later job would log into the
first job's run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import wandb
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from tokenprune.apps.options import GROUP_ENV
from tokenprune.checkpoints import read_checkpoint

TRAINING_RUN_KEY = "tokenprune_training_run"
JOB_TYPES = ("train", "search", "bench", "compare")


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def multirun_group(job_name: str, sweep_dir: str | Path) -> str:
    """The W&B group of a Hydra multirun: the app and the sweep folder's name (its start time)."""
    return f"{job_name}-{Path(sweep_dir).name}"


def sweep_group(cfg: DictConfig, fallback: str | None = None) -> str | None:
    """The W&B group of this job (see the module docstring for the order)."""
    explicit = OmegaConf.select(cfg, "logger.wandb.group", default=None)
    if explicit:
        return str(explicit)
    if os.environ.get(GROUP_ENV):
        return os.environ[GROUP_ENV]
    if _multirun():
        return multirun_group(HydraConfig.get().job.name, HydraConfig.get().sweep.dir)
    return fallback


def swept_settings() -> list[str]:
    """`key=value` of this multirun job for every setting the sweep varies (from the sweep's
    command-line overrides and `hydra.sweeper.params`); empty outside a multirun."""
    if not _multirun():
        return []
    hydra_cfg = HydraConfig.get()
    parser = OverridesParser.create()
    swept = {str(key) for key in (getattr(hydra_cfg.sweeper, "params", None) or {})}
    multirun_file = Path(hydra_cfg.sweep.dir) / "multirun.yaml"  # Hydra writes it before the first job
    if multirun_file.is_file():  # a job's own overrides hold one value each; the sweep's hold the lists
        # unresolved: an override such as 'stages=${ltp_stages_from_finetuned}' stays as typed
        sweep_overrides = OmegaConf.to_container(OmegaConf.load(multirun_file).hydra.overrides.task, resolve=False)
        assert isinstance(sweep_overrides, list)
        swept |= {o.key_or_group for o in parser.parse_overrides(sweep_overrides) if o.is_sweep_override()}
    job = parser.parse_overrides(list(hydra_cfg.overrides.task))
    return [f"{o.key_or_group}={o.get_value_element_as_str()}" for o in job if o.key_or_group in swept]


def run_tags(cfg: DictConfig, trained: Mapping[str, Any] | None = None) -> list[str]:
    """backbone / task / pruner / method tags from the config (or, for runs of a checkpoint, the
    `trained` module's hyperparameters) and Hydra's group choices (the method: the training
    module, or the search strategy)."""
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    tags = {
        "backbone": trained["backbone"]["name"] if trained else OmegaConf.select(cfg, "backbone.name", default=None),
        "task": trained["task"]["name"] if trained else OmegaConf.select(cfg, "task.name", default=None),
        "pruner": choices.get("pruner"),
        "method": choices.get("search") or choices.get("module"),
    }
    return [f"{key}:{value}" for key, value in tags.items() if value]


def wandb_settings(
    cfg: DictConfig,
    job_type: str,
    *,
    stage: str | None = None,
    training_run: dict[str, Any] | None = None,
    group: str | None = None,
    trained: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for the WandbLogger (and so `wandb.init`) of one job or stage."""
    if job_type not in JOB_TYPES:
        raise ValueError(f"W&B job_type={job_type!r} is not one of {', '.join(JOB_TYPES)}")
    swept = swept_settings()
    name = str(cfg.run_name) + (f"[{','.join(swept)}]" if swept else "") + (f"/{stage}" if stage else "")
    settings: dict[str, Any] = {
        "name": name,
        "group": group or sweep_group(cfg, fallback=(training_run or {}).get("group")),
        "job_type": job_type,
        "tags": run_tags(cfg, trained),
    }
    return settings


def build_loggers(cfg: DictConfig, job_type: str, **run: Any) -> list[Logger]:
    """The `cfg.logger` loggers; the W&B one with this job's group, type, tags and name, and the
    training run of a search's or bench's checkpoint as `config.training_run`."""
    loggers = []
    for node in (cfg.logger or {}).values():
        if not str(node.get("_target_", "")).endswith("WandbLogger"):
            loggers.append(instantiate(node))
            continue
        logger = instantiate(node, **wandb_settings(cfg, job_type, **run))
        if run.get("training_run"):
            logger.experiment.config.update({"training_run": run["training_run"]})
        loggers.append(logger)
    return loggers


def training_run_of(checkpoint: str | Path) -> dict[str, Any] | None:
    """The W&B training run recorded in a checkpoint (None for checkpoints written without one)."""
    return read_checkpoint(checkpoint).get(TRAINING_RUN_KEY)


def training_run_record(loggers: list[Logger], run_dir: Path) -> dict[str, Any]:
    """What a checkpoint records about the run that trains it: its folder, and its W&B run."""
    record: dict[str, Any] = {"run_dir": str(run_dir)}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            record |= {"wandb_id": run.id, "project": run.project, "group": run.group or None, "name": run.name}
    return record


def log_files_artifact(loggers: list[Logger], name: str, kind: str, files: list[Path]) -> None:
    """Log `files` as one W&B artifact of type `kind` (e.g. a search cache) on the W&B logger."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            artifact = wandb.Artifact(name, type=kind)
            for path in files:
                artifact.add_file(str(path))
            logger.experiment.log_artifact(artifact)


@contextmanager
def one_run() -> Iterator[None]:
    """Finish the active W&B run when the job or stage ends (failed runs as failed)."""
    try:
        yield
    except BaseException:
        if wandb.run is not None:
            wandb.finish(exit_code=1)
        raise
    if wandb.run is not None:
        wandb.finish()
