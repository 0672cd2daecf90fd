"""tokenprune-table: one comparison table from real run folders (tiny backbone, two seeds)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from apps import FAST, compose_app

from tokenprune.allocator import keep_freed_memory
from tokenprune.apps.bench import measure_and_write
from tokenprune.apps.ledger import SETTINGS, export, ledger_files
from tokenprune.apps.search import run_search
from tokenprune.apps.table import (
    TABLE_INPUTS,
    at_level,
    build,
    level_table,
    lossless_flops,
    markdown,
    one_setting,
    results_page,
    unpruned_scores,
)
from tokenprune.apps.train import reuse_finished, train, train_stages
from tokenprune.throughput import device_name


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
    bench_cfg = compose_app("bench", overrides, root / "bench")
    torch.set_num_threads(1)  # the bench runs on its own `threads` setting; the table must name that
    measure_and_write(bench_cfg)
    cells = json.loads((root / "bench" / "bench.json").read_text())
    (cell,) = [c for c in cells if c["variant"] == "engine_pruned" and c["batch_size"] == 32]
    (stock,) = [c for c in cells if c["variant"] == "hf_sdpa" and c["batch_size"] == 32]
    again = build(root, [low, 1.0], tmp_path / "table")
    benched = again["points"].dropna(subset=["measured_speedup"])
    assert len(benched) == 1 and benched.iloc[0].seed == 1
    assert benched.iloc[0].measured_speedup == pytest.approx(cell["seq_per_s"] / stock["seq_per_s"], rel=1e-12)
    assert benched.iloc[0].flops_ratio == pytest.approx(1 / cell["flops_speedup"], abs=0.005)
    assert len(again["plan"]) == len(plan) - 1, "a benched point leaves the plan"
    measured = again["table"].dropna(subset=["measured_over_flops"])
    assert len(measured) and (measured.benched_seeds == 1).all() and (measured.seeds == 2).all()
    assert "1 of 2 seeds benched)" in again["markdown"], "a ratio from one seed's point says so"
    model = device_name(torch.device("cpu")).rsplit(":", 1)[0]  # cpu:<model name>
    assert again["devices"] == [f"{model}:{bench_cfg.threads} threads, allocator: {keep_freed_memory()}"]


def test_a_ledger_copy_builds_the_same_table_and_never_replaces_a_file(tmp_path):
    root = tmp_path / "sweep"
    unpruned = train(compose_app("train", [*FAST, "seed=1", "run_name=unpruned-s1"], root / "u1"))
    rerun = reuse_finished(
        compose_app("train", [*FAST, "seed=1", "run_name=unpruned-s1", "skip_done=true"], root / "rerun")
    )
    assert rerun["reused_by"] == str(root / "rerun") and rerun["run_dir"] == unpruned["run_dir"]
    assert not any(path.parts[0] == "rerun" for path in ledger_files(root)), "the run itself is exported"
    assert ledger_files(root / "rerun") == [SETTINGS, Path("results.json")], "a record of a run not exported stays"
    overrides = [*FAST, "seed=1", "experiment=length_adaptive", "module.num_sandwich=1", "run_name=length_adaptive-s1"]
    experiment = train_stages(compose_app("train", overrides, root / "la1"), overrides)
    for seed, values in ((1, "[0.4,0.7]"), (2, "[0.5]")):  # a top-k grid of each seed on the same model
        search = ["logger=csv", f"checkpoint={unpruned['last_checkpoint']}", "search=keep_ratio_grid"]
        run_search(
            compose_app("search", [*search, f"search.values={values}", f"run_name=topk-s{seed}"], root / f"topk{seed}")
        )
    by_seed = tmp_path / "by_seed"
    seed_two = export(root, by_seed / "s2", seeds={2})
    assert seed_two == [Path("topk2/.hydra/config.yaml"), Path("topk2/front.csv")], "only the seed-2 run"
    seed_one = export(root, by_seed / "s1", seeds={1})
    assert set(seed_one) == set(ledger_files(root)) - set(seed_two), "every other run is seed 1's"
    with pytest.raises(FileNotFoundError, match=r"no runs of --seeds \[3\]"):
        export(root, by_seed / "s3", seeds={3})
    ledger = tmp_path / "ledger"
    copied = export(root, ledger / "session1")
    assert {path.name for path in copied} == {"results.json", "config.yaml", "front.csv"}
    assert not list(ledger.rglob("*.ckpt")) and not list(ledger.rglob("wandb"))
    assert (ledger / "session1" / "la1" / "finetune" / ".hydra" / "config.yaml").is_file(), "stages are copied too"

    original, copy = build(root, [0.5, 1.0], tmp_path / "t1"), build(ledger, [0.5, 1.0], tmp_path / "t2")
    pd.testing.assert_frame_equal(original["table"], copy["table"])
    trained = copy["points"][copy["points"].kind == "train"]
    assert sorted(trained.method) == ["length_adaptive", "unpruned"], "an experiment counts once, not per stage"
    assert trained[trained.method == "length_adaptive"].score.item() == experiment["report"]["report/accuracy"]

    assert export(root, ledger / "session1") == [], "an identical copy again copies nothing"
    front = ledger / "session1" / "topk1" / "front.csv"
    front.write_text(front.read_text().replace("topk", "edited"))
    (root / "u1" / "results.json").unlink()  # (a file the ledger has and the sweep lost stays)
    with pytest.raises(FileExistsError, match="differ"):
        export(root, ledger / "session1")
    assert "edited" in front.read_text() and (ledger / "session1" / "u1" / "results.json").is_file()


def test_the_page_counts_lossless_seeds_marks_methods_not_run_and_refuses_mixed_tasks():
    def point(method: str, seed: int, score: float, flops: float) -> dict:
        return {"method": method, "seed": seed, "score": score, "flops_ratio": flops, "measured_speedup": np.nan}

    points = pd.DataFrame(
        [
            point("unpruned", 1, 0.80, 1.0),
            point("unpruned", 2, 0.90, 1.0),
            point("topk", 1, 0.80, 0.4),  # lossless at 0.4 for seed 1 ...
            point("topk", 1, 0.70, 0.3),
            point("topk", 2, 0.85, 0.45),  # ... and never for seed 2
        ]
    )
    unpruned = unpruned_scores(points)
    table, lossless = level_table(points, [0.5], unpruned), lossless_flops(points, unpruned)
    row = lossless.set_index("method").loc["topk"]
    assert row.lossless_flops_ratio == pytest.approx(0.4) and (row.seeds_lossless, row.seeds) == (1, 2)
    built = {"table": table, "lossless": lossless, "markdown": markdown(table, lossless, unpruned), "devices": []}
    page = results_page(built | {"backbones": ["minilm_l6"], "tasks": ["rt_sentiment"]}, Path("sweep"), "cmd")
    assert "# Results: rt_sentiment on minilm_l6" in page
    assert "| topk | 0.8250 +- 0.0354 (-2.5 pt) | not benched | 0.400x (1 of 2 seeds) |" in page
    assert "| ltp | not run | not run | not run |" in page, "a published method without runs is not 'none'"
    assert "](rt_sentiment-pareto.png)" in results_page(
        built | {"backbones": [], "tasks": []}, Path("s"), "c", plot="rt_sentiment-pareto.png"
    )
    single = unpruned_scores(points[points.seed == 1])
    assert "nan" not in markdown(level_table(points[points.seed == 1], [0.5], single), lossless, single)

    mixed = pd.DataFrame({"task": ["rt_sentiment", "sms_spam", None]})
    with pytest.raises(ValueError, match="several task settings.*one table per task"):
        one_setting(mixed, "task")


def test_of_points_tied_on_flops_the_level_takes_the_measured_one():
    def point(method: str, score: float, flops: float, measured: float = np.nan) -> dict:
        return {"method": method, "seed": 1, "score": score, "flops_ratio": flops, "measured_speedup": measured}

    trained, tuned = point("acc", 0.99, 0.45 + 1e-8), point("acc", 0.99, 0.45, 2.1)  # training in float32
    for order in ([trained, tuned], [tuned, trained]):
        others = [point("acc", 0.98, 0.4, 2.4), point("acc", 0.9, 0.6, 1.5)]
        points = pd.DataFrame([point("unpruned", 1.0, 1.0), *order, *others])
        (chosen,) = at_level(points[points.method == "acc"], 0.5).itertuples()
        assert (chosen.flops_ratio, chosen.measured_speedup) == (0.45, 2.1), "one coefficient, two records"
        (row,) = level_table(points, [0.5], unpruned_scores(points)).itertuples()
        assert row.benched_seeds == 1 and row.measured_over_flops == pytest.approx(2.1 * 0.45)


def test_git_keeps_every_file_a_ledger_holds():
    """The ledger is committed (docs/results/runs): no .gitignore rule may hide a file export()
    copies, at the paths a sweep writes (a `multirun/` rule for Hydra's output once hid every
    training result)."""
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    run = "docs/results/runs/rt_sentiment/2026-12-05-s1/{}/2026-12-05_00-00-00/0-ltp-s1"
    files = [
        f"{run.format(folder)}/{name}"
        for folder in ("multirun", "search", "bench", "outputs")
        for name in (*TABLE_INPUTS, str(SETTINGS))
    ]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=repo, capture_output=True, text=True)
    assert ignored.stdout == "", f"ignored by git: {ignored.stdout}"
