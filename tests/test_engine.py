"""The engine reproduces the stock HF models and really removes tokens."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_batch, tiny_model

from tokenprune.engine import PrunableEncoder, attention, encoder
from tokenprune.engine.flops import EncoderDims, encoder_macs, unpruned_macs
from tokenprune.engine.scoring import score_vector
from tokenprune.pruners.ltp import LTPPruner
from tokenprune.pruners.static import RandomPruner, SpAttenPruner, TopKPruner


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_unpruned_logits_equal_stock_hf(family, attn):
    model, adapter = tiny_model(family, attn)
    ids, mask = random_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = adapter.classify(PrunableEncoder(adapter)(ids, mask).hidden)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "electra", "mobilebert"])
def test_sentence_pairs_embed_their_segments_as_stock_hf(family):
    """Pair tasks (MRPC, QQP, MNLI, ...): token_type_ids mark the second sentence (here the second
    half of each row's real tokens); the engine's logits equal HF's, which the segments change."""
    model, adapter = tiny_model(family, type_vocab_size=2)
    ids, mask = random_batch()
    lengths = mask.sum(dim=1, keepdim=True)
    segments = ((torch.arange(ids.shape[1]) >= lengths // 2) & mask.bool()).long()
    real = mask.bool()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, token_type_ids=segments, output_hidden_states=True)
        one_segment = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = PrunableEncoder(adapter)(ids, mask, segments)
    assert (expected.hidden_states[-1] - one_segment.hidden_states[-1])[real].abs().max() > 1e-2
    torch.testing.assert_close(out.hidden[real], expected.hidden_states[-1][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter.classify(out.hidden), expected.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_max_positions_is_the_longest_input_the_stock_model_embeds(family):
    """RoBERTa's table reserves its first pad_token_id + 1 rows: 80 rows hold 78 positions."""
    model, adapter = tiny_model(family)
    ids = torch.full((1, adapter.max_positions), 5)
    assert adapter.max_positions == (78 if family == "roberta" else 80)
    assert PrunableEncoder(adapter)(ids, torch.ones_like(ids)).hidden.shape[1] == ids.shape[1]
    model(ids)
    with pytest.raises((IndexError, RuntimeError)):
        model(torch.full((1, adapter.max_positions + 1), 5))


def test_batch_of_one_single_token_and_all_padding_rows():
    model, adapter = tiny_model("bert")
    encoder = PrunableEncoder(adapter)
    ids, mask = random_batch(batch=3, length=10)
    mask[1] = 0
    mask[1, 0] = 1  # one real token
    mask[2] = 0  # all padding
    pruner = TopKPruner(adapter.num_layers, keep_ratio=0.3, start_layer=0)
    with torch.no_grad():
        out = encoder(ids, mask, pruner=pruner)
        logits = adapter.classify(out.hidden)
        single = adapter.classify(encoder(ids[:1], mask[:1], pruner=pruner).hidden)
    assert torch.isfinite(logits).all()
    assert out.mask[1].sum() == 1 and out.mask[2].sum() == 0
    torch.testing.assert_close(single, logits[:1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pruner_cls", [TopKPruner, RandomPruner])
def test_pruning_shortens_tensors_keeps_cls_never_padding(family, pruner_cls):
    _, adapter = tiny_model(family)
    ids, mask = random_batch(batch=4, length=30)
    pruner = pruner_cls(adapter.num_layers, keep_ratio=0.4, start_layer=1)
    with torch.no_grad():
        out = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
    real = mask.sum(dim=1)
    expected = torch.ceil(real * 0.4).long()
    assert out.hidden.shape[1] == int(expected.max()) < ids.shape[1]
    assert torch.equal(out.mask.sum(dim=1), expected)
    assert (out.positions[:, 0] == 0).all(), "[CLS] must stay in slot 0"
    kept_positions = out.positions[out.mask]
    rows = torch.arange(4)[:, None].expand_as(out.positions)[out.mask]
    assert mask[rows, kept_positions].all(), "a padding token was kept"
    assert [t.n_out.tolist() for t in out.trace][0] == real.tolist()


def test_inference_after_pruning_computes_only_real_rows_with_the_same_result(family, monkeypatch):
    """Rows that pruning left as padding are skipped at inference (PACK_MIN_PADDING): the real
    rows equal those of a pass that computes every row; the input's own padding is computed as
    the stock model does."""
    _, adapter = tiny_model(family)
    ids, mask = random_batch(batch=4, length=30)  # ragged: per-example keep counts differ
    pruner = TopKPruner(adapter.num_layers, keep_ratio=0.4, start_layer=1)
    engine = PrunableEncoder(adapter)
    with torch.inference_mode():
        packed = engine(ids, mask, pruner=pruner)
        unpruned = engine(ids, mask)
        monkeypatch.setattr(encoder, "PACK_MIN_PADDING", 2.0)  # never pack
        every_row = engine(ids, mask, pruner=pruner)
    assert torch.equal(packed.mask, every_row.mask) and torch.equal(packed.positions, every_row.positions)
    torch.testing.assert_close(packed.hidden[packed.mask], every_row.hidden[every_row.mask], rtol=1e-5, atol=1e-5)
    padding = ~packed.mask
    assert padding.any() and packed.hidden[padding].abs().sum() == 0, "padding rows were computed"
    assert every_row.hidden[padding].abs().sum() > 0
    assert unpruned.hidden[~mask.bool()].abs().sum() > 0, "the unpruned input's padding runs like stock"


def test_topk_keeps_the_most_attended_tokens():
    model, adapter = tiny_model("bert", "eager")
    ids, mask = random_batch(batch=2, length=16)
    pruner = TopKPruner(adapter.num_layers, keep_ratio=0.5, start_layer=0)
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
        out = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
    significance = score_vector(probs, mask.bool())
    significance[:, 0] = float("inf")
    for row in range(2):
        count = int(out.trace[0].n_out[row])
        expected = set(significance[row].masked_fill(~mask[row].bool(), -1).topk(count).indices.tolist())
        assert set(out.positions[row][out.mask[row]].tolist()) == expected


def test_score_vector_mean_is_one_over_real_tokens():
    model, _ = tiny_model("bert", "eager")
    ids, mask = random_batch()
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[1]
    scores = score_vector(probs, mask.bool())
    means = scores.sum(dim=1) / mask.sum(dim=1)
    torch.testing.assert_close(means, torch.ones_like(means))
    assert (scores[~mask.bool()] == 0).all()


def test_drop_and_restore_returns_full_length_with_vectors_at_drop_time():
    """Tokens dropped in layer 1 keep the state they entered it with: stock HF's layer-0 output."""
    model, adapter = tiny_model("bert")
    encoder = PrunableEncoder(adapter)
    ids, mask = random_batch(batch=3, length=20)
    layers = adapter.num_layers
    pruner = TopKPruner(layers, layer_keep_ratios=[1.0, 0.5, 0.5])
    with torch.no_grad():
        restored = encoder(ids, mask, pruner=pruner, restore=True)
        pruned = encoder(ids, mask, pruner=pruner)
        entering_layer_1 = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    assert restored.hidden.shape[:2] == ids.shape
    dropped = 0
    for row in range(3):
        kept = set(pruned.positions[row][pruned.mask[row]].tolist())
        for position in range(int(mask[row].sum())):
            if position in kept:
                expected = pruned.hidden[row][pruned.positions[row] == position][0]
            else:
                dropped += 1
                expected = entering_layer_1[row, position]
            torch.testing.assert_close(restored.hidden[row, position], expected, atol=1e-5, rtol=0)
    assert dropped == sum(n - math.ceil(n / 2) for n in mask.sum(dim=1).tolist())


def test_head_subset_equals_zeroing_the_other_heads():
    model, adapter = tiny_model("bert")
    ids, mask = random_batch()
    heads = [torch.tensor([0, 2]), None, torch.tensor([3])]
    with torch.no_grad():
        got = adapter.classify(PrunableEncoder(adapter)(ids, mask, heads=heads).hidden)
        head_dim = adapter.head_dim
        for index, keep in enumerate(heads):
            if keep is None:
                continue
            dense = model.bert.encoder.layer[index].attention.output.dense
            columns = dense.weight.view(dense.weight.shape[0], -1, head_dim)
            dropped = [h for h in range(adapter.num_heads) if h not in keep.tolist()]
            columns[:, dropped] = 0
        expected = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_spatten_schedule_reaches_final_ratio():
    pruner = SpAttenPruner(num_layers=4, final_ratio=0.25, start_layer=0)
    assert pruner.ratios == pytest.approx([0.8125, 0.625, 0.4375, 0.25])


@pytest.mark.parametrize(("layers", "unpruned"), [(3, 2), (6, 3), (12, 3), (24, 4)])
def test_topk_start_layer_null_is_the_ltp_papers_baseline(layers, unpruned):
    """The LTP paper's top-k leaves the first max(3, ceil(0.15 L)) layers unpruned (within the model)."""
    ratios = TopKPruner(layers, keep_ratio=0.5, start_layer=None).ratios
    assert ratios == [1.0] * unpruned + [0.5] * (layers - unpruned)


def test_layer_drop_skips_layers_and_costs_nothing():
    """Skipped layers pass their input through unchanged (skipping 0 and 2 = a stock model made of
    layer 1 alone) and add nothing to the FLOPs count (one layer's MACs of three)."""
    model, adapter = tiny_model("bert")
    ids, mask = random_batch()
    engine = PrunableEncoder(adapter)
    with torch.no_grad():
        out = engine(ids, mask, skip_layers={0, 2})
        none_run = engine(ids, mask, skip_layers={0, 1, 2})
        stock = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        model.bert.encoder.layer = torch.nn.ModuleList([model.bert.encoder.layer[1]])
        layer_1_alone = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert [t.skipped for t in out.trace] == [True, False, True]
    real = mask.bool()
    torch.testing.assert_close(none_run.hidden[real], stock[0][real], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.hidden[real], layer_1_alone[real], atol=1e-5, rtol=0)
    dims = EncoderDims.of(adapter)
    lengths = mask.sum(dim=1)
    assert torch.equal(encoder_macs(dims, out.trace), unpruned_macs(dims, lengths) / 3)
    assert not encoder_macs(dims, none_run.trace).any()


@pytest.mark.parametrize(
    ("chunk_elements", "chunks"),
    [(1, [1, 1, 1]), (200, [1, 1, 1]), (2 * 4 * 9 * 9, [2, 1]), (1 << 20, [3])],
    ids=["floor-one-row", "one-row", "two-rows-then-a-short-one", "whole-batch"],
)
def test_chunked_attention_equals_whole_batch(chunk_elements, chunks, monkeypatch):
    """attention_with_scores over batch chunks = whole-batch softmax attention, incl. padding;
    a chunk holds CHUNK_ELEMENTS // (heads * n * n) rows (here 4 * 9 * 9 = 324 per row), the last
    one what is left; Q/K/V strided, as the projections leave them."""
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk_elements)
    rows_per_call: list[int] = []
    real = attention.softmax_attention
    monkeypatch.setattr(
        attention, "softmax_attention", lambda q, *rest: rows_per_call.append(q.shape[0]) or real(q, *rest)
    )
    generator = torch.Generator().manual_seed(0)
    # strided views of one (B, n, 3, h, d_h) projection output, as the engine passes them
    query, key, value = torch.randn(3, 9, 3, 4, 8, generator=generator).permute(2, 0, 3, 1, 4).unbind(0)
    assert not query.is_contiguous()
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2] = False  # an all-padding row
    additive = torch.zeros(3, 9).masked_fill(~mask, torch.finfo(torch.float32).min)[:, None, None, :]
    probs = torch.softmax(query @ key.transpose(-1, -2) * 8**-0.5 + additive, dim=-1)
    context, scores = attention.attention_with_scores(query, key, value, additive, mask)
    assert rows_per_call == chunks
    torch.testing.assert_close(context, probs @ value)
    torch.testing.assert_close(scores, score_vector(probs, mask))
    assert scores[2].abs().sum() == 0


@pytest.mark.parametrize("pruner", [TopKPruner(3, keep_ratio=0.5, start_layer=0), LTPPruner(3, final_threshold=0.05)])
def test_inference_path_equals_differentiable_path(pruner):
    """Without gradients pruning layers take the chunked path; with them the whole-batch one:
    same tokens, same hidden states."""
    _, adapter = tiny_model("bert")
    ids, mask = random_batch()
    encoder = PrunableEncoder(adapter)
    with torch.enable_grad():
        whole = encoder(ids, mask, pruner=pruner)
    with torch.inference_mode():
        chunked = encoder(ids, mask, pruner=pruner)
    assert whole.hidden.requires_grad and not chunked.hidden.requires_grad
    torch.testing.assert_close(chunked.positions, whole.positions)
    torch.testing.assert_close(chunked.hidden, whole.hidden.detach(), rtol=1e-5, atol=1e-5)
    assert [t.n_out.tolist() for t in chunked.trace] == [t.n_out.tolist() for t in whole.trace]
    assert any(t.scored for t in chunked.trace)


def test_layers_that_would_keep_everything_skip_the_score():
    """keeps_all: LTP with a threshold <= 0 and top-k whose count covers every row run unpruned."""
    _, adapter = tiny_model("bert")
    ids, mask = random_batch()
    ltp = LTPPruner(3, final_threshold=0.05)  # layer 0 threshold = 0
    trace = PrunableEncoder(adapter)(ids, mask, pruner=ltp).trace
    assert not trace[0].scored and trace[1].scored
    one_token = torch.ones(2, 1, dtype=torch.long)
    trace = PrunableEncoder(adapter)(
        one_token * 7, one_token, pruner=TopKPruner(3, keep_ratio=0.5, start_layer=0)
    ).trace
    assert not any(t.scored for t in trace)


def test_scores_after_dropout_rank_the_dropped_attention():
    """The references scored attention after dropout (DESIGN.md s.5): a training pass's scores then
    no longer average 1 over real tokens; in evaluation the setting changes nothing."""
    model, adapter = tiny_model("bert", attention_probs_dropout_prob=0.5)
    ids, mask = random_batch()

    def first_layer_means(after: bool) -> torch.Tensor:
        pruner = TopKPruner(adapter.num_layers, keep_ratio=0.5, start_layer=0)
        pruner.scores_after_dropout = after
        torch.manual_seed(0)
        with torch.no_grad():
            trace = PrunableEncoder(adapter)(ids, mask, pruner=pruner).trace[0]
        return trace.scores.sum(dim=1) / trace.score_mask.sum(dim=1)

    model.train()
    torch.testing.assert_close(first_layer_means(False), torch.ones(4))
    assert (first_layer_means(True) - 1).abs().max() > 0.01
    model.eval()
    torch.testing.assert_close(first_layer_means(True), torch.ones(4))
