"""The prunable encoder: one layer loop shared by every pruning method (DESIGN.md s.3).

The loop reuses the HF modules through an adapter and owns only the attention arithmetic, so
that it can (a) give a pruner the score vector in the layers that prune, (b) compute the output
projection and FFN for the kept rows only (at inference only the real ones when pruning left much
padding: PACK_MIN_PADDING), and (c) slice attention heads. Layers that do not
prune use fused scaled-dot-product attention; pruning layers compute probabilities one batch
chunk at a time at inference (engine/attention.py), on the whole batch when training. Family
differences (what Q/K, V and the residual read: pre-norm, MobileBERT's bottlenecks; softmax scale,
causal or position-biased attention, the protected token) come from the adapter
(engine/adapters.py); the loop has no per-family branch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenprune.engine.adapters import EncoderAdapter, LayerParts, Projection
from tokenprune.engine.attention import attention_with_scores, chunked_attention_applies, softmax_attention
from tokenprune.engine.heads import HeadSlicer
from tokenprune.engine.kernels import PassKernels, pass_kernels
from tokenprune.engine.pruner import TokenPruner
from tokenprune.engine.scoring import score_vector
from tokenprune.engine.state import EncoderOutput, LayerTrace, TokenState

ContextHook = Callable[[int, Tensor], Tensor]  # (layer index, context (B, h, m, d_h)) -> context
# At inference, a layer whose rows are at least this share padding left by pruning computes its
# row-wise parts (projections, FFN) for the real rows only (README "Measured": packing rows).
PACK_MIN_PADDING = 0.1


def _project(
    projections: Sequence[Projection],
    x: Tensor,
    layout: tuple[int, int],
    rows: Tensor | None,
    heads: Tensor | None,
    scale: float,
    slicer: HeadSlicer,
    kernels: PassKernels,
) -> tuple[Tensor, ...]:
    """Projections that read the rows x (R, d) (Q and K, or Q, K and V), each a strided (B, h, n, d_h)
    view for the rows of `heads`, from one GEMM; the first one times `scale`. x holds the rows `rows`
    of the (B, n) `layout` (None: all of them, in order); the other rows' projections are zero. Eager
    attention copies what it reads head-major itself (engine/attention.py): chunk by chunk at
    inference, the whole batch in training."""
    weight, bias = slicer.stacked_rows(projections, heads, scale)
    out = _unpack(kernels.linear(x, weight, bias), rows, layout).unflatten(-1, (len(projections), -1, slicer.head_dim))
    out = out.permute(2, 0, 3, 1, 4)  # (projection, B, h, n, d_h)
    return out.unbind(0)


def _out_project(
    projection: Projection, merged: Tensor, heads: Tensor | None, slicer: HeadSlicer, kernels: PassKernels
) -> Tensor:
    """Output projection of the heads-merged context (..., h * d_h) to (..., d), using the columns
    of `heads`."""
    weight = projection.weight if heads is None else slicer.columns(projection, heads)
    return kernels.linear(merged, weight, projection.bias)


def _merge_heads(context: Tensor) -> Tensor:
    """Per-head context (B, h, m, d_h) as token rows (B * m, h * d_h)."""
    return context.transpose(1, 2).flatten(2).flatten(0, 1)


def _unpack(out: Tensor, rows: Tensor | None, layout: tuple[int, int]) -> Tensor:
    """Computed rows `out` (R, k) as a (B, m, k) tensor of the (B, m) `layout`: R = B * m in order
    when `rows` is None, else the rows `rows` (flat indices) with zeros elsewhere."""
    if rows is None:
        return out.view(*layout, -1)
    full = out.new_zeros(layout[0] * layout[1], out.shape[-1])
    return full.index_copy_(0, rows, out).view(*layout, -1)


def _packed_rows(mask: Tensor, lengths: Tensor) -> Tensor | None:
    """The flat indices of the real rows of a (B, m) token layout whose real-token counts are
    `lengths`, when at least PACK_MIN_PADDING of its rows are padding; None: compute every row."""
    padding = mask.numel() - int(lengths.sum())
    return mask.flatten().nonzero().squeeze(1) if padding >= PACK_MIN_PADDING * mask.numel() else None


def _hooked(context: Tensor, hook: Callable[[Tensor], Tensor] | None) -> Tensor:
    """The layer's context hook applied to its per-head context (see PrunableEncoder.__call__)."""
    return context if hook is None else hook(context)


def _computed_rows(tensors: Sequence[Tensor], rows: Tensor | None) -> list[Tensor]:
    """(B, n, ...) tensors as their computed rows (R, ...): all (rows None) or `rows`; a tensor
    that appears twice is gathered once."""
    done: dict[int, Tensor] = {}
    for tensor in tensors:
        if id(tensor) not in done:
            flat = tensor.flatten(0, 1)
            done[id(tensor)] = flat if rows is None else flat.index_select(0, rows)
    return [done[id(tensor)] for tensor in tensors]


def _flat_index(index: Tensor, lead: torch.Size, length: int) -> Tensor:
    """Where rows `index` (B, m) of a (*lead, length, ...) tensor (lead starting with B) lie once
    it is flattened to rows, (B * lead[1:] * m,)."""
    offsets = torch.arange(lead.numel(), device=index.device).view(*lead, 1) * length
    return (index.view(index.shape[0], *([1] * (len(lead) - 1)), index.shape[1]) + offsets).flatten()


def _rows(tensor: Tensor, index: Tensor, dim: int) -> Tensor:
    """Rows `index` (B, m) along `dim` of a (B, n, ...) or (B, H, n, ...) tensor.

    One index_select over a flattened view copies whole contiguous rows; torch.gather with an
    expanded index is several times slower on CPU for attention-sized tensors.
    """
    lead, rest = tensor.shape[:dim], tensor.shape[dim + 1 :]
    flat = _flat_index(index, lead, tensor.shape[dim])
    return tensor.reshape(-1, *rest).index_select(0, flat).view(*lead, index.shape[1], *rest)


class PrunableEncoder:
    """Runs a HF encoder layer by layer, letting a TokenPruner remove tokens.

    Not an nn.Module: the parameters belong to the HF model the adapter wraps.
    """

    def __init__(self, adapter: EncoderAdapter) -> None:
        self.adapter = adapter
        self.head_slicer = HeadSlicer(adapter.head_dim, capacity=5 * adapter.num_layers)

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        pruner: TokenPruner | None = None,
        heads: Sequence[Tensor | None] | None = None,
        skip_layers: Collection[int] = (),
        restore: bool = False,
        context_hook: ContextHook | None = None,
    ) -> EncoderOutput:
        """Encode a batch.

        heads: per layer, the indices of the attention heads to keep; None: the pruner's
            `kept_heads` (all heads without a pruner).
        skip_layers: layers bypassed entirely (LayerDrop).
        restore: return a full-length sequence where every dropped token keeps the hidden
            state it had when it was dropped, at its original position (Drop-and-Restore).
        context_hook: `hook(layer, context) -> context` on each layer's per-head attention
            context (B, h, m, d_h) before the output projection (head importance reads its
            gradient through it); None costs nothing.
        A CPU pass without autograd computes its linear layers with the kernel engine/kernels.py
        chooses (oneDNN by default).
        """
        adapter = self.adapter
        kernels = pass_kernels(input_ids.device)
        state = TokenState.start(adapter.embed(input_ids, token_type_ids), attention_mask)
        batch, length, width = state.hidden.shape
        full = state.hidden.new_zeros(batch, length + 1, width) if restore else None  # Drop-and-Restore buffer
        bias = adapter.attention_bias(state, state.hidden.dtype)
        trace: list[LayerTrace] = []
        pruned = False  # whether a layer removed tokens: only that padding is packed, not the input's
        for index in range(adapter.num_layers):
            if index in skip_layers:
                lengths = state.lengths
                trace.append(LayerTrace(lengths, lengths * 0, lengths, heads=0, skipped=True))
                continue
            layer_heads = heads[index] if heads is not None else pruner.kept_heads(index) if pruner else None
            prune = pruner is not None and pruner.prunes_at(index) and not pruner.keeps_all(index, state)
            if full is not None and prune:
                full = self._write_back(full, state)
            hook = functools.partial(context_hook, index) if context_hook is not None else None
            kept, layer_trace = self._layer(
                index, adapter.layer(index), state, bias, pruner if prune else None, layer_heads, kernels, hook, pruned
            )
            if kept.positions is not state.positions:  # tokens were removed: the bias follows them
                bias = adapter.attention_bias(kept, kept.hidden.dtype)
                pruned = True
            state = kept
            trace.append(layer_trace)
        if full is not None:
            full = self._write_back(full, state)[:, :-1]
            return EncoderOutput(full, attention_mask.bool(), TokenState.start(full, attention_mask).positions, trace)
        return EncoderOutput(state.hidden, state.mask, state.positions, trace)

    @staticmethod
    def _write_back(full: Tensor, state: TokenState) -> Tensor:
        """Scatter the real tokens of `state` to their original positions; the rest to a spare slot."""
        spare = full.shape[1] - 1
        destination = state.positions.masked_fill(~state.mask, spare)
        return full.scatter(1, destination[..., None].expand_as(state.hidden), state.hidden)

    def _layer(
        self,
        index: int,
        parts: LayerParts,
        state: TokenState,
        bias: Tensor,
        pruner: TokenPruner | None,
        heads: Tensor | None,
        kernels: PassKernels,
        hook: Callable[[Tensor], Tensor] | None = None,
        pruned: bool = False,
    ) -> tuple[TokenState, LayerTrace]:
        """One layer over `state`; bias is the adapter's additive attention term for its tokens;
        kernels: the pass's linear kernels; hook: the layer's context hook (see __call__); pruned:
        whether an earlier layer removed tokens (then, at inference, its padding rows are skipped)."""
        adapter = self.adapter
        slicer = self.head_slicer
        x = state.hidden
        n_heads = heads.numel() if heads is not None else adapter.num_heads
        training = adapter.model.training
        layout = (x.shape[0], x.shape[1])
        # the (B * n) rows this layer computes: at inference after pruning, the real ones when padding is common
        rows = _packed_rows(state.mask, state.lengths) if pruned and not training else None
        dropout = parts.attention_dropout if training else 0.0
        inputs = parts.attention_inputs
        if inputs is None:
            query_key_input, value_input, residual = x, x, x
        else:
            with kernels.modules():
                query_key_input, value_input, residual = inputs(x)
        # the softmax scale is folded into the query rows: every attention below uses scale 1
        scale = parts.scale if parts.scale is not None else slicer.head_dim**-0.5
        # a pruning layer's out-projection and FFN read the kept rows of x and the residual (below)
        finish_inputs = (x, residual) if pruner is None else ()
        qk_rows, v_rows, *finish_rows = _computed_rows((query_key_input, value_input, *finish_inputs), rows)
        if value_input is query_key_input:
            query, key, value = _project(
                (parts.query, parts.key, parts.value), qk_rows, layout, rows, heads, scale, slicer, kernels
            )
        else:
            query, key = _project((parts.query, parts.key), qk_rows, layout, rows, heads, scale, slicer, kernels)
            (value,) = _project((parts.value,), v_rows, layout, rows, heads, 1.0, slicer, kernels)
        if heads is not None and bias.shape[1] > 1:  # a per-head bias (T5): the kept heads' rows
            bias = bias[:, heads]
        n_in = state.lengths

        if pruner is None:
            merged = _merge_heads(_hooked(self._attend(query, key, value, bias, dropout), hook))
            merged = merged if rows is None else merged.index_select(0, rows)
            x_rows, residual_rows = finish_rows
            out = self._finish(parts, merged, residual_rows, x_rows, heads, kernels)
            return state.with_hidden(_unpack(out, rows, layout)), LayerTrace(n_in, n_in, n_in, n_heads)

        probs = scores = full_context = None
        if pruner.needs_scores and chunked_attention_applies(query, dropout):
            full_context, scores = attention_with_scores(query, key, value, bias, state.mask, 1.0, adapter.causal)
        elif pruner.needs_scores:
            probs = softmax_attention(query, key, bias, 1.0)
            if pruner.scores_after_dropout and training and dropout > 0:  # the context uses the same draw
                probs, dropout = F.dropout(probs, p=dropout), 0.0
            scores = score_vector(probs, state.mask, adapter.causal)
        decision = self._select(pruner, index, scores, state)
        scored = scores is not None

        if decision.dtype != torch.bool:  # soft weights: full computation, output scaled
            if full_context is None:
                full_context = (
                    self._weighted(probs, value, dropout, training)
                    if probs is not None
                    else self._attend(query, key, value, bias, dropout)
                )
            merged = _merge_heads(_hooked(full_context, hook))
            x_rows, residual_rows = _computed_rows((x, residual), None)  # soft weights remove nothing: rows is None
            hidden = _unpack(self._finish(parts, merged, residual_rows, x_rows, heads, kernels), None, layout)
            hidden = hidden * decision[..., None]
            trace = LayerTrace(
                n_in, n_in, n_in, n_heads, scored=scored, soft_mask=decision, scores=scores, score_mask=state.mask
            )
            return state.with_hidden(hidden), trace

        slots, new_mask = state.gather_index(decision)
        n_out = new_mask.sum(dim=1)
        kept_layout = (slots.shape[0], slots.shape[1])
        kept_rows = None if training else _packed_rows(new_mask, n_out)  # of the (B * m) kept slots
        # the rows of x (B * n) computed below: every kept slot's, or only the real ones among them
        source = _flat_index(slots, x.shape[:1], x.shape[1])
        source = source if kept_rows is None else source.index_select(0, kept_rows)
        if full_context is not None and hook is None:  # heads merged first: whole token rows, like the input's
            merged = _merge_heads(full_context).index_select(0, source)
        else:
            if full_context is not None:
                context = _rows(full_context, slots, dim=2)
            elif probs is not None:
                context = self._weighted(_rows(probs, slots, dim=2), value, dropout, training)
            else:  # chosen without scores: fused attention of the kept query rows only
                kept_bias = _rows(bias, slots, dim=2) if bias.shape[2] > 1 else bias  # per-query bias rows
                context = self._attend(_rows(query, slots, dim=2), key, value, kept_bias, dropout)
            merged = _merge_heads(_hooked(context, hook))
            merged = merged if kept_rows is None else merged.index_select(0, kept_rows)
        kept_input, kept_residual = _computed_rows((x, residual), source)
        out = self._finish(parts, merged, kept_residual, kept_input, heads, kernels)
        hidden = _unpack(out, kept_rows, kept_layout)
        trace = LayerTrace(
            n_in, n_in if scored else n_out, n_out, n_heads, scored=scored, scores=scores, score_mask=state.mask
        )
        return state.select(slots, new_mask, hidden, n_out), trace

    def _select(self, pruner: TokenPruner, index: int, scores: Tensor | None, state: TokenState) -> Tensor:
        """The pruner's decision (B, n). Pruners keep slot 0; when the adapter protects each row's
        newest token instead, the pruner sees the rows with that token moved to slot 0."""
        if self.adapter.protected_token == "first":
            return pruner.select(index, scores, state)
        view, order = state.newest_first()
        decision = pruner.select(index, scores.gather(1, order) if scores is not None else None, view)
        return torch.empty_like(decision).scatter_(1, order, decision)

    @staticmethod
    def _attend(query: Tensor, key: Tensor, value: Tensor, bias: Tensor, dropout: float) -> Tensor:
        """Fused attention context of the (pre-scaled) `query` over all keys (bias: the additive
        term of these rows)."""
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=1.0)

    @staticmethod
    def _weighted(probs: Tensor, value: Tensor, dropout: float, training: bool) -> Tensor:
        """Attention context from given probabilities (attention dropout applied to them)."""
        return torch.matmul(F.dropout(probs, p=dropout, training=training), value)

    def _finish(
        self,
        parts: LayerParts,
        merged: Tensor,
        residual: Tensor,
        layer_input: Tensor,
        heads: Tensor | None,
        kernels: PassKernels,
    ) -> Tensor:
        """Output projection of the heads-merged context rows (R, h * d_h), add-and-norm with the
        attention residual rows, then the FFN block (which may read the layer input rows again:
        MobileBERT's output bottleneck): the layer's output rows (R, d)."""
        projected = _out_project(parts.out_proj, merged, heads, self.head_slicer, kernels)
        with kernels.modules():
            return parts.feed_forward(parts.add_and_norm(projected, residual), layer_input)
