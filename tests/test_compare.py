"""tokenprune-compare: trained runs and search fronts in one table, best score within budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from apps import run_cli


def write_run(path: Path, score: float, flops_ratio: float) -> None:
    path.parent.mkdir(parents=True)
    report = {"report/accuracy": score, "report/flops_ratio": flops_ratio, "report/gflops": 2 * flops_ratio}
    path.write_text(json.dumps({"run_dir": str(path.parent), "report": report | {"report/unpruned_accuracy": 0.9}}))


def test_runs_and_fronts_in_one_table_with_the_best_score_within_each_budget(tmp_path):
    for name, score, ratio in (("a", 0.88, 0.45), ("b", 0.86, 0.31), ("c", 0.89, 0.62)):
        write_run(tmp_path / "ltp" / name / "results.json", score, ratio)
    front = tmp_path / "search" / "front.csv"
    front.parent.mkdir()
    pd.DataFrame(
        {"candidate": ["k0.3", "k0.5"], "score": [0.80, 0.87], "flops_ratio": [0.35, 0.52], "gflops": [0.7, 1.0]}
    ).to_csv(front, index=False)
    out = tmp_path / "compare"
    args = ["--runs", f"{tmp_path}/ltp/*/results.json", "--label", "ltp", "--fronts", f"topk={front}"]
    args += ["--budgets", "0.3,0.4,0.5,0.6", "--out", str(out)]
    done = run_cli("tokenprune.apps.compare", args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(out / "table.csv")
    assert sorted(zip(table.method, table.score)) == [
        ("ltp", 0.86),
        ("ltp", 0.88),
        ("ltp", 0.89),
        ("topk", 0.80),
        ("topk", 0.87),
    ]
    budgets = pd.read_csv(out / "budgets.csv").set_index("method")
    assert budgets.loc["ltp"].tolist()[1:] == [0.86, 0.88, 0.88] and pd.isna(budgets.loc["ltp", "<= 0.3x"])
    assert pd.isna(budgets.loc["topk", "<= 0.3x"]) and budgets.loc["topk"].tolist()[1:] == [0.80, 0.80, 0.87]
    assert "Best accuracy within relative-FLOPs budgets" in (out / "table.md").read_text()
    assert (out / "front.png").stat().st_size > 0
    again = run_cli("tokenprune.apps.compare", args, tmp_path)
    assert again.returncode == 2 and f"--out {out} exists; an earlier comparison is never overwritten" in again.stderr
    assert pd.read_csv(out / "table.csv").equals(table)


def test_lower_is_better_budgets_take_the_lowest_score(tmp_path):
    for name, score, ratio in (("a", 30.0, 0.4), ("b", 25.0, 0.5)):
        write_run(tmp_path / "runs" / name / "results.json", score, ratio)
    out = tmp_path / "compare"
    args = ["--runs", f"{tmp_path}/runs/*/results.json", "--label", "acc", "--budgets", "0.5", "--mode", "min"]
    done = run_cli("tokenprune.apps.compare", [*args, "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert pd.read_csv(out / "budgets.csv").loc[0, "<= 0.5x"] == 25.0
