"""`tokenprune-search`: accuracy-vs-FLOPs search over pruning configurations of a trained model.

    tokenprune-search checkpoint=outputs/train/.../checkpoints/last.ckpt search=keep_ratio_grid
    tokenprune-search checkpoint=... search=threshold_grid 'search.values=[0.005,0.01,0.02]'

Candidates are scored on the task's `val` split with physically pruned forwards; the Pareto
front is then evaluated on the `report` split. Every evaluation is cached on disk under
`<outputs>/search/<run_name>/cache-<digest>.jsonl` (digest of the checkpoint's path, size and
modification time), keyed by split
and pruner configuration: rerunning a killed search resumes without re-evaluating anything, and a
longer or wider search of the same checkpoint (more iterations, other bounds) reuses every
configuration already scored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from tokenprune.allocator import keep_freed_memory
from tokenprune.apps.options import refusals_as_messages
from tokenprune.apps.runs import build_loggers, log_files_artifact, one_run, training_run_of
from tokenprune.apps.settings import (
    SEARCH,
    check_settings,
    claimed_run_dir,
    nothing_left_if_refused,
)
from tokenprune.config import plain_errors
from tokenprune.modules.loading import load_module
from tokenprune.pruners.length import LengthConfigPruner
from tokenprune.search.context import SearchContext, SearchStrategy
from tokenprune.search.evaluate import datamodule_for, evaluate
from tokenprune.search.evolution import ConstantRatioSearch
from tokenprune.search.latency import measured_speedups
from tokenprune.search.pareto import hypervolume, pareto_front, plot_fronts
from tokenprune.search.store import CandidateStore
from tokenprune.throughput import device_name

log = logging.getLogger(__name__)

SEARCH_OUTPUTS = ("candidates.csv", "front.csv", "summary.json")  # what makes a folder another search's
VAL_CURVE = "val split"  # every candidate, val split; the other curves are on the report split


def cache_path(cfg: DictConfig) -> Path:
    """One cache per checkpoint file (path, size, mtime) and run name. The search settings are not
    part of it: a score depends only on the model, the split and the pruner configuration."""
    checkpoint = Path(cfg.checkpoint).resolve()
    stat = checkpoint.stat()
    identity = json.dumps([str(checkpoint), stat.st_size, stat.st_mtime_ns])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Path(cfg.paths.root) / "search" / cfg.run_name / f"cache-{digest}.jsonl"


def cache_key(split: str, pruner_cfg: dict[str, Any]) -> str:
    """A candidate's identity: its split and its full pruner configuration, not its display name
    (`keep_ratio=0.5` means different pruners under different `search.pruner` settings)."""
    return f"{split}:{json.dumps(pruner_cfg, sort_keys=True)}"


def evaluation_seed(identity: str) -> int:
    """The RNG seed of one evaluation, from its cache identity: a pruner that draws tokens at random
    (the random baseline, ACC's order=random) scores the same in any search, resumed or not."""
    return int(hashlib.sha256(identity.encode()).hexdigest()[:15], 16)


def run_search(cfg: DictConfig) -> dict[str, Any]:
    if cfg.checkpoint is None or not Path(cfg.checkpoint).is_file():
        raise FileNotFoundError(
            f"checkpoint={cfg.checkpoint} is not a file; tokenprune-search needs a trained checkpoint"
        )
    check_settings(cfg, SEARCH)
    with plain_errors():
        strategy = instantiate(cfg.search, _convert_="all")
    module = load_module(cfg.checkpoint)
    required = strategy.required_module
    if required is not None and not isinstance(module, required):
        raise ValueError(
            f"search={HydraConfig.get().runtime.choices['search']} needs a checkpoint trained by "
            f"{required.__name__}; {cfg.checkpoint} was trained by {type(module).__name__}"
        )
    if hasattr(strategy, "validate"):  # candidates known up front are built once, before any evaluation
        with plain_errors():
            strategy.validate(module.build_pruner)
    with claimed_run_dir(Path(cfg.paths.output_dir), cfg, SEARCH_OUTPUTS, "search"):
        torch.set_num_threads(int(cfg.threads))
        module = module.to(torch.device(cfg.device))
        data = datamodule_for(module, cfg.eval_batch_size, "validate")
        store = CandidateStore(cache_path(cfg))
        main = module.hparams["task"]["main_metric"]
        mode = module.hparams["task"].get("main_mode", "max")

        def score(key: str, pruner_cfg: dict[str, Any], split: str = "val") -> dict[str, Any]:
            identity = cache_key(split, pruner_cfg)
            if identity in store:
                return {**store.get(identity), "candidate": key}
            pruner = module.build_pruner(pruner_cfg)
            torch.manual_seed(evaluation_seed(identity))
            result = evaluate(module, data.eval_dataloader(split), pruner, desc=f"{split} {key}")
            return store.add(
                identity, {"candidate": key, "split": split, "score": result[main], **result, "pruner": pruner_cfg}
            )

        template = (
            module.pruner
            if isinstance(module.pruner, LengthConfigPruner)
            else LengthConfigPruner(
                module.adapter.num_layers, reference_length=int(module.hparams["task"]["max_length"])
            )
        )

        @functools.cache
        def timing_batches() -> list[dict[str, Tensor]]:
            """The report split in batches of measure.batch_size, tokenized once per search."""
            loader = data.eval_dataloader("report", int(cfg.measure.batch_size))
            return [{k: v.to(module.device) for k, v in b.items() if k != "labels"} for b in loader]

        def measure(pruner_cfgs: list[dict[str, Any]], batches: list[dict[str, Tensor]] | None = None) -> list[float]:
            pruners = [module.build_pruner(c) for c in pruner_cfgs]
            with torch.inference_mode():
                return measured_speedups(
                    module, pruners, batches or timing_batches(), int(cfg.measure.warmup), int(cfg.measure.repeats)
                )

        @functools.cache
        def latency_batches() -> list[dict[str, Tensor]]:
            """A fixed sample of the val split: measure.search_batches batches spread over its
            length-sorted batches, so every length range is timed."""
            loader = data.eval_dataloader("val", int(cfg.measure.batch_size))
            batches = [{k: v.to(module.device) for k, v in b.items() if k != "labels"} for b in loader]
            picks = np.unique(np.linspace(0, len(batches) - 1, int(cfg.measure.search_batches)).round().astype(int))
            return [batches[i] for i in picks]

        device = f"{device_name(module.device)}, {keep_freed_memory()}"  # what a cached latency was measured under
        workload = f"batch {int(cfg.measure.batch_size)} x {int(cfg.measure.search_batches)}"  # and on what

        def latency(pruner_cfg: dict[str, Any]) -> float:
            """Wall time of a configuration over the stock model's (interleaved), cached per device
            and timing sample (measure.batch_size, measure.search_batches)."""
            identity = f"latency:{device}:{workload}:{cache_key('val', pruner_cfg)}"
            if identity in store:
                return float(store.get(identity)["latency_ratio"])
            speedup = measure([pruner_cfg], latency_batches())[0]
            return store.add(identity, {"latency_ratio": 1 / speedup, "device": device, "pruner": pruner_cfg})[
                "latency_ratio"
            ]

        context = SearchContext(
            module.dims, template, data.split_lengths("val"), score, module.pruner, measure, main, mode, latency
        )
        candidates = pd.DataFrame(strategy.run(context))
        front = pareto_front(candidates, "score", strategy.efficiency, mode)
        reported = pd.DataFrame(
            [score(row.candidate, row.pruner, split="report") | extra_columns(row) for row in front.itertuples()]
        )
        curves = {VAL_CURVE: candidates, "front, report split": reported}
        if cfg.compare_constant_ratios:
            baseline = ConstantRatioSearch(list(cfg.compare_constant_ratios)).run(context)
            curves["constant ratio, report split"] = pd.DataFrame(
                [score(r["candidate"], r["pruner"], split="report") for r in baseline]
            )
        unpruned = score("unpruned", {"_target_": None}, split="report")
        summary = {
            "evaluated": store.added,
            "cache_hits": store.hits,
            "cache_size": len(store.records),
            "cache": str(store.path),
            "val_hypervolume": hypervolume(candidates, "score", strategy.efficiency, mode=mode),
            "report_unpruned_score": unpruned["score"],
            "report_unpruned_gflops": unpruned["gflops"],
            "main_metric": main,
            "main_mode": mode,
        }
        write_outputs(cfg, candidates, reported, curves, context.history, summary, strategy, module.hparams)
        return {"candidates": candidates, "front": reported, "curves": curves, "history": context.history, **summary}


def extra_columns(row: Any) -> dict[str, Any]:
    """Carry a front member's search-time bookkeeping (gene, origin, parents) to its report row."""
    return {k: getattr(row, k) for k in ("gene", "heads", "origin", "parents", "latency_ratio") if hasattr(row, k)}


def bench_command(cfg: DictConfig, group: str, pruner_cfg: dict[str, Any]) -> str:
    """The tokenprune-bench command that times a front member (its pruner config as overrides)."""
    settings = " ".join(f"'pruner.{key}={json.dumps(value)}'" for key, value in pruner_cfg.items() if key != "_target_")
    return (
        f"tokenprune-bench {shlex.quote(f'checkpoint={Path(cfg.checkpoint).resolve()}')} checkpoint_pruner=false "
        f"pruner={group} {settings}"
    )


def write_outputs(
    cfg: DictConfig,
    candidates: pd.DataFrame,
    front: pd.DataFrame,
    curves: dict[str, pd.DataFrame],
    history: list[dict[str, float]],
    summary: dict[str, Any],
    strategy: SearchStrategy,
    trained: Mapping[str, Any],
) -> None:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    candidates.drop(columns=["pruner"]).to_csv(out / "candidates.csv", index=False)
    if strategy.pruner_group is not None:
        front = front.assign(bench=[bench_command(cfg, strategy.pruner_group, p) for p in front.pruner])
    front.drop(columns=["pruner"]).to_csv(out / "front.csv", index=False)
    report_curves = [curve.assign(curve=name) for name, curve in curves.items() if name != VAL_CURVE]
    pd.concat(report_curves).drop(columns=["pruner"]).to_csv(out / "report_curves.csv", index=False)
    (out / "summary.json").write_text(json.dumps({**summary, "history": history}, indent=2))
    plot = plot_fronts(
        curves,
        "score",
        "gflops",
        out / "front.png",
        f"{cfg.run_name}",
        unpruned=(summary["report_unpruned_gflops"], summary["report_unpruned_score"]),
    )
    own_plot = strategy.write_outputs(out, candidates)
    with one_run():  # this search's W&B run ends here
        loggers = build_loggers(cfg, "search", training_run=training_run_of(cfg.checkpoint), trained=trained)
        if cfg.log_artifacts:  # the cache resumes or extends the search
            cache = Path(summary["cache"])
            log_files_artifact(loggers, f"search-cache-{cache.stem}", "search-cache", [cache])
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            if own_plot is not None and hasattr(logger, "log_table"):  # the strategy's own table and figure
                logger.log_table("search/candidates", dataframe=candidates.drop(columns=["pruner"]))
                logger.log_image("search/strategy_plot", images=[str(own_plot)])
            for point in history:  # front quality per iteration: convergence is visible
                logger.log_metrics(
                    {f"search/{k}": v for k, v in point.items() if k != "iteration"}, step=int(point["iteration"])
                )
            logger.log_metrics({f"search/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
            if hasattr(logger, "log_table"):
                logger.log_table("search/front", dataframe=front.drop(columns=["pruner"]))
                logger.log_image("search/front_plot", images=[str(plot)])
            logger.finalize("success")
    columns = ["candidate", "score", "flops_ratio", "gflops", *(["latency_ratio"] if "latency_ratio" in front else [])]
    print(front[columns].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    log.info(
        "search wrote %s (%d evaluated now, %d from cache; the cache holds %d)",
        out,
        summary["evaluated"],
        summary["cache_hits"],
        summary["cache_size"],
    )


@hydra.main(version_base="1.3", config_path="pkg://tokenprune.conf", config_name="search")
def main(cfg: DictConfig) -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with refusals_as_messages(), nothing_left_if_refused(Path(cfg.paths.output_dir), stop=Path(cfg.paths.root).parent):
        run_search(cfg)


if __name__ == "__main__":
    main()
