"""tokenprune-search: grid curves, Pareto front, on-disk cache and resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from apps import FAST, compose_app, record_search_evaluations, searched, stock_report_scores

import tokenprune.apps.search as search_app
from tokenprune.apps.search import cache_path, run_search
from tokenprune.apps.train import train
from tokenprune.engine.flops import unpruned_macs
from tokenprune.modules.loading import load_module
from tokenprune.search.evaluate import datamodule_for
from tokenprune.search.pareto import hypervolume, pareto_front
from tokenprune.search.store import CandidateStore


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("trained")
    return train(compose_app("train", FAST, root / "run"))["last_checkpoint"]


def search_cfg(tmp_path, checkpoint, name, extra=()):
    return compose_app(
        "search",
        ["logger=csv", f"checkpoint={checkpoint}", "search=keep_ratio_grid", "search.values=[0.3,0.6,1.0]", *extra],
        tmp_path / name,
    )


def test_front_is_non_dominated_and_hypervolume_grows():
    table = pd.DataFrame({"score": [0.8, 0.7, 0.75, 0.9], "flops_ratio": [0.5, 0.5, 0.3, 1.0]})
    front = pareto_front(table, "score", "flops_ratio")
    assert front.to_dict("list") == {"score": [0.75, 0.8, 0.9], "flops_ratio": [0.3, 0.5, 1.0]}
    assert hypervolume(front, "score", "flops_ratio") > hypervolume(front.iloc[:2], "score", "flops_ratio") > 0


def test_grid_search_writes_front_and_resumes_from_cache(tmp_path, checkpoint):
    first = run_search(search_cfg(tmp_path, checkpoint, "first"))
    assert len(first["candidates"]) == 3 and first["cache_hits"] == 0
    ratios = first["candidates"].sort_values("keep_ratio").flops_ratio.tolist()
    assert ratios == sorted(ratios) and ratios[-1] == pytest.approx(1.0)
    assert set(first["front"].split) == {"report"}
    for name in ("candidates.csv", "front.csv", "report_curves.csv", "front.png", "summary.json"):
        assert (tmp_path / "first" / name).is_file()
    again = run_search(search_cfg(tmp_path, checkpoint, "again"))
    assert first["evaluated"] == first["cache_size"]
    assert again["evaluated"] == 0 and again["cache_hits"] == first["evaluated"] == again["cache_size"]
    pd.testing.assert_frame_equal(again["front"], first["front"])


def test_each_evaluation_starts_from_an_rng_state_fixed_by_its_cache_identity(tmp_path, checkpoint, monkeypatch):
    """A pruner that draws at random (the random baseline, ACC's order=random) then scores the same
    in a fresh search as in the cache of an earlier one (separate roots: separate caches)."""
    states: dict[str, list[str]] = {"a": [], "b": []}
    real = search_app.evaluate

    def recording(*args, **kwargs):
        states[current].append(f"{kwargs['desc']} {hash(torch.random.get_rng_state().numpy().tobytes())}")
        return real(*args, **kwargs)

    monkeypatch.setattr(search_app, "evaluate", recording)
    for current, prior in (("a", 1), ("b", 2)):
        torch.manual_seed(prior)
        random_grid = ["pruner@search.pruner=random", "search.pruner_group=random", "search.pruner.start_layer=0"]
        run_search(search_cfg(tmp_path / current, checkpoint, "random", random_grid))
    assert len(states["a"]) >= 3 and states["a"] == states["b"]
    assert len({state.split()[-1] for state in states["a"]}) == len(states["a"])  # one stream per candidate


def test_killed_search_reevaluates_only_what_is_missing(tmp_path, checkpoint):
    cfg = search_cfg(tmp_path, checkpoint, "full")
    full = run_search(cfg)
    path = cache_path(cfg)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # killed mid-write
    resumed = run_search(search_cfg(tmp_path, checkpoint, "resumed"))
    assert resumed["cache_hits"] == 2 and resumed["evaluated"] == full["evaluated"] - 2
    assert len(CandidateStore(path).records) == full["cache_size"]
    pd.testing.assert_frame_equal(resumed["front"].drop(columns="key"), full["front"].drop(columns="key"))


def test_store_skips_a_damaged_line_and_keeps_appends_of_another_process(tmp_path, caplog):
    path = tmp_path / "cache.jsonl"
    first, other = CandidateStore(path), CandidateStore(path)  # two searches sharing one cache
    first.add("a", {"score": 1.0})
    with path.open("a") as handle:
        handle.write('{"key": "b", "sco')  # killed mid-write
    other.add("c", {"score": 3.0})
    first.add("d", {"score": 4.0})
    with caplog.at_level("WARNING", logger="tokenprune.search.store"):
        reread = CandidateStore(path)
    assert sorted(reread.records) == ["a", "c", "d"]
    assert f"{path} line 2 is not a whole record" in caplog.text


def test_cache_is_shared_by_pruner_configuration_not_by_name(tmp_path, checkpoint, monkeypatch):
    scored = record_search_evaluations(monkeypatch)
    run_search(search_cfg(tmp_path, checkpoint, "first"))
    scored.clear()
    run_search(search_cfg(tmp_path, checkpoint, "wider", ["search.values=[0.3,0.45,0.6,1.0]"]))
    assert searched(scored) == ["val keep_ratio=0.45"]
    scored.clear()
    run_search(search_cfg(tmp_path, checkpoint, "other_pruner", ["search.pruner.start_layer=1"]))
    assert len(searched(scored)) == 3, "same names, other pruner: all new"


def test_bad_search_settings(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="checkpoint=nope.ckpt is not a file"):
        run_search(search_cfg(tmp_path, "nope.ckpt", "x"))
    with pytest.raises(ValueError, match="search.parameter=ratio is not a setting of search.pruner"):
        run_search(search_cfg(tmp_path, checkpoint, "y", ["search.parameter=ratio"]))


def test_summary_json_is_written(tmp_path, checkpoint):
    run_search(search_cfg(tmp_path, checkpoint, "s"))
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["main_metric"] == "accuracy"
    # the whole report split, unpruned: the stock HF model's accuracy (the search's eval_batch_size)
    expected = stock_report_scores(checkpoint, batch_size=128)["accuracy"]
    assert summary["report_unpruned_score"] == pytest.approx(expected, abs=1e-6)
    # and the full model's FLOPs per example at the report split's lengths (a constant-class model
    # scores the same on the val split, whose class counts are the report split's)
    module = load_module(checkpoint)
    lengths = torch.tensor(datamodule_for(module).split_lengths("report"))
    expected_gflops = 2 * float(unpruned_macs(module.dims, lengths).mean()) / 1e9
    assert summary["report_unpruned_gflops"] == pytest.approx(expected_gflops, rel=1e-9)
