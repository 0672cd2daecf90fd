"""Token and Head Adaptive Transformer: head importance, head genes, joint sandwich, joint search."""

from __future__ import annotations

import json
import random
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from apps import FAST, compose_app, record_search_evaluations, record_speedup_timings, searched
from conftest import random_batch, tiny_model
from hydra.utils import instantiate

import tokenprune.modules.token_head_adaptive as that_module
from tokenprune.apps.bench import run_bench
from tokenprune.apps.search import run_search
from tokenprune.apps.train import train
from tokenprune.checkpoints import read_checkpoint
from tokenprune.data.datamodule import TaskDataModule
from tokenprune.engine import PrunableEncoder
from tokenprune.engine.flops import EncoderDims, encoder_macs, paper_macs, unpruned_macs
from tokenprune.modules.loading import load_module
from tokenprune.pruners.token_head import TokenHeadPruner, head_cap, ratio_head_gene, sample_head_gene
from tokenprune.search.context import SearchContext
from tokenprune.search.evaluate import datamodule_for, evaluate
from tokenprune.search.token_head import TokenHeadEvolutionarySearch

THAT = [*FAST, "pruner=token_head_adaptive", "module=token_head_adaptive", "task.max_length=64"]


def that_search(checkpoint: str, out: Path, *overrides: str) -> dict:
    """A small token_head_evolution search of `checkpoint` (2 iterations of 3 + 2 children)."""
    base = ["logger=csv", f"checkpoint={checkpoint}", "search=token_head_evolution", "search.iterations=2"]
    size = ["search.mutations=3", "search.crossovers=2", "search.population=3"]
    return run_search(compose_app("search", [*base, *size, *overrides], out))


def test_head_cap_follows_the_reference_rule():
    assert head_cap(6, 12) == (1, 3, 5, 7, 9, 11)
    assert head_cap(12, 12) == (*range(1, 12), 11)
    assert head_cap(3, 4) == (1, 2, 3)
    assert ratio_head_gene(6, 12.0) == (1, 3, 5, 7, 9, 12)


def test_sampled_head_genes_are_non_decreasing_under_the_cap_and_skips_carry():
    cap, rng = head_cap(6, 12), random.Random(0)
    seen = set()
    for _ in range(300):
        gene = sample_head_gene(cap, rng)
        assert all(a <= b for a, b in zip(gene, gene[1:])) and all(h < c for h, c in zip(gene, cap))
        seen.add(gene)
        skipped = sample_head_gene(cap, rng, skipped={2, 3})
        assert skipped[1] == skipped[2] == skipped[3]
    assert len(seen) > 50


def test_pruned_heads_are_the_least_important_and_physically_removed():
    model, adapter = tiny_model("bert")
    ids, mask = random_batch()
    pruner = TokenHeadPruner(3, 4, reference_length=64, heads_pruned=[1, 2, 0])
    importance = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.1, 0.2, 0.8], [1.0, 0.0, 0.0, 0.0]])
    pruner.set_head_importance(importance)
    assert pruner.kept_heads(0).tolist() == [1, 2, 3] and pruner.kept_heads(1).tolist() == [0, 3]
    assert pruner.kept_heads(2) is None
    pruner.set_head_importance(importance.flip(1))  # the ranking follows a changed importance
    assert pruner.kept_heads(0).tolist() == [0, 1, 2] and pruner.kept_heads(1).tolist() == [0, 3]
    pruner.set_head_importance(importance)
    encoder = PrunableEncoder(adapter)
    with torch.no_grad():
        out = encoder(ids, mask, pruner=pruner)
        explicit = encoder(ids, mask, heads=[torch.tensor([1, 2, 3]), torch.tensor([0, 3]), None])
    torch.testing.assert_close(out.hidden, explicit.hidden)
    assert [layer.heads for layer in out.trace] == [3, 2, 4]
    dims = EncoderDims.of(adapter)
    lengths = mask.sum(dim=1)
    d, head_dim, ffn = dims.hidden, dims.head_dim, dims.ffn
    by_hand = sum(
        3 * lengths * d * h * head_dim
        + 2 * lengths**2 * h * head_dim
        + lengths * h * head_dim * d
        + 2 * lengths * d * ffn
        for h in (3, 2, 4)
    )
    torch.testing.assert_close(encoder_macs(dims, out.trace), by_hand.double())
    assert bool((encoder_macs(dims, out.trace) < unpruned_macs(dims, lengths)).all())
    paper = sum(h / 4 * (2 * d * lengths**2 + 4 * d**2 * lengths) + 8 * d**2 * lengths for h in (3, 2, 4))
    torch.testing.assert_close(paper_macs(dims, out.trace), paper.double())


def test_slicing_heads_gives_the_logits_of_zeroing_their_context():
    model, adapter = tiny_model("bert")
    ids, mask = random_batch()
    keep = [torch.tensor([0, 2]), torch.tensor([3]), None]

    def zero_pruned_heads(layer: int, context: torch.Tensor) -> torch.Tensor:  # context (B, h, m, d_h)
        if keep[layer] is None:
            return context
        gate = torch.zeros(context.shape[1])
        gate[keep[layer]] = 1.0
        return context * gate[None, :, None, None]

    encoder = PrunableEncoder(adapter)
    with torch.no_grad():
        sliced = encoder(ids, mask, heads=keep)
        zeroed = encoder(ids, mask, context_hook=zero_pruned_heads)
        logits = [adapter.classify(out.hidden) for out in (sliced, zeroed)]
    assert [layer.heads for layer in sliced.trace] == [2, 1, 4] and [layer.heads for layer in zeroed.trace] == [4] * 3
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)


def test_joint_genes_keep_their_constraints_through_1000_mutations_and_crossovers():
    """Lengths stay non-increasing in [1, longest]; heads pruned stay non-decreasing, within the cap
    (so every layer keeps at least one head)."""
    layers, num_heads, longest = 6, 12, 64
    search = TokenHeadEvolutionarySearch(prune="joint", population=20, length_drop=0.35)
    dims = EncoderDims(num_layers=layers, hidden=384, num_heads=num_heads, head_dim=32, ffn=1536)
    context = SimpleNamespace(dims=dims, max_gene_length=longest)  # what mutate reads of a search context
    cap, rng = head_cap(layers, num_heads), random.Random(0)
    population = [((longest - 10 * i // 3,) * layers, tuple(min(i // 4, c) for c in cap)) for i in range(12)]
    for step in range(1000):
        parent = rng.choice(population)
        child = search.mutate(parent, rng, context) if step % 2 else search.crossover(parent, rng.choice(population))
        lengths, heads = child
        assert all(a >= b for a, b in zip(lengths, lengths[1:])) and lengths[-1] >= 1 and lengths[0] <= longest
        assert all(a <= b for a, b in zip(heads, heads[1:])) and all(0 <= h <= c for h, c in zip(heads, cap))
        assert all(num_heads - h >= 1 for h in heads)
        population.append(child)
    assert len(set(population)) > 200


def test_head_importance_is_deterministic_for_a_seed_and_reads_every_batch():
    module = instantiate(compose_app("train", THAT, Path("/tmp/that-det")).module)  # dropout on
    batches = []
    for seed in range(3):
        ids, mask = random_batch(batch=2, length=12, seed=seed)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])})
    read: list[int] = []

    class Loader(list):
        def __iter__(self):
            for index, batch in enumerate(super().__iter__()):
                read.append(index)
                yield batch

    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(that_module.head_importance(module, Loader(batches)))
    assert torch.equal(runs[0], runs[1]) and read == [0, 1, 2, 0, 1, 2]
    torch.manual_seed(7)
    assert not torch.equal(runs[0], that_module.head_importance(module, Loader(batches[:2])))  # the last batch counts


def test_pruning_heads_without_importance_is_refused():
    pruner = TokenHeadPruner(3, 4, reference_length=64, heads_pruned=[1, 0, 0])
    with pytest.raises(RuntimeError, match="needs head importance"):
        pruner.kept_heads(0)
    assert TokenHeadPruner(3, 4, reference_length=64).kept_heads(0) is None


def test_head_importance_equals_an_independent_count_through_stock_hf_attention():
    """|<context_h, dL/dcontext_h>| summed over tokens and examples, read from the input of HF's own
    output projection (no engine), equals the engine's gate gradients; rows are L2-normalised."""
    module = instantiate(compose_app("train", THAT, Path("/tmp/that-imp")).module)
    for sub in module.model.modules():
        if isinstance(sub, torch.nn.Dropout):
            sub.p = 0.0
    module.model.set_attn_implementation("eager")
    ids, mask = random_batch(batch=3, length=16)
    labels = torch.tensor([0, 1, 1])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    got = that_module.head_importance(module, [batch])

    contexts: list[torch.Tensor] = []

    def keep_input(_, inputs):
        contexts.append(inputs[0])  # a graph node: autograd.grad reads dL/dcontext at it

    hooks = [
        layer.attention.output.dense.register_forward_pre_hook(keep_input) for layer in module.model.bert.encoder.layer
    ]
    module.model.train()
    loss = torch.nn.functional.cross_entropy(module.model(input_ids=ids, attention_mask=mask).logits, labels)
    grads = torch.autograd.grad(loss, contexts)
    for hook in hooks:
        hook.remove()
    expected = torch.stack(
        [
            (context * grad).view(*context.shape[:2], 4, -1).sum(-1).abs().sum(dim=(0, 1))
            for context, grad in zip(contexts, grads)
        ]
    )
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in module.parameters()), "no parameter gradient is kept"


@pytest.fixture(scope="module")
def that_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("that")
    finetuned = train(compose_app("train", [*FAST, "task.max_length=64"], root / "ft"))["last_checkpoint"]
    result = train(compose_app("train", [*THAT, f"module.init_from={finetuned}"], root / "that"))
    return {"root": root, "finetuned": finetuned, **result}


def test_sandwich_caches_importance_beside_the_start_and_saves_it_in_the_checkpoint(that_run, monkeypatch):
    caches = list(Path(that_run["finetuned"]).parent.glob("last.ckpt.head-importance-*.json"))
    assert len(caches) == 1
    cached = torch.tensor(json.loads(caches[0].read_text())["importance"])
    saved = read_checkpoint(that_run["last_checkpoint"])["state_dict"]["pruner.head_importance"]
    torch.testing.assert_close(saved, cached)
    torch.testing.assert_close(cached.norm(dim=1), torch.ones(3))
    module = load_module(that_run["last_checkpoint"])
    built = module.build_pruner({**module.hparams["pruner"], "heads_pruned": [1, 1, 1]})
    assert torch.equal(built.head_importance, saved), "pruners built from configs use the model's importance"

    calls = []
    monkeypatch.setattr(that_module, "head_importance", lambda *a: calls.append(1))
    again = train(
        compose_app("train", [*THAT, f"module.init_from={that_run['finetuned']}"], that_run["root"] / "again")
    )
    assert not calls, "the second sandwich run reads the cached importance"
    assert list(Path(that_run["finetuned"]).parent.glob("last.ckpt.head-importance-*.json")) == caches
    torch.testing.assert_close(
        read_checkpoint(again["last_checkpoint"])["state_dict"]["pruner.head_importance"], cached
    )


def test_an_importance_file_of_another_checkpoint_is_refused_and_kept(that_run, tmp_path):
    start = tmp_path / "start.ckpt"  # the same bytes: the same cache file name
    shutil.copyfile(that_run["finetuned"], start)
    (cached,) = Path(that_run["finetuned"]).parent.glob("*.head-importance-*.json")
    foreign = json.loads(cached.read_text())
    foreign["identity"]["checkpoint_sha256"] = "0" * 64
    planted = tmp_path / cached.name.replace(Path(that_run["finetuned"]).name, start.name)
    planted.write_text(json.dumps(foreign))
    with pytest.raises(ValueError, match=r"holds the head importance of another checkpoint .*checkpoint_sha256"):
        train(compose_app("train", [*THAT, f"module.init_from={start}"], tmp_path / "refused"))
    assert json.loads(planted.read_text()) == foreign


@pytest.mark.parametrize("prune", ["joint", "heads", "tokens"])
def test_sub_models_prune_what_module_prune_says(tmp_path, prune):
    module = instantiate(compose_app("train", [*THAT, f"module.prune={prune}"], tmp_path / "m").module)
    module.pruner.set_head_importance(torch.rand(3, 4))
    torch.manual_seed(0)
    models = module.sub_models(torch.ones(2, 40), random.Random(0))
    assert len(models) == 3
    cap = head_cap(3, 4)
    for index, (pruner, _) in enumerate(models):
        heads, lengths = pruner.heads_gene, pruner.gene
        if prune == "tokens":
            assert heads == (0, 0, 0)
        elif index == 0:
            assert heads == cap, "the smallest sub-model loses the cap"
        else:
            assert all(h < c for h, c in zip(heads, cap)) and list(heads) == sorted(heads)
        if prune == "heads":
            assert lengths == (64, 64, 64)
        elif index == 0:
            assert lengths == (32, 26, 21), "smallest lengths: ceil(0.8 * previous) from the padded length 40"


def test_joint_search_front_flops_and_bench_commands(that_run, tmp_path):
    checkpoint = that_run["last_checkpoint"]
    result = that_search(checkpoint, tmp_path / "joint")
    candidates = result["candidates"]
    cap = head_cap(3, 4)
    for lengths, heads in zip(candidates.gene, candidates.heads):
        assert list(lengths) == sorted(lengths, reverse=True)
        assert list(heads) == sorted(heads) and all(h <= c for h, c in zip(heads, cap))
    assert any(sum(h) > 0 and min(g) < max(g) for g, h in zip(candidates.gene, candidates.heads)), "joint genes"
    module = load_module(checkpoint)
    data = datamodule_for(module)
    row = candidates.loc[candidates.heads.map(sum).idxmax()]
    measured = evaluate(module, data.val_dataloader(), module.build_pruner(row.pruner))
    assert measured["flops_ratio"] == pytest.approx(row.flops_ratio, rel=1e-6), "trace FLOPs = analytic gene FLOPs"
    context = SearchContext(module.dims, module.pruner, data.split_lengths("val"), lambda *a, **k: {})
    assert context.gene_flops((tuple(row.gene), tuple(row.heads))) == pytest.approx(row.flops_ratio, rel=1e-9)
    front = pd.read_csv(tmp_path / "joint" / "front.csv")
    assert front.bench.str.contains("pruner=token_head_adaptive").all()
    assert front.bench.str.contains("pruner.heads_pruned=").all()


def test_killed_joint_search_resumes_with_nothing_evaluated_twice(that_run, tmp_path, monkeypatch):
    checkpoint = that_run["last_checkpoint"]
    full = that_search(checkpoint, tmp_path / "full")
    cache = Path(full["cache"])
    lines = cache.read_text().splitlines()
    kept = len(lines) // 2
    cache.write_text("\n".join(lines[:kept]) + "\n" + lines[kept][: len(lines[kept]) // 2])  # killed mid-write
    scored = record_search_evaluations(monkeypatch)
    resumed = that_search(checkpoint, tmp_path / "resumed")
    assert len(scored) == len(set(scored)) == resumed["evaluated"] == full["evaluated"] - kept
    assert resumed["cache_hits"] >= kept and resumed["cache_size"] == full["cache_size"]
    pd.testing.assert_frame_equal(resumed["front"].drop(columns="key"), full["front"].drop(columns="key"))


def test_head_only_search_keeps_full_lengths_and_its_bench_command_removes_heads(that_run, tmp_path):
    result = that_search(that_run["last_checkpoint"], tmp_path / "heads", "search.prune=heads")
    candidates, front = result["candidates"], result["front"]
    assert len({tuple(g) for g in candidates.gene}) == 1
    assert candidates.flops_ratio.min() < 1.0
    command = pd.read_csv(tmp_path / "heads" / "front.csv").bench.iloc[0]
    assert command.startswith("tokenprune-bench ")
    timing = ["logger=csv", "batch_sizes=[2]", "lengths=[32]", "repeats=1", "warmup=0"]
    table = run_bench(compose_app("bench", [*shlex.split(command)[1:], *timing], tmp_path / "bench"))
    pruned = table[table.variant == "engine_pruned"].iloc[0]
    assert sum(front.heads.iloc[0]) > 0 and pruned.flops_speedup > 1.0, "full lengths: the saving is the heads'"


def test_latency_objective_search_runs_and_caches_timings_per_device(that_run, tmp_path, monkeypatch):
    overrides = [
        "logger=csv",
        f"checkpoint={that_run['last_checkpoint']}",
        "search=token_head_evolution",
        "search.objective=latency",
        "search.iterations=1",
        "search.mutations=2",
        "search.crossovers=1",
        "search.population=3",
        "measure.repeats=1",
        "measure.warmup=0",
        "measure.search_batches=2",
    ]
    measured = record_speedup_timings(monkeypatch)
    tokenized: list[str] = []
    tokenize = TaskDataModule._tokenize
    monkeypatch.setattr(
        TaskDataModule, "_tokenize", lambda data, split, name: tokenized.append(name) or tokenize(data, split, name)
    )
    result = run_search(compose_app("search", overrides, tmp_path / "latency"))
    candidates = result["candidates"]
    assert "latency_ratio" in result["front"]
    assert sorted(tokenized) == ["report", "val"], "scores and timings share one tokenization per split"
    assert [list(timings) for timings in measured] == [["hf_sdpa", "config_0"]] * len(candidates)
    # each candidate's time over the stock model's, on the same batches, interleaved
    ratios = [timings["config_0"]["median_s"] / timings["hf_sdpa"]["median_s"] for timings in measured]
    assert sorted(candidates.latency_ratio) == pytest.approx(sorted(ratios), rel=1e-12)
    cache = [json.loads(line) for line in Path(result["cache"]).read_text().splitlines()]
    timed = [r for r in cache if r["key"].startswith("latency:cpu:")]
    assert len(timed) == len(candidates)
    scored = record_search_evaluations(monkeypatch)
    rerun = run_search(compose_app("search", overrides, tmp_path / "latency-again"))
    assert not searched(scored)
    assert rerun["candidates"].latency_ratio.tolist() == candidates.latency_ratio.tolist(), "timings from the cache"
    # another timing sample is another measurement: timed afresh, not taken from the cache
    resampled = run_search(compose_app("search", [*overrides, "measure.search_batches=3"], tmp_path / "latency-3"))
    cache = [json.loads(line) for line in Path(result["cache"]).read_text().splitlines()]
    assert len([r for r in cache if ":batch 32 x 3:" in r["key"]]) == len(resampled["candidates"])
    with pytest.raises(ValueError, match="search.objective=speed is not one of: flops, latency"):
        that_search(that_run["last_checkpoint"], tmp_path / "speed", "search.objective=speed")
    assert not (tmp_path / "speed").exists(), "refused before any output"


def test_search_refuses_a_length_adaptive_checkpoint(tmp_path, that_run):
    lat = train(
        compose_app(
            "train",
            [*FAST, "task.max_length=64", "pruner=length_adaptive", "module=length_adaptive"],
            tmp_path / "lat",
        )
    )["last_checkpoint"]
    cfg = compose_app("search", ["logger=csv", f"checkpoint={lat}", "search=token_head_evolution"], tmp_path / "x")
    with pytest.raises(ValueError, match="needs a checkpoint trained by TokenHeadAdaptiveModule"):
        run_search(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruner.heads_pruned=[0,4,0]", r"every entry must be in \[0, 3\]"),
        ("pruner.heads_pruned=[0,1]", "has 2 entries; the backbone has 3 layers"),
        ("pruner.heads_pruned=[2,0,0]", r"breaks the cap: layer l may lose at most \[1, 2, 3\]\[l\] heads"),
        ("module.prune=everything", "module.prune=everything is not one of: joint, tokens, heads"),
    ],
)
def test_bad_token_head_settings(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train(compose_app("train", [*THAT, override], tmp_path / "bad"))


def test_mobilebert_importance_and_joint_sub_models(tmp_path):
    """The paper's backbone: importance through the context hook, then a sub-model with heads and
    tokens removed runs on the bottlenecked layers and counts only the kept heads."""
    module = instantiate(compose_app("train", [*THAT, "backbone=tiny_mobilebert"], tmp_path / "m").module)
    ids, mask = random_batch(batch=3, length=20)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0])}
    importance = that_module.head_importance(module, [batch])
    torch.testing.assert_close(importance.norm(dim=1), torch.ones(3))
    module.pruner.set_head_importance(importance)
    torch.manual_seed(0)
    smallest, _ = module.sub_models(mask, random.Random(0))[0]
    with torch.no_grad():
        logits, out = module(batch, pruner=smallest)
    assert logits.shape == (3, 2) and [layer.heads for layer in out.trace] == [4 - h for h in head_cap(3, 4)]
    assert out.hidden.shape[1] < 20
