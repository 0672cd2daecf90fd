"""ACC (Kachuee and Sharifkhani): expected speedup, Sort + Eliminate, profiling, offline tuning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from apps import FAST, compose_app, record_speedup_timings
from conftest import random_batch, tiny_model

import tokenprune.search.latency as latency
from tokenprune.apps.search import run_search
from tokenprune.apps.train import train, train_stages
from tokenprune.engine import PrunableEncoder
from tokenprune.engine.flops import EncoderDims, encoder_macs, unpruned_macs
from tokenprune.modules.loading import load_module
from tokenprune.pruners.acc import (
    ACCPruner,
    coefficient_for_speedup,
    elimination_profile,
    expected_speedup,
    keep_rates,
)
from tokenprune.search.acc import ACCSpeedup, acc_flops_ratio

# Table VI, Flan-T5-base encoder (12 layers), MMLU: SC -> encoder speedup
TABLE_VI = {0.98: 1.18, 0.95: 1.41, 0.93: 1.58, 0.90: 1.83, 0.85: 2.34, 0.80: 2.94}


@pytest.mark.parametrize(("coefficient", "published"), sorted(TABLE_VI.items()))
def test_expected_speedup_reproduces_table_vi_with_a_flat_profile(coefficient, published):
    speedup = expected_speedup(keep_rates([1.0] * 12, coefficient))
    assert speedup == pytest.approx(published, rel=0.05)


def test_speedup_coefficient_inverts_the_expected_speedup():
    profile = [1.0, 0.9, 0.8, 0.8, 1.0, 1.0]
    for target in (1.2, 1.8, 2.5):
        coefficient = coefficient_for_speedup(profile, target)
        assert expected_speedup(keep_rates(profile, coefficient)) == pytest.approx(target, rel=1e-6)
    for bad in (0.5, 1e6):
        with pytest.raises(ValueError, match=rf"target_speedup={bad} is outside what this profile allows"):
            coefficient_for_speedup(profile, bad)


def test_elimination_profile_follows_the_fit_until_it_rises():
    assert elimination_profile([4.0, 3.0, 2.4, 3.0, 1.0]) == pytest.approx([1.0, 0.75, 0.8, 1.0, 1.0])
    assert elimination_profile([4.0, 3.0, 2.0], rule="flat") == [1.0, 1.0, 1.0]
    # a fit that overshoots below zero stops elimination there instead of giving a negative EP
    assert elimination_profile([4.0, 2.0, -0.5, -1.0]) == pytest.approx([1.0, 0.5, 1.0, 1.0])


def test_sort_and_eliminate_keeps_floor_of_rate_times_tokens_and_cls():
    model, adapter = tiny_model("bert", layers=3)
    ids, mask = random_batch(batch=4, length=24)
    pruner = ACCPruner(3, speedup_coefficient=0.7)
    with torch.no_grad():
        out = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
    expected = mask.sum(dim=1)
    for layer in out.trace:
        expected = torch.clamp(torch.floor(expected * 0.7 + 1e-9).long(), min=1)
        assert torch.equal(layer.n_out, expected)
    assert out.hidden.shape[1] == int(expected.max()), "eliminated tokens are physically gone"
    assert bool((out.positions[:, 0] == 0).all()), "[CLS] is never eliminated"


def test_no_sort_keeps_the_first_tokens_and_random_differs_from_sv():
    model, adapter = tiny_model("bert", layers=3)
    ids, mask = random_batch(batch=2, length=20)
    encoder = PrunableEncoder(adapter)
    with torch.no_grad():
        first = encoder(ids, mask, pruner=ACCPruner(3, speedup_coefficient=0.5, order="none"))
        by_score = encoder(ids, mask, pruner=ACCPruner(3, speedup_coefficient=0.5, order="sv"))
        torch.manual_seed(0)
        shuffled = encoder(ids, mask, pruner=ACCPruner(3, speedup_coefficient=0.5, order="random"))
    kept = int(first.mask[0].sum())
    assert first.positions[0, :kept].tolist() == list(range(kept))
    assert not torch.equal(by_score.positions, shuffled.positions)


def test_analytic_flops_match_the_engine_trace():
    model, adapter = tiny_model("bert", layers=3)
    ids, mask = random_batch(batch=4, length=24)
    pruner = ACCPruner(3, speedup_coefficient=0.8, profile=[1.0, 0.9, 0.7])
    with torch.no_grad():
        trace = PrunableEncoder(adapter)(ids, mask, pruner=pruner).trace
    dims = EncoderDims.of(adapter)
    lengths = mask.sum(dim=1)
    engine = float(encoder_macs(dims, trace).sum() / unpruned_macs(dims, lengths).sum())
    assert acc_flops_ratio(dims, lengths.tolist(), pruner) == pytest.approx(engine, rel=1e-9)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruner.speedup_coefficient=0", r"pruner.speedup_coefficient=0 is outside"),
        ("pruner.speedup_coefficient=-1", r"pruner.speedup_coefficient=-1 is outside"),
        ("pruner.speedup_coefficient=fast", r"pruner.speedup_coefficient='fast' must be a number"),
        ("pruner.speedup_coefficient=nan", r"pruner.speedup_coefficient=nan is not a finite number"),
        ("pruner.order=alphabetical", r"pruner.order=alphabetical is not one of: sv, random, none"),
        ("pruner.rounding=up", r"pruner.rounding=up is not one of"),
        ("pruner.profile=[1.0,0.5]", r"pruner.profile has 2 entries; the backbone has 3 layers"),
        ("pruner.profile=[1.0,0.0,1.0]", r"pruner.profile\[1\]=0.0 is outside"),
    ],
)
def test_bad_acc_settings_fail_before_training(tmp_path, override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        train(compose_app("train", [*FAST, "pruner=acc", "module=acc", override], tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def acc_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("acc")
    overrides = [*FAST, "experiment=acc", "module.profile_batches=4", "pruner.speedup_coefficient=0.8"]
    return train_stages(compose_app("train", overrides, root / "run"), [*overrides, f"paths.root={root}"])


def test_experiment_profiles_the_finetuned_model_and_trains_with_elimination(acc_run):
    finetuned = Path(acc_run["stages"]["finetune"]["last_checkpoint"])
    artifact = json.loads(Path(f"{finetuned}.acc-profile.json").read_text())
    assert Path(f"{finetuned}.acc-profile.png").is_file()
    assert len(artifact["acc"]) == 3 and artifact["backbone"] == "tiny" and artifact["task"] == "rt_sentiment"
    module = load_module(acc_run["last_checkpoint"])
    assert isinstance(module.pruner, ACCPruner)
    assert module.pruner.profile == artifact["profile"] and module.pruner.acc == artifact["acc"]
    assert acc_run["report"]["report/flops_ratio"] < 0.9


def test_a_profile_of_another_checkpoint_is_refused(tmp_path, acc_run):
    finetuned = acc_run["stages"]["finetune"]["last_checkpoint"]
    other = acc_run["last_checkpoint"]  # a different checkpoint file than the one the profile was measured on
    overrides = [
        *FAST,
        "pruner=acc",
        "module=acc",
        f"module.init_from={other}",
        f"module.profile_path={finetuned}.acc-profile.json",
    ]
    with pytest.raises(ValueError, match=r"module.profile_path=.* was measured on another model or task"):
        train(compose_app("train", overrides, tmp_path / "other"))
    assert not (tmp_path / "other").exists()


def test_a_model_trained_with_a_named_profile_reloads_without_the_file(tmp_path, acc_run):
    finetuned = acc_run["stages"]["finetune"]["last_checkpoint"]
    named = tmp_path / "named-profile.json"
    shutil.copy(f"{finetuned}.acc-profile.json", named)
    overrides = [*FAST, "pruner=acc", "module=acc", f"module.init_from={finetuned}", f"module.profile_path={named}"]
    run = train(compose_app("train", [*overrides, "trainer.limit_train_batches=2"], tmp_path / "named"))
    named.unlink()  # moved or deleted after training: the checkpoint holds the profile
    module = load_module(run["last_checkpoint"])
    assert module.pruner.profile == json.loads(Path(f"{finetuned}.acc-profile.json").read_text())["profile"]


def test_offline_tuning_and_ablation_without_training(tmp_path, acc_run, monkeypatch):
    overrides = [
        "logger=csv",
        f"checkpoint={acc_run['last_checkpoint']}",
        "search=acc_offline",
        "search.values=[0.6,0.8,1.0]",
        "search.orders=[sv,random,none]",
        "measure.repeats=1",
        "measure.warmup=0",
    ]
    timed = record_speedup_timings(monkeypatch)
    run_search(compose_app("search", overrides, tmp_path / "offline"))
    table = pd.read_csv(tmp_path / "offline" / "offline_tuning.csv")
    assert len(table) == 9 and set(table.order) == {"sv", "random", "none"}
    sv = table[table.order == "sv"].sort_values("speedup_coefficient")
    assert sv.report_flops_ratio.is_monotonic_increasing and sv.expected_speedup.is_monotonic_decreasing
    (timings,) = timed  # the 9 configurations timed together, interleaved with the stock model
    assert list(timings) == ["hf_sdpa", *(f"config_{index}" for index in range(9))]
    stock = timings["hf_sdpa"]["median_s"]
    expected = [stock / timings[f"config_{index}"]["median_s"] for index in range(9)]  # the table's row order
    assert table.measured_speedup.tolist() == pytest.approx(expected, rel=1e-12)
    assert (tmp_path / "offline" / "offline_tuning.png").is_file()


def test_speedup_search_prints_the_coefficient_and_both_figures(tmp_path, acc_run, capsys):
    overrides = ["logger=csv", f"checkpoint={acc_run['last_checkpoint']}", "search=acc_speedup", "target_speedup=1.6"]
    result = run_search(compose_app("search", overrides, tmp_path / "speedup"))
    row = result["candidates"].iloc[0]
    assert row.expected_speedup == pytest.approx(1.6, rel=1e-4) and 0 < row.exact_flops_ratio < 1
    assert f"SC {row.speedup_coefficient:.4f} for a target speedup of 1.6" in capsys.readouterr().out
    with pytest.raises(ValueError, match="target_speedup=0.5 is outside"):
        run_search(compose_app("search", [*overrides[:-1], "target_speedup=0.5"], tmp_path / "low"))
    with pytest.raises(ValueError, match="search.objective=speed is not one of: flops, latency"):
        run_search(compose_app("search", [*overrides, "search.objective=speed"], tmp_path / "objective"))


def test_latency_objective_calibrates_interpolates_and_measures_its_choice(tmp_path, acc_run, monkeypatch):
    """search=acc_speedup search.objective=latency end to end: the six calibration SCs timed in one
    measurement (every variant runs on real batches; the device's timings are scripted as
    stock 1 s, SC x s, so that speedup = 1 / SC), the SC for the target interpolated between them,
    then measured once more on its own."""
    calls: list[list[str]] = []

    def scripted(variants, batches, device, warmup, repeats):
        calls.append(list(variants))
        for run in variants.values():
            run(batches[0])  # the real passes: stock and every configuration
        medians = [1 / 1.6] if len(calls) == 2 else [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        times = {"hf_sdpa": 1.0} | {f"config_{index}": median for index, median in enumerate(medians)}
        return {name: {"median_s": time} for name, time in times.items()}

    monkeypatch.setattr(latency, "measure_batches", scripted)
    overrides = ["logger=csv", f"checkpoint={acc_run['last_checkpoint']}", "search=acc_speedup", "target_speedup=1.6"]
    row = run_search(compose_app("search", [*overrides, "search.objective=latency"], tmp_path / "latency"))[
        "candidates"
    ].iloc[0]
    assert calls == [["hf_sdpa", *(f"config_{index}" for index in range(6))], ["hf_sdpa", "config_0"]]
    # speedups 1/0.7 = 1.4286 and 1/0.6 = 1.6667 bracket 1.6
    assert row.speedup_coefficient == pytest.approx(0.7 - 0.1 * (1.6 - 1 / 0.7) / (1 / 0.6 - 1 / 0.7))
    assert row.measured_speedup == pytest.approx(1.6)
    assert row.calibration == pytest.approx({sc: 1 / sc for sc in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)})


def test_latency_form_interpolates_measured_speedups_and_refuses_targets_outside_them():
    search = ACCSpeedup(target_speedup=2.0, objective="latency", calibration=[0.6, 0.7, 0.8, 0.9])
    # timings of neighbouring SCs may cross: 0.8 measured a hair faster than 0.7
    assert search.interpolated([3.0, 2.2, 2.25, 1.5]) == pytest.approx(0.9 - 0.2 * 0.5 / 0.7)  # between 0.9 and 0.7
    assert search.interpolated([2.5, 2.0, 1.8, 1.5]) == pytest.approx(0.7)
    with pytest.raises(ValueError, match=r"target_speedup=2.0 is outside the speedups .* \(1.500x to 1.900x\)"):
        search.interpolated([1.9, 1.8, 1.7, 1.5])


@pytest.mark.parametrize(
    ("rounding", "expected"), [("floor", [1, 1, 2, 3, 5]), ("ceil", [1, 2, 2, 4, 5]), ("round", [1, 2, 2, 4, 5])]
)
def test_keep_counts_round_as_set_and_keep_one_token(rounding, expected):
    """eq. (3): N_l = rounding(r_l * N_{l-1}), at least 1; r = 0.5 here (round: half to even)."""
    pruner = ACCPruner(num_layers=1, speedup_coefficient=0.5, rounding=rounding)
    assert pruner.keep_counts(0, torch.tensor([1, 3, 4, 7, 10])).tolist() == expected
