"""Sweep aggregation and reports: every job of a multirun in one table, a Pareto front per method.

    tokenprune-report outputs/multirun/2026-12-03_07-00-00-000000            # report/ in the sweep folder
    tokenprune-report outputs/multirun/<time> --wandb                        # + a W&B report (online)

Each multirun of tokenprune-train, -search and -bench aggregates itself when it ends (the Hydra
callback `AggregateSweep`, `hydra.callbacks.aggregate` in the app configs): `sweep.csv` and
`report.md` (one row per job or front point: the swept settings, the report-split metrics,
relative FLOPs and, for bench jobs, measured speedup) and `fronts.png` (every point per method and
its Pareto front as a staircase) in the sweep folder, and the same table and plot as a W&B run of
job_type compare in the sweep's group. `tokenprune-report` writes `report.md` + `fronts.png`
(offline) or a W&B report of the group (`--wandb`, needs `pip install wandb-workspaces` and a
W&B login) from a sweep folder, also one whose launcher stopped on a failed job.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, cast

import pandas as pd
import wandb
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tokenprune.apps.options import GROUP_ENV
from tokenprune.apps.runs import multirun_group
from tokenprune.search.pareto import pareto_front, plot_pareto

OVERRIDES = Path(".hydra") / "overrides.yaml"
SETTINGS = Path(".hydra") / "config.yaml"


def short_name(target: str | None, suffix: str) -> str | None:
    """`tokenprune.pruners.static.TopKPruner` -> `TopK` (suffix `Pruner`)."""
    return target.rsplit(".", 1)[-1].removesuffix(suffix) if target else None


def job_method(settings: DictConfig) -> str:
    """What a job's points are grouped by: the search strategy, or the training method (the pruner
    for plain fine-tuning), or the benched pruner."""
    search = short_name(OmegaConf.select(settings, "search._target_"), "Search")
    module = short_name(OmegaConf.select(settings, "module._target_"), "Module")
    pruner = short_name(OmegaConf.select(settings, "pruner._target_"), "Pruner") or "unpruned"
    if search:
        return search
    return pruner if module in (None, "FineTune") else module


def job_rows(job: Path) -> list[dict[str, Any]]:
    """The points one job folder contributes: a training run's report split, a search's re-scored
    front, or a bench's pruned cells; one `missing` row when it wrote no outputs (failed, running)."""
    settings = cast(DictConfig, OmegaConf.load(job / SETTINGS))
    base = {"job": job.name, "method": job_method(settings)}
    if (job / "results.json").is_file():
        report = json.loads((job / "results.json").read_text())["report"]
        metric = f"report/{settings.task.main_metric}"
        return [
            {
                **base,
                "kind": "train",
                "score": report.get(metric),
                "flops_ratio": report["report/flops_ratio"],
                **report,
            }
        ]
    if (job / "front.csv").is_file():
        front = pd.read_csv(job / "front.csv")
        columns = ["candidate", "score", "flops_ratio", *(["latency_ratio"] if "latency_ratio" in front else [])]
        return [{**base, "kind": "search", **row} for row in front[columns].to_dict(orient="records")]
    if (job / "bench.json").is_file():
        cells = [c for c in json.loads((job / "bench.json").read_text()) if c.get("variant") == "engine_pruned"]
        return [
            {
                **base,
                "kind": "bench",
                "batch_size": cell["batch_size"],
                "length": cell["length"],
                "flops_ratio": 1.0 / cell["flops_speedup"],
                "measured_speedup": cell["speedup"],
                "measured_over_flops_speedup": cell["speedup_over_flops_speedup"],
            }
            for cell in cells
        ]
    return [{**base, "kind": "missing"}]


def job_overrides(job: Path) -> dict[str, str]:
    """A job's command-line settings, `key -> value` (`+`/`~` prefixes dropped)."""
    return dict(str(item).lstrip("+~").split("=", 1) for item in OmegaConf.load(job / OVERRIDES) if "=" in str(item))


def sweep_table(sweep_dir: Path) -> pd.DataFrame:
    """One row per point of every job in `sweep_dir`, with a column per swept setting (a setting
    whose value differs between jobs)."""
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / OVERRIDES).is_file() and (p / SETTINGS).is_file())
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job folders (<job>/.hydra/overrides.yaml): not a sweep folder")
    overrides = {job.name: job_overrides(job) for job in jobs}
    keys = sorted({key for settings in overrides.values() for key in settings})
    swept = [k for k in keys if len({settings.get(k) for settings in overrides.values()}) > 1]
    rows = [{**row, **{k: overrides[job.name].get(k) for k in swept}} for job in jobs for row in job_rows(job)]
    table = pd.DataFrame(rows)
    leading = [*SUMMARY[:3], *swept, *SUMMARY[3:]]
    return table[[c for c in leading if c in table] + [c for c in table if c not in leading]]


# The columns of report.md (sweep.csv has every metric, e.g. the kept tokens per layer), after the swept settings.
SUMMARY = (
    "job",
    "kind",
    "method",
    "candidate",
    "score",
    "flops_ratio",
    "latency_ratio",
    "measured_speedup",
    "measured_over_flops_speedup",
)


def best_per_method(scored: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Each method's Pareto front (score vs relative FLOPs) as rows, from the scored points."""
    fronts = [pareto_front(group, "score", "flops_ratio", mode) for _, group in scored.groupby("method", sort=False)]
    return pd.concat(fronts, ignore_index=True) if fronts else scored


def sweep_mode(sweep_dir: Path) -> str:
    """`max` or `min`: whether a higher score is better, from the jobs' task (`task.main_mode`),
    or for searches (whose settings name a checkpoint, not a task) their summary.json."""
    for settings in sorted(sweep_dir.glob(f"*/{SETTINGS}")):
        mode = OmegaConf.select(OmegaConf.load(settings), "task.main_mode")
        if mode:
            return str(mode)
    for summary in sorted(sweep_dir.glob("*/summary.json")):
        mode = json.loads(summary.read_text()).get("main_mode")
        if mode:
            return str(mode)
    return "max"


def aggregate(sweep_dir: Path, out: Path | None = None) -> dict[str, Path]:
    """Write sweep.csv, report.md and fronts.png for `sweep_dir` into `out` (default: the sweep folder)."""
    out = out or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    table = sweep_table(sweep_dir)
    mode = sweep_mode(sweep_dir)
    scored = table.dropna(subset=["score", "flops_ratio"]) if "score" in table else table.iloc[0:0]
    fronts = best_per_method(scored, mode)
    table.to_csv(out / "sweep.csv", index=False)
    markdown = (
        f"# Sweep {sweep_dir.name}\n\n{len(table.job.unique())} jobs, folder `{sweep_dir}`.\n\n"
        f"## Pareto front per method (score vs relative FLOPs)\n\n{markdown_table(fronts)}\n\n"
        f"![fronts](fronts.png)\n\n## Every job\n\n{markdown_table(table)}\n"
    )
    (out / "report.md").write_text(markdown)
    plot = plot_pareto(
        {name: group for name, group in scored.groupby("method", sort=False)},
        "score",
        "flops_ratio",
        out / "fronts.png",
        f"sweep {sweep_dir.name}",
        mode=mode,
    )
    return {"table": out / "sweep.csv", "markdown": out / "report.md", "plot": plot}


def markdown_table(table: pd.DataFrame) -> str:
    """The summary columns: the leading ones up to the last of SUMMARY present (swept settings included)."""
    if table.empty:
        return "(no scored points)"
    last = max(i for i, c in enumerate(table.columns) if c in SUMMARY)
    return table.iloc[:, : last + 1].to_markdown(index=False, floatfmt=".4f")


def log_compare_run(outputs: dict[str, Path], group: str, project: str, offline: bool, folder: Path) -> str:
    """The aggregate as a W&B run of job_type compare in the sweep's group; returns its id."""
    table = pd.read_csv(outputs["table"])
    with wandb.init(
        project=project,
        group=group,
        job_type="compare",
        name=f"compare-{group}",
        dir=str(folder),
        mode="offline" if offline else "online",
        tags=sorted({f"method:{m}" for m in table.method.dropna().unique()}),
    ) as run:
        run.log({"compare/sweep": wandb.Table(dataframe=table), "compare/fronts": wandb.Image(str(outputs["plot"]))})
        return str(run.id)


class AggregateSweep(Callback):
    """Hydra callback: aggregate a multirun when its last job has finished (see the module docstring)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        outputs = aggregate(sweep_dir)
        wandb_node = OmegaConf.select(config, "logger.wandb")
        if wandb_node is not None:
            group = (
                wandb_node.get("group") or os.environ.get(GROUP_ENV) or multirun_group(config.hydra.job.name, sweep_dir)
            )
            log_compare_run(outputs, group, str(wandb_node.project), bool(wandb_node.offline), sweep_dir)


def wandb_report(markdown: str, project: str, group: str, entity: str | None) -> Any:
    """A W&B report of one sweep group (wandb-workspaces): the aggregate as text, and the group's
    runs as a score-vs-FLOPs scatter and a run comparer. `.save()` publishes it (online)."""
    import wandb_workspaces.reports.v2 as wr  # optional: pip install wandb-workspaces (extra `report`)

    runs = wr.Runset(project=project, entity=entity or "", filters=f"Group = '{group}'", name=group)
    report = wr.Report(project=project, entity=entity or "", title=f"tokenprune sweep {group}")
    report.blocks = [
        wr.MarkdownBlock(text=markdown),
        wr.PanelGrid(
            runsets=[runs],
            panels=[
                wr.ScatterPlot(title="accuracy vs relative FLOPs", x="report/flops_ratio", y="report/accuracy"),
                wr.RunComparer(),
            ],
        ),
    ]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep folder (outputs/multirun/<time>)")
    parser.add_argument("--out", type=Path, help="where report.md and fronts.png go (default: <sweep>/report)")
    parser.add_argument("--wandb", action="store_true", help="also build a W&B report of the sweep's group (online)")
    parser.add_argument("--project", default="tokenprune")
    parser.add_argument("--entity", default=None)
    parser.add_argument("--group", help="the sweep's W&B group (default: train-<sweep folder name>)")
    args = parser.parse_args()
    if not args.sweep.is_dir():
        parser.error(f"sweep folder {args.sweep} does not exist")
    outputs = aggregate(args.sweep, args.out or args.sweep / "report")
    print(f"report: {outputs['markdown']} (plot {outputs['plot']}, table {outputs['table']})")
    if args.wandb:
        group = args.group or multirun_group("train", args.sweep)
        report = wandb_report(outputs["markdown"].read_text(), args.project, group, args.entity)
        report.save()
        print(f"W&B report: {report.url}")


if __name__ == "__main__":
    main()
