"""The prunable encoder: one layer loop shared by every pruning method (DESIGN.md s.3).

The loop reuses the HF modules through an adapter and owns only the attention arithmetic, so
that it can (a) give a pruner the score vector in the layers that prune, (b) compute the output
projection and FFN for the kept rows only, and (c) slice attention heads. Layers that do not
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

from tokenprune.engine.adapters import EncoderAdapter, LayerParts, Projection, T5EncoderAdapter
from tokenprune.engine.attention import attention_with_scores, chunked_attention_applies, softmax_attention
from tokenprune.engine.heads import HeadSlicer
from tokenprune.engine.kernels import PassKernels, pass_kernels
from tokenprune.engine.pruner import TokenPruner
from tokenprune.engine.scoring import score_vector
from tokenprune.engine.state import EncoderOutput, LayerTrace, TokenState

ContextHook = Callable[[int, Tensor], Tensor]  # (layer index, context (B, h, m, d_h)) -> context


def _project(
    projections: Sequence[Projection],
    x: Tensor,
    heads: Tensor | None,
    scale: float,
    slicer: HeadSlicer,
    kernels: PassKernels,
    head_major: bool,
) -> tuple[Tensor, ...]:
    """Projections of x (B, n, d) that read it (Q and K, or Q, K and V), each (B, h, n, d_h) for
    the rows of `heads`, from one GEMM; the first one times `scale`. head_major: copied once into
    contiguous head-major blocks (eager attention reads them in place), else strided views."""
    weight, bias = slicer.stacked_rows(projections, heads, scale)
    out = kernels.linear(x, weight, bias).unflatten(-1, (len(projections), -1, slicer.head_dim))
    out = out.permute(2, 0, 3, 1, 4)  # (projection, B, h, n, d_h)
    return (out.contiguous() if head_major else out).unbind(0)


def _out_project(
    projection: Projection, context: Tensor, heads: Tensor | None, slicer: HeadSlicer, kernels: PassKernels
) -> Tensor:
    """Output projection of context (B, h, m, d_h) to (B, m, d), using the columns of `heads`."""
    weight = projection.weight if heads is None else slicer.columns(projection, heads)
    return kernels.linear(context.transpose(1, 2).flatten(2), weight, projection.bias)


def _flat_index(index: Tensor, lead: torch.Size, length: int) -> Tensor:
    """Where rows `index` (B, m) of a (*lead, length, ...) tensor (lead starting with B) lie once
    it is flattened to rows, (B * lead[1:] * m,)."""
    offsets = torch.arange(lead.numel(), device=index.device).view(*lead, 1) * length
    return (index.view(index.shape[0], *([1] * (len(lead) - 1)), index.shape[1]) + offsets).flatten()


def _rows(tensor: Tensor, index: Tensor, dim: int, flat: Tensor | None = None) -> Tensor:
    """Rows `index` (B, m) along `dim` of a (B, n, ...) or (B, H, n, ...) tensor; flat: their
    _flat_index, when the caller shares one between tensors of the same layout.

    One index_select over a flattened view copies whole contiguous rows; torch.gather with an
    expanded index is several times slower on CPU for attention-sized tensors.
    """
    lead, rest = tensor.shape[:dim], tensor.shape[dim + 1 :]
    flat = _flat_index(index, lead, tensor.shape[dim]) if flat is None else flat
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
                index, adapter.layer(index), state, bias, pruner if prune else None, layer_heads, kernels, hook
            )
            if kept.positions is not state.positions:  # tokens were removed: the bias follows them
                bias = adapter.attention_bias(kept, kept.hidden.dtype)
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
    ) -> tuple[TokenState, LayerTrace]:
        """One layer over `state`; bias is the adapter's additive attention term for its tokens;
        kernels: the pass's linear kernels; hook: the layer's context hook (see __call__)."""
        adapter = self.adapter
        slicer = self.head_slicer
        x = state.hidden
        n_heads = heads.numel() if heads is not None else adapter.num_heads
        training = adapter.model.training
        dropout = parts.attention_dropout if training else 0.0
        inputs = parts.attention_inputs
        if inputs is None:
            query_key_input, value_input, residual = x, x, x
        else:
            with kernels.modules():
                query_key_input, value_input, residual = inputs(x)
        # the softmax scale is folded into the query rows: every attention below uses scale 1
        scale = parts.scale if parts.scale is not None else slicer.head_dim**-0.5
        eager = pruner is not None and pruner.needs_scores  # attention probabilities computed here
        if value_input is query_key_input:
            query, key, value = _project(
                (parts.query, parts.key, parts.value), query_key_input, heads, scale, slicer, kernels, eager
            )
        else:
            query, key = _project((parts.query, parts.key), query_key_input, heads, scale, slicer, kernels, eager)
            (value,) = _project((parts.value,), value_input, heads, 1.0, slicer, kernels, eager)
        if heads is not None and bias.shape[1] > 1:  # a per-head bias (T5): the kept heads' rows
            bias = bias[:, heads]
        n_in = state.lengths

        if pruner is None:
            context = self._attend(query, key, value, bias, dropout)
            hidden = self._finish(parts, context, residual, x, heads, kernels, hook)
            return state.with_hidden(hidden), LayerTrace(n_in, n_in, n_in, n_heads)

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
            hidden = self._finish(parts, full_context, residual, x, heads, kernels, hook) * decision[..., None]
            trace = LayerTrace(
                n_in, n_in, n_in, n_heads, scored=scored, soft_mask=decision, scores=scores, score_mask=state.mask
            )
            return state.with_hidden(hidden), trace

        slots, new_mask = state.gather_index(decision)
        token_rows = _flat_index(slots, x.shape[:1], x.shape[1])  # shared by the (B, n, ...) tensors below
        if full_context is not None:  # heads merged first: whole token rows, gathered like the layer input's
            merged = _rows(full_context.transpose(1, 2).flatten(2), slots, 1, token_rows)
            context = merged.unflatten(2, (-1, slicer.head_dim)).transpose(1, 2)  # the out-projection reads it in place
        elif probs is not None:
            context = self._weighted(_rows(probs, slots, dim=2), value, dropout, training)
        else:  # chosen without scores: fused attention of the kept query rows only
            kept_bias = _rows(bias, slots, dim=2) if bias.shape[2] > 1 else bias  # per-query bias rows
            context = self._attend(_rows(query, slots, dim=2), key, value, kept_bias, dropout)
        kept_input = _rows(x, slots, 1, token_rows)
        kept_residual = kept_input if residual is x else _rows(residual, slots, 1, token_rows)
        hidden = self._finish(parts, context, kept_residual, kept_input, heads, kernels, hook)
        n_out = new_mask.sum(dim=1)
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
        context: Tensor,
        residual: Tensor,
        layer_input: Tensor,
        heads: Tensor | None,
        kernels: PassKernels,
        hook: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Output projection, add-and-norm with the attention residual, then the FFN block (which
        may read the layer input again: MobileBERT's output bottleneck), for the given rows."""
        if hook is not None:
            context = hook(context)
        projected = _out_project(parts.out_proj, context, heads, self.head_slicer, kernels)
        with kernels.modules():
            return parts.feed_forward(parts.add_and_norm(projected, residual), layer_input)


def seq2seq_logits(
    adapter: T5EncoderAdapter,
    input_ids: Tensor,
    attention_mask: Tensor,
    decoder_input_ids: Tensor,
    pruner: TokenPruner | None = None,
    decoder_attention_mask: Tensor | None = None,
) -> tuple[Tensor, EncoderOutput]:
    """Encoder-decoder logits with elimination in the encoder only (ACC on Flan-T5): the engine
    encodes (and eliminates), the HF decoder cross-attends to the kept encoder tokens."""
    encoded = PrunableEncoder(adapter)(input_ids, attention_mask, pruner=pruner)
    logits = adapter.decoder_logits(encoded.hidden, encoded.mask, decoder_input_ids, decoder_attention_mask)
    return logits, encoded
