"""GPT-2 (causal) and the T5 encoder on the engine, for ACC (Kachuee and Sharifkhani, arXiv 2201.03327)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, tiny_gpt2, tiny_t5
from test_flops import measured_encoder_flops
from torch import Tensor
from transformers import GPT2LMHeadModel, T5ForConditionalGeneration

from tokenprune.backbones import load_backbone
from tokenprune.engine import EncoderOutput, PrunableEncoder, T5EncoderAdapter, TokenState, attention
from tokenprune.engine.flops import EncoderDims, encoder_macs
from tokenprune.engine.pruner import TokenPruner
from tokenprune.engine.scoring import keep_top, score_vector
from tokenprune.pruners.ltp import LTPPruner
from tokenprune.pruners.static import RandomPruner, TopKPruner

MIN = torch.finfo(torch.float32).min


def real_positions(out, row: int) -> list[int]:
    return out.positions[row][out.mask[row]].tolist()


# --- GPT-2 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_unpruned_lm_logits_equal_stock_hf(attn):
    model, adapter = tiny_gpt2(attn)
    ids, mask = random_batch(length=24)  # ragged right padding
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = adapter.lm_logits(PrunableEncoder(adapter)(ids, mask).hidden)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "pruner",
    [
        TopKPruner(3, keep_ratio=0.4, start_layer=0),
        RandomPruner(3, keep_ratio=0.4, start_layer=1),
        LTPPruner(3, final_threshold=0.5, reference_length=8),
    ],
    ids=["topk", "random", "ltp"],
)
def test_gpt2_pruning_keeps_order_and_the_newest_token(pruner):
    _, adapter = tiny_gpt2()
    ids, mask = random_batch(batch=4, length=30)
    with torch.no_grad():
        out = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
    lengths = mask.sum(dim=1)
    assert out.hidden.shape[1] < ids.shape[1]
    for row in range(4):
        kept = real_positions(out, row)
        assert kept == sorted(kept), "kept tokens must keep their order"
        assert kept[-1] == int(lengths[row]) - 1, "the newest token must never be eliminated"
        assert all(p < lengths[row] for p in kept), "a padding token was kept"
    if isinstance(pruner, TopKPruner):  # the protected token counts towards k: exact counts
        assert torch.equal(out.mask.sum(dim=1), torch.ceil(lengths * 0.4).long())


def test_gpt2_soft_mask_gives_the_newest_token_weight_one():
    _, adapter = tiny_gpt2()
    ids, mask = random_batch(batch=3, length=12)
    pruner = LTPPruner(3, final_threshold=0.9, reference_length=12, soft=True)
    with torch.no_grad():
        out = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
    newest = mask.sum(dim=1) - 1
    for layer in out.trace:
        assert layer.soft_mask is not None
        torch.testing.assert_close(layer.soft_mask[torch.arange(3), newest], torch.ones(3))


def test_gpt2_topk_selection_and_later_layers_equal_hf_blocks_on_kept_tokens():
    """Eliminate in layer 1 by eq. (8) scores (newest token protected), then layer 2 over the kept
    tokens only: equal to HF's own blocks fed the kept rows with a causal mask over them."""
    model, adapter = tiny_gpt2("eager")
    ids, mask = random_batch(batch=3, length=16)
    pruner = TopKPruner(3, layer_keep_ratios=[1.0, 0.5, 0.5])
    with torch.no_grad():
        out = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
        hf = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        scores = score_vector(hf.attentions[1], mask.bool(), causal=True)
        after_layer_1 = model.transformer.h[1](hf.hidden_states[1], attention_mask=_hf_causal_mask(mask))
        lengths = mask.sum(dim=1)
        for row in range(3):
            ranking = scores[row].clone()
            ranking[lengths[row] - 1] = float("inf")  # the protected newest token
            counts = torch.ceil(lengths[row : row + 1] * 0.5).long()
            expected = keep_top(ranking[None], mask[row : row + 1].bool(), counts)[0].nonzero().flatten()
            assert real_positions(out, row) == expected.tolist()
            kept = after_layer_1[row : row + 1, expected]
            block_mask = _hf_causal_mask(torch.ones(1, expected.numel(), dtype=torch.long))
            reference = model.transformer.ln_f(model.transformer.h[2](kept, attention_mask=block_mask))
            got = adapter.base.ln_f(out.hidden[row, : expected.numel()])
            torch.testing.assert_close(got, reference[0], atol=1e-5, rtol=0)


def _hf_causal_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, n, n) additive causal + key-padding mask over slots, for HF blocks called directly."""
    n = mask.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, MIN)


def test_gpt2_drop_and_restore_gives_full_length_states_at_drop_time():
    model, adapter = tiny_gpt2()
    encoder = PrunableEncoder(adapter)
    ids, mask = random_batch(batch=3, length=20)
    pruner = TopKPruner(3, layer_keep_ratios=[1.0, 0.5, 0.5])
    with torch.no_grad():
        restored = encoder(ids, mask, pruner=pruner, restore=True)
        pruned = encoder(ids, mask, pruner=pruner)
        entering_layer_1 = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        logits = adapter.lm_logits(restored.hidden)
    assert restored.hidden.shape[:2] == ids.shape and logits.shape == (*ids.shape, 120)
    dropped_somewhere = False
    for row in range(3):
        kept = real_positions(pruned, row)
        for position in range(int(mask[row].sum())):
            if position in kept:
                expected = pruned.hidden[row, kept.index(position)]
            else:
                dropped_somewhere = True
                expected = entering_layer_1[row, position]
            torch.testing.assert_close(restored.hidden[row, position], expected, atol=1e-5, rtol=0)
    assert dropped_somewhere


def test_causal_mask_is_over_original_positions():
    """Hand-computed: a query sees the real keys whose original position is at most its own."""
    state = TokenState(
        hidden=torch.zeros(2, 4, 1),
        mask=torch.tensor([[True, True, True, False], [True, True, False, False]]),
        positions=torch.tensor([[1, 4, 6, 0], [3, 1, 0, 2]]),  # row 1: out of order on purpose
        input_lengths=torch.tensor([7, 4]),
    )
    allowed = torch.tensor(
        [
            [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]],  # padding query at 0 sees nothing real
            [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]],
        ],
        dtype=torch.bool,
    )
    expected = torch.zeros(2, 4, 4).masked_fill(~allowed, MIN)[:, None]
    assert torch.equal(state.additive_mask(torch.float32, causal=True), expected)


def test_causal_score_vector_divides_by_the_queries_that_see_each_token():
    """ACC eq. (8) on a hand-built (B=1, H=2, 4x4) causal probability tensor, last slot padding."""
    probs = torch.tensor(
        [
            [
                [[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.25, 0.25, 0.25, 0.25]],
                [[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.6, 0.2, 0.2, 0], [0.1, 0.2, 0.3, 0.4]],
            ]
        ]
    )
    mask = torch.tensor([[True, True, True, False]])
    # received, mean over heads: j0 (1.7 + 2.5) / 2 = 2.1, j1 (0.8 + 0.3) / 2, j2 (0.5 + 0.2) / 2;
    # seen by 3, 2 and 1 real queries
    torch.testing.assert_close(score_vector(probs, mask), torch.tensor([[2.1, 0.55, 0.35, 0.0]]))
    torch.testing.assert_close(score_vector(probs, mask, causal=True), torch.tensor([[0.7, 0.275, 0.35, 0.0]]))


@pytest.mark.parametrize(
    ("chunk_elements", "chunks"), [(100, [1, 1, 1]), (2 * 2 * 6 * 6, [2, 1])], ids=["one-row", "two-rows-then-one"]
)
def test_chunked_causal_attention_equals_whole_batch(chunk_elements, chunks, monkeypatch):
    """Chunks of CHUNK_ELEMENTS // (2 heads * 6 * 6) rows, the last one shorter, = the whole batch."""
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk_elements)
    rows_per_call: list[int] = []
    real = attention.softmax_attention
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, 2, 6, 4, generator=generator) for _ in range(3))
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] + [False] * 5])
    state = TokenState(torch.zeros(3, 6, 1), mask, torch.arange(6).expand(3, 6), mask.sum(dim=1))
    bias = state.additive_mask(torch.float32, causal=True)
    probs = real(query, key, bias, scale=0.3)  # the whole batch at once
    monkeypatch.setattr(
        attention, "softmax_attention", lambda q, *rest: rows_per_call.append(q.shape[0]) or real(q, *rest)
    )
    context, scores = attention.attention_with_scores(query, key, value, bias, mask, scale=0.3, causal=True)
    assert rows_per_call == chunks
    torch.testing.assert_close(context, probs @ value)
    torch.testing.assert_close(scores, score_vector(probs, mask, causal=True))


# --- T5 encoder -----------------------------------------------------------------------------


def seq2seq_logits(
    adapter: T5EncoderAdapter,
    input_ids: Tensor,
    attention_mask: Tensor,
    decoder_input_ids: Tensor,
    pruner: TokenPruner | None = None,
) -> tuple[Tensor, EncoderOutput]:
    """Encoder-decoder logits with elimination in the encoder only (ACC on Flan-T5): the engine
    encodes (and eliminates), the HF decoder cross-attends to the kept encoder tokens."""
    encoded = PrunableEncoder(adapter)(input_ids, attention_mask, pruner=pruner)
    logits = adapter.decoder_logits(encoded.hidden, encoded.mask, decoder_input_ids)
    return logits, encoded


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_t5_unpruned_seq2seq_logits_equal_stock_hf(attn):
    model, adapter = tiny_t5(attn)
    ids, mask = random_batch(length=20)
    decoder_ids = torch.randint(1, 120, (4, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got, encoded = seq2seq_logits(adapter, ids, mask, decoder_ids)
    assert encoded.hidden.shape[1] == ids.shape[1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_t5_elimination_shrinks_the_encoder_output():
    _, adapter = tiny_t5()
    ids, mask = random_batch(length=20)
    decoder_ids = torch.randint(1, 120, (4, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, encoded = seq2seq_logits(adapter, ids, mask, decoder_ids, TopKPruner(2, keep_ratio=0.5, start_layer=0))
    assert encoded.hidden.shape[1] == 10 < ids.shape[1]
    assert torch.equal(encoded.mask.sum(dim=1), torch.ceil(mask.sum(dim=1) * 0.5).long())
    assert logits.shape == (4, 6, 120) and torch.isfinite(logits).all()


def test_t5_relative_bias_uses_original_positions():
    """Hand-computed buckets: with 32 bidirectional buckets, distances below 8 map to
    |key - query| (+16 when the key is to the right)."""
    _, adapter = tiny_t5()
    positions = torch.tensor([[0, 3, 7]])
    weight = adapter.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # (buckets, H)
    relative = positions[0][None, :] - positions[0][:, None]
    buckets = relative.abs() + 16 * (relative > 0)
    expected = weight[buckets].permute(2, 0, 1)[None]  # (1, H, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(adapter.position_bias(positions), expected)
        state = TokenState(torch.zeros(1, 3, 32), torch.ones(1, 3, dtype=torch.bool), positions, torch.tensor([8]))
        torch.testing.assert_close(adapter.attention_bias(state, torch.float32), expected)


def test_t5_layers_after_elimination_equal_hf_blocks_with_original_position_bias():
    model, adapter = tiny_t5("eager")
    ids, mask = random_batch(batch=3, length=16)
    pruner = TopKPruner(2, keep_ratio=0.5, start_layer=0)
    blocks = model.encoder.block
    with torch.no_grad():
        encoded = PrunableEncoder(adapter)(ids, mask, pruner=pruner)
        embedded = model.encoder.embed_tokens(ids)
        full_bias = adapter.position_bias(torch.arange(16)[None]) + torch.zeros(3, 1, 1, 16).masked_fill(
            ~mask.bool()[:, None, None, :], MIN
        )
        after_layer_0 = blocks[0](embedded, position_bias=full_bias)[0]
        for row in range(3):
            kept = torch.tensor(real_positions(encoded, row))
            assert kept.numel() < mask[row].sum()
            rows = after_layer_0[row : row + 1, kept]
            original = blocks[1](rows, position_bias=adapter.position_bias(kept[None]))[0]
            by_slot = blocks[1](rows, position_bias=adapter.position_bias(torch.arange(kept.numel())[None]))[0]
            got = adapter.encoder_states(encoded.hidden[row : row + 1, : kept.numel()])
            torch.testing.assert_close(got, model.encoder.final_layer_norm(original), atol=1e-5, rtol=0)
            assert not torch.allclose(got, model.encoder.final_layer_norm(by_slot), atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_head_subset_equals_zeroing_the_other_heads(family):
    """Heads sliced from fused/transposed (GPT-2 Conv1D) or bias-free (T5, per-head position
    bias) projections: equal to the stock model with the other heads' output columns zeroed."""
    ids, mask = random_batch(length=16)
    heads = [torch.tensor([0, 2]), torch.tensor([3])]
    decoder_ids = torch.randint(1, 120, (4, 5), generator=torch.Generator().manual_seed(2))
    model, adapter = tiny_gpt2(layers=2) if family == "gpt2" else tiny_t5()
    with torch.no_grad():
        encoded = PrunableEncoder(adapter)(ids, mask, heads=heads)
        for index, keep in enumerate(heads):
            dropped = [h for h in range(4) if h not in keep.tolist()]
            if family == "gpt2":  # Conv1D c_proj: weight (in, out), input rows grouped by head
                model.transformer.h[index].attn.c_proj.weight.view(4, -1, 32)[dropped] = 0
            else:
                model.encoder.block[index].layer[0].SelfAttention.o.weight.view(32, 4, -1)[:, dropped] = 0
        if family == "gpt2":
            got, expected = adapter.lm_logits(encoded.hidden), model(input_ids=ids, attention_mask=mask).logits
            got, expected = got[mask.bool()], expected[mask.bool()]
        else:
            got = adapter.decoder_logits(encoded.hidden, encoded.mask, decoder_ids)
            expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_kept_rows_without_scores_get_their_own_bias_rows(family):
    """A pruner without scores (random) runs fused attention for the kept query rows only, whose
    causal / position-bias rows are gathered: equal to computing every row and keeping some."""
    _, adapter = tiny_gpt2() if family == "gpt2" else tiny_t5()
    ids, mask = random_batch(length=18)
    outputs = []
    for needs_scores in (False, True):
        pruner = RandomPruner(adapter.num_layers, keep_ratio=0.5, start_layer=0)
        pruner.needs_scores = needs_scores  # same random choice, computed with or without all rows
        torch.manual_seed(3)
        with torch.no_grad():
            outputs.append(PrunableEncoder(adapter)(ids, mask, pruner=pruner))
    assert torch.equal(outputs[0].positions, outputs[1].positions)
    torch.testing.assert_close(outputs[0].hidden, outputs[1].hidden, atol=1e-5, rtol=0)


# --- sizes, FLOPs, building from a backbone spec --------------------------------------------


def test_flops_counter_matches_flop_counter_mode_for_gpt2_and_t5():
    ids = torch.randint(5, 120, (1, 40))
    mask = torch.ones_like(ids)
    for _, adapter in (tiny_gpt2(), tiny_t5(feed_forward_proj="gated-gelu")):
        pruner = TopKPruner(adapter.num_layers, keep_ratio=0.5, start_layer=1)
        measured, trace = measured_encoder_flops(adapter, ids, mask, pruner=pruner)
        counted = 2 * float(encoder_macs(EncoderDims.of(adapter), trace).sum())
        assert counted == pytest.approx(measured, rel=1e-9)
    assert EncoderDims.of(tiny_gpt2()[1]).ffn == 4 * 32
    dims = EncoderDims.of(tiny_t5(feed_forward_proj="gated-gelu")[1])
    assert (dims.head_dim, dims.ffn, dims.ffn_matrices) == (8, 64, 3)


@pytest.mark.parametrize(
    "config, adapter, head, model_class",
    [
        (
            {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 120},
            "tokenprune.engine.GPT2Adapter",
            "causal_lm",
            GPT2LMHeadModel,
        ),
        (
            {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
            "tokenprune.engine.T5EncoderAdapter",
            "seq2seq_lm",
            T5ForConditionalGeneration,
        ),
    ],
)
def test_backbone_spec_builds_lm_heads(config, adapter, head, model_class):
    spec = {
        "name": "tiny",
        "pretrained": None,
        "config": config,
        "head": head,
        "adapter": {"_target_": adapter, "_partial_": True},
    }
    model, built = load_backbone(spec, num_labels=2)
    assert isinstance(model, model_class) and built.model is model
    with pytest.raises(ValueError, match="backbone.head"):
        load_backbone({**spec, "head": "lm"}, num_labels=2)
