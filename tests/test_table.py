"""tokenprune-table: one comparison table from real run folders (tiny backbone, two seeds)."""

from __future__ import annotations

import shlex

import pandas as pd
import pytest
from apps import FAST, compose_app

from tokenprune.apps.bench import measure_and_write
from tokenprune.apps.search import run_search
from tokenprune.apps.table import build, results_page
from tokenprune.apps.train import train


def test_table_takes_each_seeds_point_at_every_level_and_joins_benches(tmp_path):
    root = tmp_path / "sweep"
    fronts = {}
    for seed in (1, 2):
        trained = train(compose_app("train", [*FAST, f"seed={seed}", f"run_name=unpruned-s{seed}"], root / f"u{seed}"))
        search = [
            "logger=csv",
            f"checkpoint={trained['last_checkpoint']}",
            "search=keep_ratio_grid",
            "search.values=[0.3,0.6]",
            "search.pruner.start_layer=0",
            f"run_name=topk-s{seed}",
        ]
        run_search(compose_app("search", search, root / f"topk{seed}"))
        fronts[seed] = pd.read_csv(root / f"topk{seed}" / "front.csv")
    low = round(max(f.flops_ratio.min() for f in fronts.values()) + 0.01, 2)  # every seed has a point below
    assert low < 0.9
    built = build(root, [low, 1.0], tmp_path / "table")
    table = built["table"].set_index(["method", "level"])
    for level in (low, 1.0):  # independently: each seed's front point with the most FLOPs <= level
        chosen = [f[f.flops_ratio <= level].sort_values("flops_ratio").iloc[-1] for f in fronts.values()]
        row = table.loc[("topk", level)]
        assert row.seeds == 2 and row.accuracy_mean == pytest.approx(sum(c.score for c in chosen) / 2)
        assert row.flops_ratio == pytest.approx(sum(c.flops_ratio for c in chosen) / 2) and row.flops_ratio <= level
    assert (tmp_path / "table" / "pareto.png").is_file() and "+-" in (tmp_path / "table" / "table.md").read_text()
    page = results_page(built, root, "tokenprune-table sweep")
    assert "| topk |" in page and "GLUE 83.0 on MobileBERT" in page and "`tokenprune-table sweep`" in page

    plan = built["plan"]
    assert plan and all(command.startswith("tokenprune-bench ") and "run_name=topk-s1" in command for command in plan)
    overrides = [*shlex.split(plan[0])[1:], "logger=csv", "repeats=1", "warmup=0"]
    measure_and_write(compose_app("bench", overrides, root / "bench"))
    again = build(root, [low, 1.0], tmp_path / "table")
    benched = again["points"].dropna(subset=["measured_speedup"])
    assert len(benched) == 1 and benched.iloc[0].seed == 1 and benched.iloc[0].measured_speedup > 0
    assert len(again["plan"]) == len(plan) - 1, "a benched point leaves the plan"
