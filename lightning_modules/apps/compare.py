"""Collect trained runs and search fronts into one accuracy-vs-relative-FLOPs table and plot.

    python -m tokenprune.apps.compare --runs 'outputs/multirun/*/*/results.json' --label ltp \
        --fronts topk=outputs/search/keep_ratio_grid/*/front.csv \
        --out outputs/compare/ltp_vs_baselines [--wandb]

Runs contribute their report-split numbers (`results.json`); searches contribute their fronts
re-scored on the report split (`front.csv`), so every point is on the same split and axes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

import pandas as pd
import wandb

from tokenprune.apps.options import GROUP_ENV, fractions
from tokenprune.search.pareto import plot_pareto


def run_points(pattern: str, label: str, metric: str) -> pd.DataFrame:
    rows = []
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"--runs {pattern} matches no results.json")
    for path in paths:
        result = json.loads(Path(path).read_text())
        report = result["report"]
        rows.append(
            {
                "method": label,
                "run": result["run_dir"],
                "score": report[f"report/{metric}"],
                "flops_ratio": report["report/flops_ratio"],
                "gflops": report["report/gflops"],
                "unpruned_score": report.get(f"report/unpruned_{metric}"),
            }
        )
    return pd.DataFrame(rows)


def front_points(spec: str) -> pd.DataFrame:
    label, pattern = spec.split("=", 1)
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"--fronts {spec} matches no front.csv")
    table = pd.read_csv(paths[-1])
    return table.assign(method=label, run=paths[-1])[["method", "run", "candidate", "score", "flops_ratio", "gflops"]]


def best_within(table: pd.DataFrame, budgets: list[float], mode: str) -> pd.DataFrame:
    """Per method, the best score among points at or below each relative-FLOPs budget (NaN: none)."""
    rows = []
    for method, group in table.groupby("method", sort=False):
        row: dict[str, object] = {"method": method}
        for budget in budgets:
            within = group.loc[group.flops_ratio <= budget + 1e-9, "score"]
            row[f"<= {budget:g}x"] = (within.max() if mode == "max" else within.min()) if len(within) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", action="append", default=[], help="glob of results.json (repeatable)")
    parser.add_argument("--label", action="append", default=[], help="label per --runs")
    parser.add_argument("--fronts", action="append", default=[], help="label=glob of a search's front.csv")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--mode", default="max", choices=["max", "min"], help="higher (max) or lower is better")
    parser.add_argument(
        "--budgets", default=[], type=fractions("--budgets"), help="e.g. 0.3,0.4,0.5: best score per method within each"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--wandb", action="store_true", help="log table and plot to W&B (offline unless WANDB_MODE)")
    args = parser.parse_args()
    if len(args.label) != len(args.runs):
        parser.error("give one --label per --runs")
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; an earlier comparison is never overwritten: name a new folder")
    try:
        parts = [run_points(p, label, args.metric) for p, label in zip(args.runs, args.label)]
        parts += [front_points(spec) for spec in args.fronts]
    except FileNotFoundError as missing:
        parser.error(str(missing))
    table = pd.concat([p for p in parts if not p.empty], ignore_index=True)
    out.mkdir(parents=True)
    table.to_csv(out / "table.csv", index=False)
    markdown = table.drop(columns="run").to_markdown(index=False, floatfmt=".4f")
    if args.budgets:
        budgets = best_within(table, args.budgets, args.mode)
        budgets.to_csv(out / "budgets.csv", index=False)
        summary = budgets.to_markdown(index=False, floatfmt=".4f")
        markdown = f"## Best {args.metric} within relative-FLOPs budgets\n\n{summary}\n\n## Every point\n\n{markdown}"
        print(budgets.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    (out / "table.md").write_text(markdown)
    unpruned = table["unpruned_score"].dropna().mean() if "unpruned_score" in table else None
    plot = plot_pareto(
        {name: group for name, group in table.groupby("method", sort=False)},
        "score",
        "flops_ratio",
        out / "front.png",
        f"{args.metric} vs relative FLOPs",
        mode=args.mode,
        unpruned=None if unpruned is None or pd.isna(unpruned) else (1.0, float(unpruned)),
    )
    if args.wandb:
        group = os.environ.get(GROUP_ENV)  # the sweep's group when a sweep script runs this
        name = f"compare-{out.name}"
        with wandb.init(project="tokenprune", name=name, group=group, dir=str(out), job_type="compare") as run:
            run.log({"compare/table": wandb.Table(dataframe=table), "compare/front": wandb.Image(str(plot))})
    print(table.drop(columns="run").to_string(index=False, float_format=lambda x: f"{x:.4f}"))


if __name__ == "__main__":
    main()
