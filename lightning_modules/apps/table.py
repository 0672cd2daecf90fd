"""One comparison table per task: every method x seed x relative-FLOPs level, from a sweep's outputs.

    tokenprune-table outputs/methods_table/rt_sentiment-<time> [--levels 0.3,0.4,0.5,0.6,0.7] [--wandb]

Reads every run under the root: training runs (`results.json`; an experiment's stage folders are
counted once, through the experiment's own results), searches (`front.csv`: the val-split front
re-scored on the report split) and benches (`bench.json`). A run's method and seed come from its
run_name, `<method>-s<seed>`, as `sweeps/methods_table.sh` names them; `unpruned-s<seed>` are the
fine-tuned models every method starts from.

At each level a method's point for a seed is the one with the most FLOPs at or below the level:
on a front (chosen on the val split) and on a lambda or keep-ratio grid that is the most accurate
one expected, picked without looking at report accuracy. The table (`table.csv`, `table.md`) gives
the accuracy mean +- std over seeds, its difference to the unpruned models, the mean relative
FLOPs, the measured CPU speedup (report split at real lengths, batch 32, interleaved with stock HF:
ACC's offline search measures it itself, the others from a bench run of the first seed's point)
and measured / FLOPs speedup; then per method the fewest FLOPs that lose nothing against each
seed's unpruned model. `bench_plan.txt` lists the bench commands still missing; `pareto.png`
plots every point; `results.md` (and `--page`) is the results page: the table beside the papers'
published figures, the machine and the command. `--wandb` logs table and plot to the sweep's W&B
group (job_type table).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import wandb
from omegaconf import DictConfig, OmegaConf

from tokenprune.apps.options import GROUP_ENV, fractions
from tokenprune.search.pareto import plot_pareto

RUN_NAME = re.compile(r"^(?P<method>.+)-s(?P<seed>\d+)$")
UNPRUNED = "unpruned"
BENCH_COMMAND = "tokenprune-bench {checkpoint}"  # run by the sweeps through `eval`: the path is quoted
# The files a table is built from, in a run's folder (tokenprune-ledger copies them).
RESULTS, FRONT, OFFLINE_TUNING, BENCH = "results.json", "front.csv", "offline_tuning.csv", "bench.json"
TABLE_INPUTS = (RESULTS, FRONT, OFFLINE_TUNING, BENCH)


def saved_run(folder: Path) -> tuple[str, int, DictConfig] | None:
    """(method, seed, saved settings) of a run whose run_name is `<method>-s<seed>`; None otherwise."""
    path = folder / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    settings = cast(DictConfig, OmegaConf.load(path))
    match = RUN_NAME.match(str(OmegaConf.select(settings, "run_name", default="")))
    return (match["method"], int(match["seed"]), settings) if match else None


def stage_folders(folder: Path, result: dict[str, Any]) -> set[Path]:
    """Where the stage runs of the experiment whose results.json lies in `folder` are: at the same
    place relative to it when they ran inside the experiment's folder (so also in a copy of the
    sweep, tokenprune-ledger), else where they ran."""
    experiment = Path(result["run_dir"])
    stages = [Path(stage["run_dir"]) for stage in result.get("stages", {}).values()]
    return {folder / stage.relative_to(experiment) if stage.is_relative_to(experiment) else stage for stage in stages}


def training_points(root: Path) -> list[dict[str, Any]]:
    """One point per finished training run (experiments once, reused results once); the stages of
    an experiment are not points of their own, also when the experiment was killed after them."""
    results = {}
    for path in sorted(root.glob(f"**/{RESULTS}")):
        try:
            results[path.parent] = json.loads(path.read_text())
        except ValueError:  # being written by a run that is still going
            continue
    stage_dirs = {stage for folder, result in results.items() for stage in stage_folders(folder, result)}
    points, seen = [], set()
    for folder, result in results.items():
        run = saved_run(folder)
        if run is None or folder in stage_dirs or result.get("stage") or result["run_dir"] in seen:
            continue
        seen.add(result["run_dir"])
        method, seed, settings = run
        report = result["report"]
        points.append(
            {
                "method": method,
                "seed": seed,
                "kind": "train",
                "score": report[f"report/{settings.task.main_metric}"],
                "flops_ratio": report["report/flops_ratio"],
                "measured_speedup": np.nan,
                "bench": BENCH_COMMAND.format(checkpoint=shlex.quote(f"checkpoint={result['last_checkpoint']}")),
                "source": result["run_dir"],
                "backbone": settings.backbone.name,
                "task": settings.task.name,
            }
        )
    return points


def search_table(folder: Path) -> pd.DataFrame:
    """A search's report-split points: its front, or for ACC's offline tuning every SC value with
    its measured speedup (`offline_tuning.csv`, the SV-sorted rows; the ablation orders are not
    methods of their own)."""
    tuning = folder / OFFLINE_TUNING
    if not tuning.is_file():
        return pd.read_csv(folder / FRONT)
    table = pd.read_csv(tuning)
    table = table[table.order == "sv"] if "order" in table else table
    return table.assign(score=table.report_score, flops_ratio=table.report_flops_ratio)


def search_points(root: Path) -> list[dict[str, Any]]:
    """The report-split points of every search run (`search_table`)."""
    points = []
    for path in sorted(root.glob(f"**/{FRONT}")):
        run = saved_run(path.parent)
        if run is None:
            continue
        method, seed, _ = run
        for row in search_table(path.parent).to_dict(orient="records"):
            points.append(
                {
                    "method": method,
                    "seed": seed,
                    "kind": "search",
                    "candidate": row.get("candidate"),
                    "score": row["score"],
                    "flops_ratio": row["flops_ratio"],
                    "measured_speedup": row.get("measured_speedup", np.nan),
                    "bench": row.get("bench"),
                    "source": str(path.parent),
                }
            )
    return points


def bench_points(root: Path) -> pd.DataFrame:
    """Measured speedups of pruned configurations: method, seed, flops_ratio, measured_speedup."""
    rows = []
    for path in sorted(root.glob(f"**/{BENCH}")):
        run = saved_run(path.parent)
        if run is None:
            continue
        method, seed, _ = run
        for cell in json.loads(path.read_text()):
            if cell.get("variant") == "engine_pruned" and cell.get("batch_size") == 32:
                flops = 1.0 / cell["flops_speedup"]
                speedup, device = cell["speedup"], cell.get("device")
                if cell.get("allocator"):  # benches record the malloc policy they ran under (allocator.py)
                    device = f"{device}, allocator: {cell['allocator']}"
                rows.append(
                    {"method": method, "seed": seed, "flops_ratio": flops, "speedup": speedup, "device": device}
                )
    return pd.DataFrame(rows, columns=["method", "seed", "flops_ratio", "speedup", "device"])


def with_benches(points: pd.DataFrame, benches: pd.DataFrame, tolerance: float = 0.005) -> pd.DataFrame:
    """Fill each point's measured speedup from a bench of the same method, seed and FLOPs."""
    points = points.copy()
    for index, point in points.iterrows():
        if not np.isnan(point.measured_speedup):
            continue
        same = benches[(benches.method == point.method) & (benches.seed == point.seed)]
        close = same[(same.flops_ratio - point.flops_ratio).abs() <= tolerance]
        if len(close):
            points.loc[index, "measured_speedup"] = close.speedup.mean()
    return points


def at_level(points: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per method and seed, the point with the most FLOPs at or below `level`. Points whose FLOPs agree
    to 6 decimals are one configuration recorded twice (ACC's training point, in float32, and its
    offline tuning's row at the same coefficient): of those, a measured one."""
    within = points[points.flops_ratio <= level + 1e-9]
    tie_break = {"same_flops": within.flops_ratio.round(6), "measured": within.measured_speedup.notna()}
    ranked = within.assign(**tie_break).sort_values(list(tie_break), kind="stable")
    return ranked.groupby(["method", "seed"]).tail(1).drop(columns=list(tie_break))


def unpruned_scores(points: pd.DataFrame) -> pd.Series:
    """Each seed's unpruned (fine-tuned) model's score, indexed by seed."""
    return points[points.method == UNPRUNED].groupby("seed").score.max()


LEVEL_COLUMNS = [
    "method",
    "level",
    "seeds",
    "accuracy_mean",
    "accuracy_std",
    "delta_vs_unpruned",
    "flops_ratio",
    "measured_speedup",
    "measured_over_flops",
    "benched_seeds",
]


def level_table(points: pd.DataFrame, levels: list[float], unpruned: pd.Series) -> pd.DataFrame:
    """Method x level: accuracy mean +- std over seeds, its gap to the unpruned models, FLOPs, speed."""
    rows = []
    for level in levels:
        chosen = at_level(points[points.method != UNPRUNED], level)
        for method, group in chosen.groupby("method", sort=True):
            speedup = group.measured_speedup.dropna()
            flops_speedup = 1.0 / group.flops_ratio[speedup.index] if len(speedup) else pd.Series(dtype=float)
            rows.append(
                {
                    "method": method,
                    "level": level,
                    "seeds": len(group),
                    "accuracy_mean": group.score.mean(),
                    "accuracy_std": group.score.std(ddof=1) if len(group) > 1 else np.nan,
                    "delta_vs_unpruned": (group.score - group.seed.map(unpruned)).mean(),
                    "flops_ratio": group.flops_ratio.mean(),
                    "measured_speedup": speedup.mean() if len(speedup) else np.nan,
                    "measured_over_flops": (speedup / flops_speedup).mean() if len(speedup) else np.nan,
                    "benched_seeds": len(speedup),
                }
            )
    return pd.DataFrame(rows, columns=LEVEL_COLUMNS)  # the columns also when no method reaches a level


def lossless_flops(points: pd.DataFrame, unpruned: pd.Series) -> pd.DataFrame:
    """Per method: the fewest relative FLOPs that keep a seed's unpruned accuracy, averaged over
    the seeds that have such a point (`seeds_lossless` of `seeds`; NaN when none has)."""
    rows = []
    for method, group in points[points.method != UNPRUNED].groupby("method", sort=True):
        per_seed = pd.Series(
            [
                seeded[seeded.score >= unpruned.get(seed, np.inf)].flops_ratio.min()
                for seed, seeded in group.groupby("seed")
            ]
        )
        found = per_seed.dropna()
        rows.append(
            {
                "method": method,
                "lossless_flops_ratio": found.mean() if len(found) else np.nan,
                "seeds_lossless": len(found),
                "seeds": len(per_seed),
            }
        )
    return pd.DataFrame(rows, columns=["method", "lossless_flops_ratio", "seeds_lossless", "seeds"])


def bench_plan(points: pd.DataFrame, levels: list[float]) -> list[str]:
    """Bench commands for the first seed's chosen points that have no measured speedup yet."""
    seed = points.seed.min()
    first = points[(points.seed == seed) & (points.method != UNPRUNED)]
    chosen = pd.concat([at_level(first, level) for level in levels]).drop_duplicates(subset=["method", "flops_ratio"])
    missing = chosen[chosen.measured_speedup.isna() & chosen.bench.notna()]
    return [
        f"{command} 'lengths=[report]' 'batch_sizes=[32]' run_name={method}-s{seed}"
        for command, method in zip(missing.bench, missing.method)
    ]


def mean_std(mean: float, std: float) -> str:
    """`mean +- std`, or the mean alone when there is one seed."""
    return f"{mean:.4f} +- {std:.4f}" if not np.isnan(std) else f"{mean:.4f}"


def unpruned_line(unpruned: pd.Series) -> str:
    seeds = len(unpruned)
    spread = unpruned.std(ddof=1) if seeds > 1 else np.nan
    return f"Unpruned: {mean_std(unpruned.mean(), spread)} over {seeds} seed{'s' if seeds > 1 else ''}"


def speed_text(row: Any) -> str:
    """A level row's measured / FLOPs speedup, naming how many of its seeds' points were benched when
    not all were (the ratio then describes those points, not the row's mean FLOPs)."""
    if np.isnan(row.measured_over_flops):
        return "not benched"
    partial = f", {row.benched_seeds} of {row.seeds} seeds benched" if row.benched_seeds < row.seeds else ""
    return f"{row.measured_over_flops:.2f}{partial}"


def by_level(table: pd.DataFrame) -> pd.DataFrame:
    """Method x level, each cell `accuracy @ FLOPs ratio (measured / FLOPs)`, as one reads a front."""
    cells = table.assign(
        cell=[
            f"{mean_std(row.accuracy_mean, row.accuracy_std)} @{row.flops_ratio:.3f}"
            + (f" ({speed_text(row)})" if not np.isnan(row.measured_over_flops) else "")
            for row in table.itertuples()
        ]
    )
    wide = cells.pivot(index="method", columns="level", values="cell").fillna("-")
    wide.columns = [f"<= {level:g}x" for level in wide.columns]
    return wide.reset_index()


def missing_as_dash(frame: pd.DataFrame) -> str:
    """A frame as markdown with 3 decimals and `-` where a value is missing (not `nan`)."""
    return frame.astype(object).where(frame.notna(), None).to_markdown(index=False, floatfmt=".3f", missingval="-")


def markdown(table: pd.DataFrame, lossless: pd.DataFrame, unpruned: pd.Series) -> str:
    """table.md: the unpruned models, accuracy at each level (wide, then long), the fewest lossless FLOPs."""
    accuracy = [mean_std(mean, std) for mean, std in zip(table.accuracy_mean, table.accuracy_std)]
    shown = table.assign(accuracy=accuracy).drop(columns=["accuracy_mean", "accuracy_std"])
    levels = (
        f"{by_level(table).to_markdown(index=False)}\n\n{missing_as_dash(shown)}"
        if len(table)
        else "No method has a point at or below any of the levels (`--levels`)."
    )
    return (
        f"{unpruned_line(unpruned)}\n\n"
        "## Accuracy at relative-FLOPs levels\n\n"
        "Each cell: report accuracy (mean +- std over seeds) @ relative FLOPs (measured / FLOPs speedup, "
        "averaged over the seeds whose chosen point was benched).\n\n"
        f"{levels}\n\n"
        f"## Fewest FLOPs without loss\n\n{missing_as_dash(lossless)}\n"
    )


# What each paper published, for the results page (their backbones and tasks, not ours).
PUBLISHED = {
    "ltp": "LTP (Kim et al., KDD 2022): < 1% accuracy drop at 2.1x fewer FLOPs; 1.9x CPU and 2.0x GPU throughput",
    "length_adaptive": "Length-Adaptive (Kim and Cho, ACL 2021): 0.35x FLOPs with no accuracy loss on SST-2",
    "token_head_adaptive": "Token+Head Adaptive (Lee et al., COLING 2022): GLUE 83.0 on MobileBERT",
    "acc": "ACC (Kachuee and Sharifkhani, 2022): BERT-base 2.9x speedup at a 0.73% accuracy drop",
}


def summary_row(method: str, built: dict[str, Any], level: float) -> str:
    """One method's line of the page's summary: accuracy and speed at `level`, lossless FLOPs."""
    lossless = built["lossless"].set_index("method")
    if method not in lossless.index:
        return f"| {method} | not run | not run | not run | {PUBLISHED.get(method, '')} |"
    found = lossless.loc[method]
    seeds, seeds_lossless = int(found.seeds), int(found.seeds_lossless)
    flops = f"{found.lossless_flops_ratio:.3f}x" if seeds_lossless else "none"
    at = built["table"][(built["table"].method == method) & (built["table"].level == level)]
    if at.empty:
        accuracy = speed = "no point"
    else:
        row = at.iloc[0]
        accuracy = f"{mean_std(row.accuracy_mean, row.accuracy_std)} ({100 * row.delta_vs_unpruned:+.1f} pt)"
        speed = speed_text(row)
    return (
        f"| {method} | {accuracy} | {speed} | {flops} ({seeds_lossless} of {seeds} seeds) "
        f"| {PUBLISHED.get(method, '')} |"
    )


def results_page(built: dict[str, Any], root: Path, command: str, level: float = 0.5, plot: str | None = None) -> str:
    """The results page: our table beside the papers' published figures, the machine, the command;
    `plot`: the Pareto plot's path relative to the page, shown under the summary."""
    methods = sorted(set(built["lossless"].method) | set(PUBLISHED))
    lines = [
        f"# Results: {', '.join(built['tasks'])} on {', '.join(built['backbones'])}",
        "",
        f"Generated by `tokenprune-table` from the run outputs under `{root}`; do not edit by hand.",
        f"Command: `{command}`. Measured on: {', '.join(built['devices']) or 'no bench run yet'}.",
        "",
        "The papers' figures are on their own backbones and tasks; ours follow the page's title.",
        "",
        f"| method | ours: accuracy at <= {level:g}x FLOPs (change) | ours: measured / FLOPs speedup there "
        "| ours: fewest FLOPs without loss | published |",
        "|---|---|---|---|---|",
        *(summary_row(method, built, level) for method in methods),
    ]
    if plot is not None:
        lines += ["", f"![report accuracy against relative FLOPs, every method and seed]({plot})"]
    return "\n".join(lines) + "\n\n" + built["markdown"]


def one_setting(points: pd.DataFrame, column: str) -> list[str]:
    """The one backbone (or task) of a table's training runs; several in one root is an error."""
    values = sorted(points[column].dropna().unique())
    if len(values) > 1:
        raise ValueError(f"the runs compared hold several {column} settings, {values}: one table per {column}")
    return values


def build(root: Path, levels: list[float], out: Path) -> dict[str, Any]:
    """Write table.csv, table.md, points.csv, bench_plan.txt and pareto.png into `out`."""
    points = pd.DataFrame(training_points(root) + search_points(root))
    if points.empty or UNPRUNED not in set(points.method):
        raise FileNotFoundError(f"{root} holds no `{UNPRUNED}-s<seed>` training runs: nothing to compare against")
    backbones, tasks = one_setting(points, "backbone"), one_setting(points, "task")
    benches = bench_points(root)
    points = with_benches(points, benches)
    unpruned = unpruned_scores(points)
    table = level_table(points, levels, unpruned)
    lossless = lossless_flops(points, unpruned)
    out.mkdir(parents=True, exist_ok=True)
    points.to_csv(out / "points.csv", index=False)
    table.to_csv(out / "table.csv", index=False)
    text = markdown(table, lossless, unpruned)
    (out / "table.md").write_text(text)
    plan = bench_plan(points, levels)
    (out / "bench_plan.txt").write_text("".join(f"{line}\n" for line in plan))
    plot = plot_pareto(
        {method: group for method, group in points[points.method != UNPRUNED].groupby("method")},
        "score",
        "flops_ratio",
        out / "pareto.png",
        "report accuracy vs relative FLOPs (every seed)",
        unpruned=(1.0, float(unpruned.mean())),
    )
    devices = sorted({str(device) for device in benches.device.dropna()})
    return {
        "points": points,
        "table": table,
        "lossless": lossless,
        "backbones": backbones,
        "tasks": tasks,
        "markdown": text,
        "plan": plan,
        "plot": plot,
        "devices": devices,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the sweep's output folder (TOKENPRUNE_OUTPUTS of sweeps/methods_table.sh)")
    parser.add_argument(
        "--levels", default=[0.3, 0.4, 0.5, 0.6, 0.7], type=fractions("--levels"), help="relative-FLOPs levels"
    )
    parser.add_argument("--out", default=None, help="default: <root>/table")
    parser.add_argument("--wandb", action="store_true", help="log table and plot to W&B (offline unless WANDB_MODE)")
    parser.add_argument("--page", default=None, help="also write the results page here (e.g. docs/results/<task>.md)")
    args = parser.parse_args()
    levels = args.levels
    root = Path(args.root)
    out = Path(args.out) if args.out else root / "table"
    built = build(root, levels, out)
    command = " ".join(["tokenprune-table", *sys.argv[1:]])
    (out / "results.md").write_text(results_page(built, root, command, plot="pareto.png"))
    if args.page:
        page = Path(args.page)
        page.parent.mkdir(parents=True, exist_ok=True)
        plot = page.with_name(f"{page.stem}-pareto.png")
        shutil.copyfile(built["plot"], plot)
        page.write_text(results_page(built, root, command, plot=plot.name))
    if args.wandb:
        with wandb.init(
            project="tokenprune",
            name=f"table-{root.name}",
            group=os.environ.get(GROUP_ENV),
            dir=str(out),
            job_type="table",
        ) as run:
            run.log(
                {"table/levels": wandb.Table(dataframe=built["table"]), "table/pareto": wandb.Image(str(built["plot"]))}
            )
    print(built["markdown"])
    if built["plan"]:
        print(f"{len(built['plan'])} bench runs missing: {out / 'bench_plan.txt'}")


if __name__ == "__main__":
    main()
