"""Length-Adaptive Transformer: LengthDrop genes, sandwich training, Drop-and-Restore, evolution."""

from __future__ import annotations

import random

import pytest
import torch
from apps import FAST, compose_app, record_search_evaluations, searched
from conftest import random_batch, tiny_model
from datasets import ClassLabel, Dataset, DatasetDict, Sequence, Value
from hydra.utils import instantiate

import tokenprune.apps.search as search_app
from tokenprune.apps.search import run_search
from tokenprune.apps.train import train
from tokenprune.engine import PrunableEncoder
from tokenprune.engine.flops import EncoderDims, encoder_macs, unpruned_macs
from tokenprune.modules.length_adaptive import distillation_loss
from tokenprune.modules.loading import load_module
from tokenprune.pruners.length import LengthConfigPruner, check_gene, constant_ratio_gene, sample_gene, smallest_gene
from tokenprune.search.context import SearchContext
from tokenprune.search.evaluate import datamodule_for
from tokenprune.search.evolution import EvolutionarySearch

LAT = [*FAST, "pruner=length_adaptive", "module=length_adaptive", "task.max_length=64"]


def test_length_drop_samples_non_increasing_genes_within_bounds():
    rng = random.Random(0)
    for _ in range(200):
        gene = sample_gene(6, 128, 0.2, rng)
        previous = 128
        for length in gene:
            assert -(-(0.8 * previous) // 1) <= length <= previous
            previous = length
    assert smallest_gene(4, 100, 0.2) == (80, 64, 52, 42)
    assert constant_ratio_gene(3, 10, 0.5) == (5, 3, 2)


def test_layer_drop_skipped_layers_keep_the_previous_length():
    rng = random.Random(0)
    for _ in range(50):
        gene = sample_gene(6, 100, 0.5, rng, skipped={0, 3})
        assert gene[0] == 100 and gene[3] == gene[2]


def test_sandwich_lengths_start_from_the_batch_padded_length(tmp_path):
    module = instantiate_module(tmp_path, ["module.length_drop=0.3", "module.num_sandwich=5"])
    mask = torch.zeros(2, 64, dtype=torch.long)
    mask[0, :40], mask[1, :25] = 1, 1
    models = module.sub_models(mask, random.Random(0))
    assert models[0][0].gene == smallest_gene(3, 40, 0.3) and len(models) == 6
    assert all(max(pruner.gene) <= 40 and pruner.length_unit == "tokens" for pruner, _ in models)
    fraction = instantiate_module(tmp_path, ["pruner.length_unit=fraction"])
    assert fraction.sub_models(mask, random.Random(0))[0][0].gene == smallest_gene(3, 64, 0.2), (
        "fraction lengths start from task.max_length"
    )


@pytest.mark.parametrize(
    ("gene", "message"),
    [((10, 12, 8), "non-increasing"), ((200, 100, 50), r"in \[1, 128\]"), ((10, 8), "has 2 entries")],
)
def test_hand_written_genes_are_checked(gene, message):
    with pytest.raises(ValueError, match=message):
        check_gene(gene, 3, 128)


@pytest.mark.parametrize(
    ("unit", "kept"),
    [("tokens", [[20, 15, 10], [10, 10, 10], [5, 5, 5]]), ("fraction", [[20, 15, 10], [10, 8, 5], [5, 4, 3]])],
)
def test_gene_lengths_are_token_caps_or_fractions(unit, kept):
    _, adapter = tiny_model("bert")
    ids, mask = random_batch(batch=3, length=20)  # 20, 15, 10 real tokens
    pruner = LengthConfigPruner(3, [20, 10, 5], reference_length=20, length_unit=unit)
    with torch.no_grad():
        out = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
    assert [t.n_out.tolist() for t in out.trace] == kept
    assert out.hidden.shape[1] == max(kept[-1]), "pruned tokens are physically removed"


def instantiate_module(tmp_path, overrides: list[str]):
    """The Length-Adaptive module the LAT test config builds (tiny backbone, 3 layers)."""
    return instantiate(compose_app("train", [*LAT, *overrides], tmp_path / "module").module)


def test_distillation_directions_differ_and_vanish_at_the_teacher():
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    forward = distillation_loss(student, teacher, "forward", False)
    reverse = distillation_loss(student, teacher, "reverse", False)
    assert forward > 0 and reverse > 0 and not torch.isclose(forward, reverse)
    assert distillation_loss(teacher, teacher, "forward", False).abs() < 1e-6


@pytest.fixture(scope="module")
def lat_checkpoint(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("lat")
    finetuned = train(compose_app("train", [*FAST, "task.max_length=64"], root / "ft"))["last_checkpoint"]
    result = train(compose_app("train", [*LAT, f"module.init_from={finetuned}"], root / "lat"))
    assert result["report"]["report/flops_ratio"] == pytest.approx(1.0)  # validated at full length
    return result["last_checkpoint"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("module.length_drop=1.0", r"module.length_drop=1.0 is outside the allowed range \[0.0, 1.0\)"),
        ("module.layer_drop=-0.1", "module.layer_drop=-0.1"),
        ("module.kd_direction=sideways", "module.kd_direction=sideways is not one of: forward, reverse"),
        ("pruner.lengths=[50,60,10]", "must be non-increasing"),
        ("pruner.lengths=[100,50,10]", r"in \[1, 64\]"),
        ("pruner.length_unit=percent", "pruner.length_unit=percent is not one of: tokens, fraction"),
    ],
)
def test_bad_length_adaptive_settings(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train(compose_app("train", [*LAT, override], tmp_path / "bad"))


def search_cfg(tmp_path, checkpoint, name, extra=()):
    return compose_app(
        "search",
        [
            "logger=csv",
            f"checkpoint={checkpoint}",
            "search=evolution",
            "search.iterations=3",
            "search.mutations=4",
            "search.crossovers=3",
            "search.population=4",
            "compare_constant_ratios=[0.6,0.8]",
            *extra,
        ],
        tmp_path / name,
    )


@pytest.mark.parametrize(("unit", "longest"), [("tokens", 30), ("fraction", 64)])
def test_search_space_and_analytic_flops_follow_the_length_unit(unit, longest):
    _, adapter = tiny_model("bert")
    dims = EncoderDims.of(adapter)
    lengths = [10, 30, 25]
    context = SearchContext(dims, LengthConfigPruner(3, None, 64, unit), lengths, score=lambda key, config: {})
    assert context.max_gene_length == longest
    assert context.gene_flops((longest,) * 3) == pytest.approx(1.0)
    # entries that keep every search-split token keep every token of a longer report example too
    assert context.pruner_for((longest, longest, 8)).gene == (64, 64, 8)
    gene = (20, 10, 5)
    pruned = full = 0.0
    for n in lengths:  # one example per batch: the engine's trace counts exactly what it computed
        ids = torch.randint(5, 120, (1, n))
        with torch.no_grad():
            trace = PrunableEncoder(adapter)(
                ids, torch.ones_like(ids), pruner=LengthConfigPruner(3, gene, 64, unit)
            ).trace
        pruned += float(encoder_macs(dims, trace).sum())
        full += float(unpruned_macs(dims, torch.tensor([n])).sum())
    assert context.gene_flops(gene) == pytest.approx(pruned / full)


def test_evolution_front_genes_are_valid_and_logged(tmp_path, lat_checkpoint):
    result = run_search(search_cfg(tmp_path, lat_checkpoint, "evo"))
    candidates = result["candidates"]
    longest = max(datamodule_for(load_module(lat_checkpoint)).split_lengths("val"))
    for gene in candidates.gene:
        assert list(gene) == sorted(gene, reverse=True) and min(gene) >= 1 and max(gene) <= longest
    assert [longest] * 3 in candidates.gene.tolist(), "the full gene: longer token caps change nothing"
    assert candidates.loc[candidates.gene.map(max) == longest].flops_ratio.max() == pytest.approx(1.0)
    kinds = {origin.split("@")[0] for origin in candidates.origin}
    assert {"initial", "mutation"} <= kinds <= {"initial", "mutation", "crossover"}
    assert len(candidates) <= 6 + 3 * (4 + 3), "each iteration adds at most n_m + n_c new genes"
    assert len(result["history"]) == 4 and result["history"][-1]["hypervolume"] >= result["history"][0]["hypervolume"]
    assert "constant ratio, report split" in result["curves"]
    assert (tmp_path / "evo" / "front.png").is_file()


def test_killed_evolution_resumes_with_same_front_and_no_repeats(tmp_path, lat_checkpoint, monkeypatch):
    calls = {"n": 0}
    real = search_app.evaluate

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls.get("limit") and calls["n"] > calls["limit"]:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(search_app, "evaluate", counting)
    straight = run_search(search_cfg(tmp_path, lat_checkpoint, "straight", ["search.seed=3"]))
    uninterrupted = calls["n"]
    other_root = tmp_path / "other"
    other_root.mkdir()
    calls.update(n=0, limit=uninterrupted // 2)
    with pytest.raises(KeyboardInterrupt):
        run_search(search_cfg(other_root, lat_checkpoint, "killed", ["search.seed=3"]))
    calls.update(n=0, limit=None)
    resumed = run_search(search_cfg(other_root, lat_checkpoint, "resumed", ["search.seed=3"]))
    assert calls["n"] + uninterrupted // 2 == uninterrupted, "no candidate evaluated twice"
    assert resumed["front"].gene.tolist() == straight["front"].gene.tolist()
    assert resumed["front"].score.tolist() == straight["front"].score.tolist()


def test_longer_evolution_scores_only_the_new_genes(tmp_path, lat_checkpoint, monkeypatch):
    scored = record_search_evaluations(monkeypatch)
    short = run_search(search_cfg(tmp_path, lat_checkpoint, "short"))
    scored.clear()
    longer = run_search(search_cfg(tmp_path, lat_checkpoint, "longer", ["search.iterations=5"]))
    assert set(short["candidates"].candidate) < set(longer["candidates"].candidate)
    assert len(searched(scored)) == len(longer["candidates"]) - len(short["candidates"])


def test_search_refuses_non_length_adaptive_checkpoint_and_tiny_budget(tmp_path, lat_checkpoint):
    plain = train(compose_app("train", [*FAST, "task.max_length=64"], tmp_path / "plain"))["last_checkpoint"]
    with pytest.raises(ValueError, match="needs a checkpoint trained by LengthAdaptiveModule"):
        run_search(search_cfg(tmp_path, plain, "x"))
    with pytest.raises(ValueError, match="search.flops_max=0.01 is below the smallest length configuration"):
        run_search(search_cfg(tmp_path, lat_checkpoint, "y", ["search.flops_max=0.01"]))
    band = ["search.flops_min=0.95001", "search.flops_max=0.95002"]  # no initial gene lies in it
    with pytest.raises(ValueError, match=r"no initial configuration lies within search.flops_min=0.95001"):
        run_search(search_cfg(tmp_path, lat_checkpoint, "z", band))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.length_drop=1.0", r"search.length_drop=1.0 is outside the allowed range \[0.0, 1.0\)"),
        ("search.mutation_prob=0", r"search.mutation_prob=0 is outside the allowed range \(0.0, 1.0\]"),
        ("search.iterations=0", "search.iterations=0 must be >= 1"),
        ("compare_constant_ratios=[0,0.5]", r"compare_constant_ratios\[0\]=0 is outside the allowed range \(0, 1\]"),
    ],
)
def test_bad_evolution_settings(tmp_path, lat_checkpoint, override, message):
    with pytest.raises(ValueError, match=message):
        run_search(search_cfg(tmp_path, lat_checkpoint, "bad", [override]))


def _token_task(path) -> str:
    words = ["alpha", "beta", "gamma", "delta", "berlin", "paris", "anna", "bob"]
    rng = random.Random(0)
    rows = {"tokens": [], "ner_tags": []}
    for _ in range(60):
        sentence = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        rows["tokens"].append(sentence)
        rows["ner_tags"].append([1 if w in ("berlin", "paris") else 2 if w in ("anna", "bob") else 0 for w in sentence])
    features = {"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=["O", "LOC", "PER"]))}
    from datasets import Features

    data = Dataset.from_dict(rows, features=Features(features))
    DatasetDict(train=data, validation=data.select(range(20))).save_to_disk(str(path))
    return str(path)


def test_drop_and_restore_token_task_end_to_end(tmp_path):
    local = _token_task(tmp_path / "ner")
    task = [
        "task=conll2003",
        f"task.source.local_path={local}",
        "task.num_labels=3",
        "task.max_length=32",
        "task.metrics.accuracy.num_classes=3",
        "task.metrics.f1.num_classes=3",
    ]
    finetuned = train(compose_app("train", [*FAST, *task], tmp_path / "ft"))["last_checkpoint"]
    overrides = [
        *FAST,
        *task,
        "pruner=length_adaptive",
        "module=length_adaptive",
        f"module.init_from={finetuned}",
        "pruner.lengths=[8,4,2]",
    ]
    result = train(compose_app("train", overrides, tmp_path / "lat"))
    report = result["report"]
    assert 0 <= report["report/f1"] <= 1 and report["report/flops_ratio"] < 0.9
    module = load_module(result["last_checkpoint"])
    batch = next(iter(datamodule_for(module, 8).test_dataloader()))
    with torch.no_grad():
        logits, out = module(batch, pruner=module.pruner)
    assert logits.shape[:2] == batch["input_ids"].shape, "Drop-and-Restore returns one row per input token"
    assert out.trace[-1].n_out.max() < batch["attention_mask"].sum(dim=1).max()


def test_reference_min_length_and_layer_drop_on_every_pass(tmp_path):
    """experiment=length_adaptive_reference: LengthDrop never samples below min_length, and
    LayerDrop reaches the full model and the smallest sub-model too (DESIGN.md s.5)."""
    rng = random.Random(0)
    genes = [sample_gene(6, 10, 0.9, rng, min_length=2) for _ in range(200)]
    assert min(min(gene) for gene in genes) == 2
    assert smallest_gene(4, 100, 0.5, skipped={1}, min_length=2) == (50, 50, 25, 13)
    batch = {"input_ids": torch.randint(5, 100, (2, 20)), "attention_mask": torch.ones(2, 20, dtype=torch.long)}
    batch["labels"] = torch.tensor([0, 1])
    for passes, skips_everywhere in (("all", True), ("random", False)):
        module = instantiate_module(
            tmp_path, ["module.layer_drop=0.95", f"module.layer_drop_passes={passes}", "module.min_length=2"]
        )
        calls: list[set[int]] = []
        forward = module.forward
        module.forward = lambda b, pruner=None, **engine: (
            calls.append(engine.get("skip_layers", set())) or forward(b, pruner, **engine)
        )
        torch.manual_seed(0)
        module.training_step(batch, 0)
        full, smallest, *randoms = calls
        assert all(randoms) and (bool(full) and bool(smallest)) == skips_everywhere
    for override, message in (
        ("module.layer_drop_passes=some", r"module\.layer_drop_passes=some is not one of: random, all"),
        ("module.min_length=0", r"module\.min_length=0 must be an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            train(compose_app("train", [*LAT, override], tmp_path / "bad"))


def test_reference_search_keeps_genes_above_the_smallest_sub_model():
    """search=evolution_reference (flops_min=smallest): no candidate below the FLOPs of the
    smallest sub-model sandwich training saw; the default bound (0) goes below it."""
    _, adapter = tiny_model("bert")

    def score(name: str, config: dict) -> dict:  # a stand-in accuracy that grows with the lengths kept
        flops = context.gene_flops(tuple(config["lengths"]))
        return {"score": flops**0.5, "flops_ratio": flops}

    context = SearchContext(EncoderDims.of(adapter), LengthConfigPruner(3, None, 64, "tokens"), [10, 30, 25, 40], score)
    floor = context.sandwich_floor_flops(0.2)
    settings = {"iterations": 3, "mutations": 8, "crossovers": 4, "population": 4, "length_drop": 0.2}
    reference = EvolutionarySearch(flops_min="smallest", **settings).run(context)
    assert min(record["flops_ratio"] for record in reference) >= floor * (1 - 1e-9)
    default = EvolutionarySearch(**settings).run(context)
    assert min(record["flops_ratio"] for record in default) < floor
    with pytest.raises(ValueError, match=r"search\.flops_min='lowest'"):
        EvolutionarySearch(flops_min="lowest")
