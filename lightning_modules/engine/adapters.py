"""Backbone adapters: map a HF transformers 5.x model family onto the engine's layer loop.

An adapter only points at the HF model's own sub-modules (embeddings, Q/K/V/output projections,
norms, FFN, heads), so parameters and state_dict keys stay exactly those of the HF model. The
engine owns the layer loop and the attention arithmetic between those modules. What differs
between families is declared here, never tested for in the loop: what Q/K, V and the attention
residual read and what the FFN block adds back (`LayerParts.attention_inputs`, `feed_forward`:
post-norm, pre-norm, MobileBERT's bottlenecks), the softmax scale, the additive attention bias
(key mask, causal mask over original positions, relative position bias: `attention_bias`), causal
score normalisation and which token of a row is never eliminated (`causal`, `protected_token`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from tokenprune.engine.state import TokenState

# Flan-T5 and T5 were trained on inputs of up to 512 tokens; relative positions have no table limit.
T5_INPUT_LENGTH = 512


# Families whose position table reserves its first pad_token_id + 1 rows (positions start after padding).
POSITION_OFFSET_FAMILIES = ("roberta", "xlm-roberta", "camembert")


def usable_positions(config: PretrainedConfig) -> int:
    """Longest input (in tokens) the backbone's position embeddings can encode; T5 (relative
    positions, no table) the input length it was trained on."""
    if config.model_type == "t5":
        return T5_INPUT_LENGTH
    offset = config.pad_token_id + 1 if config.model_type in POSITION_OFFSET_FAMILIES else 0
    return config.max_position_embeddings - offset


@dataclass(frozen=True)
class Projection:
    """A linear map `x @ weight.T + bias` in nn.Linear orientation: weight (out, in).

    The tensors may be views of a fused or transposed HF parameter (GPT-2's Conv1D c_attn), so
    gradients reach the HF parameter; the engine slices their rows/columns per attention head.
    """

    weight: Tensor
    bias: Tensor | None

    @classmethod
    def of(cls, linear: nn.Linear) -> Projection:
        return cls(linear.weight, linear.bias)


AttentionInputs = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]  # x -> (Q/K input, V input, residual)


@dataclass(frozen=True)
class LayerParts:
    """The pieces of one transformer layer the engine calls in order, on layer input x:

        qk, v, residual = attention_inputs(x)          # None: (x, x, x)
        a = add_and_norm(out_proj(attention(query(qk), key(qk), value(v))), residual)
        layer output = feed_forward(a, x)

    Post-norm (BERT): attention_inputs None; feed_forward is the FFN block with its residual and norm.
    Pre-norm (GPT-2, T5): attention_inputs (norm(x), norm(x), x); add_and_norm only adds the
    residual; feed_forward is `a + FFN(norm(a))`.
    MobileBERT: Q/K, V and the residual come from bottlenecks of x; feed_forward ends with the
    output bottleneck back to x's width, adding x.
    """

    query: Projection
    key: Projection
    value: Projection
    out_proj: Projection
    attention_dropout: float
    add_and_norm: Callable[[Tensor, Tensor], Tensor]  # (projected context, residual) -> a
    feed_forward: Callable[[Tensor, Tensor], Tensor]  # (a, layer input x) -> layer output
    attention_inputs: AttentionInputs | None = None  # None: Q, K, V and the residual all read x
    scale: float | None = None  # softmax scale of the attention logits; None: 1/sqrt(d_h)


def pre_norm_inputs(norm: Callable[[Tensor], Tensor]) -> AttentionInputs:
    """`attention_inputs` of a pre-norm layer: Q, K and V read norm(x), the residual is x."""

    def inputs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        normed = norm(x)
        return normed, normed, x

    return inputs


class EncoderAdapter(ABC):
    """Common interface of a backbone family. Subclasses only locate modules.

    causal: queries see only keys at earlier or equal original positions (decoders); the score
        vector is then normalised by the number of queries that see each token (ACC eq. 8).
    protected_token: the token of each row that is never eliminated: "first" ([CLS], slot 0) for
        encoders, "last" (the newest real token) for causal decoders (DESIGN.md s.3).
    For the FLOPs counter (engine/flops.py, EncoderDims):
    ffn_matrices: d x d_ff matrices in the FFN (2; 3 for gated FFNs).
    input_macs: MACs per entering token before attention besides Q/K/V (MobileBERT's bottlenecks).
    output_macs: MACs per kept token after the attention block; None: the FFN's
        ffn_matrices * d * d_ff.
    """

    causal: bool = False
    protected_token: Literal["first", "last"] = "first"
    ffn_matrices: int = 2
    input_macs: int = 0
    output_macs: int | None = None

    def __init__(self, model: PreTrainedModel) -> None:
        # HF sub-modules are found by attribute name, which static typing cannot follow: Any.
        self.model: Any = model
        config = model.config
        self.num_layers: int = config.num_hidden_layers
        self.num_heads: int = config.num_attention_heads
        self.hidden_size: int = config.hidden_size
        self.head_dim: int = self.hidden_size // self.num_heads
        self.intermediate_size: int = getattr(config, "intermediate_size", 0)
        self.max_positions: int = usable_positions(config)

    @abstractmethod
    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        """Token + position (+ segment) embeddings, (B, N, d)."""

    @abstractmethod
    def layer(self, index: int) -> LayerParts:
        """Modules of layer `index`."""

    def attention_bias(self, state: TokenState, dtype: torch.dtype) -> Tensor:
        """Additive attention-logit term for the tokens of `state`, broadcastable to (B, H, n, n):
        the key mask, causal over original positions for causal families. Computed once per
        set of tokens (at the start and after each layer that removes tokens)."""
        return state.additive_mask(dtype, causal=self.causal)

    def classify(self, hidden: Tensor) -> Tensor:
        """Sequence-level logits from final hidden states whose slot 0 is [CLS]."""
        raise NotImplementedError(f"{type(self).__name__} has no sequence-classification head")

    def token_logits(self, hidden: Tensor) -> Tensor:
        """Token-level logits (token classification heads: dropout + linear)."""
        return self.model.classifier(self.model.dropout(hidden))


class BertFamilyAdapter(EncoderAdapter):
    """BERT, RoBERTa, ELECTRA and MiniLM (all share BertLayer's module layout)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        self.base: Any = self.model.base_model
        self._layers: Any = self.base.encoder.layer

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        hidden = self.base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        project = getattr(self.base, "embeddings_project", None)  # ELECTRA small/base
        return project(hidden) if project is not None else hidden

    def layer(self, index: int) -> LayerParts:
        layer = self._layers[index]
        attention = layer.attention.self
        output = layer.attention.output
        return LayerParts(
            query=Projection.of(attention.query),
            key=Projection.of(attention.key),
            value=Projection.of(attention.value),
            out_proj=Projection.of(output.dense),
            attention_dropout=attention.dropout.p,
            add_and_norm=lambda x, residual: output.LayerNorm(output.dropout(x) + residual),
            feed_forward=lambda x, _: layer.feed_forward_chunk(x),
        )

    def classify(self, hidden: Tensor) -> Tensor:
        if isinstance(self.model.classifier, nn.Linear):  # BERT: pooler -> dropout -> linear
            return self.model.classifier(self.model.dropout(self.base.pooler(hidden)))
        return self.model.classifier(hidden)  # RoBERTa / ELECTRA heads read slot 0 themselves


class MobileBertAdapter(BertFamilyAdapter):
    """MobileBERT (Sun et al., arXiv 2004.02984): BERT's embeddings, pooler and heads around
    transformers' bottlenecked MobileBertLayer.

    With use_bottleneck the layer's `bottleneck` maps the hidden_size-wide input x to the Q/K
    input, the V input and the attention residual, which is the input bottleneck
    (intra_bottleneck_size wide): key_query_shared_bottleneck reads Q/K from a second, shared
    bottleneck and V from x; use_bottleneck_attention reads all three from the input bottleneck.
    Attention and FFNs run at the bottleneck width: num_feedforward_networks - 1 stacked FFNs,
    then intermediate/output, whose output bottleneck returns to hidden_size adding x. Without
    use_bottleneck the layer is BERT's with the stacked FFNs. Norms are the configured NoNorm
    (elementwise affine) or LayerNorm modules.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        config = model.config
        width, hidden = config.true_hidden_size, config.hidden_size  # attention/FFN width, layer width
        bottleneck_reads = config.key_query_shared_bottleneck or config.use_bottleneck_attention
        if config.use_bottleneck and not bottleneck_reads and width != hidden:
            raise ValueError(
                "MobileBERT with use_bottleneck=True, key_query_shared_bottleneck=False and "
                f"use_bottleneck_attention=False projects the hidden_size={hidden} layer input with "
                f"intra_bottleneck_size={width} Q/K/V weights (transformers' MobileBertLayer fails on it "
                "too): set key_query_shared_bottleneck=True, use_bottleneck_attention=True or "
                "intra_bottleneck_size=hidden_size"
            )
        self.head_dim = width // self.num_heads
        if config.use_bottleneck:  # the input bottleneck linear, and the shared Q/K one
            shared = config.key_query_shared_bottleneck and not config.use_bottleneck_attention
            self.input_macs = (2 if shared else 1) * hidden * width
        self.output_macs = 2 * config.num_feedforward_networks * width * self.intermediate_size + (
            width * hidden if config.use_bottleneck else 0  # the output bottleneck
        )

    def layer(self, index: int) -> LayerParts:
        layer = self._layers[index]
        attention = layer.attention.self
        output = layer.attention.output
        stacked = layer.ffn if layer.num_feedforward_networks > 1 else ()

        def attention_inputs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            query_key, _, value, residual = layer.bottleneck(x)  # HF's Q and K inputs are one tensor
            return query_key, value, residual

        def feed_forward(x: Tensor, layer_input: Tensor) -> Tensor:
            for ffn in stacked:
                x = ffn(x)
            return layer.output(layer.intermediate(x), x, layer_input)

        return LayerParts(
            query=Projection.of(attention.query),
            key=Projection.of(attention.key),
            value=Projection.of(attention.value),
            out_proj=Projection.of(output.dense),
            attention_dropout=attention.dropout.p,
            add_and_norm=(  # MobileBertSelfOutput drops out only without the bottleneck
                (lambda x, residual: output.LayerNorm(x + residual))
                if output.use_bottleneck
                else (lambda x, residual: output.LayerNorm(output.dropout(x) + residual))
            ),
            feed_forward=feed_forward,
            attention_inputs=attention_inputs if layer.use_bottleneck else None,
        )


class DistilBertAdapter(EncoderAdapter):
    """DistilBERT: q_lin/k_lin/v_lin/out_lin, sa_layer_norm, ffn, output_layer_norm."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        self.intermediate_size = model.config.hidden_dim
        self.base: Any = self.model.base_model
        self._layers: Any = self.base.transformer.layer

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        return self.base.embeddings(input_ids=input_ids)

    def layer(self, index: int) -> LayerParts:
        block = self._layers[index]
        attention = block.attention
        return LayerParts(
            query=Projection.of(attention.q_lin),
            key=Projection.of(attention.k_lin),
            value=Projection.of(attention.v_lin),
            out_proj=Projection.of(attention.out_lin),
            attention_dropout=attention.dropout.p,
            add_and_norm=lambda x, residual: block.sa_layer_norm(x + residual),
            feed_forward=lambda x, _: block.output_layer_norm(block.ffn(x) + x),
        )

    def classify(self, hidden: Tensor) -> Tensor:
        pooled = torch.relu(self.model.pre_classifier(hidden[:, 0]))
        return self.model.classifier(self.model.dropout(pooled))


class GPT2Adapter(EncoderAdapter):
    """GPT-2 (GPT2LMHeadModel) for ACC on decoders (Kachuee and Sharifkhani, arXiv 2201.03327).

    Pre-LayerNorm blocks: ln_1 -> attention (c_attn, a Conv1D, yields q, k, v; c_proj) ->
    residual; ln_2 -> MLP -> residual; ln_f before the LM head. Attention is causal over the
    original positions of the kept tokens, scores follow eq. (8), the newest token is protected.
    """

    causal = True
    protected_token = "last"

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        self.base: Any = self.model.base_model
        self.intermediate_size = model.config.n_inner or 4 * self.hidden_size
        self._layers: Any = self.base.h

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.base.wte(input_ids) + self.base.wpe(positions)
        if token_type_ids is not None:  # GPT-2 embeds token types with the token table
            hidden = hidden + self.base.wte(token_type_ids)
        return self.base.drop(hidden)

    def layer(self, index: int) -> LayerParts:
        block = self._layers[index]
        attention = block.attn
        # Conv1D computes x @ W + b with W (in, out): W.T is the nn.Linear orientation.
        weights = attention.c_attn.weight.T.split(self.hidden_size)
        biases = attention.c_attn.bias.split(self.hidden_size)
        query, key, value = (Projection(w, b) for w, b in zip(weights, biases, strict=True))
        return LayerParts(
            query=query,
            key=key,
            value=value,
            out_proj=Projection(attention.c_proj.weight.T, attention.c_proj.bias),
            attention_dropout=attention.attn_dropout.p,
            add_and_norm=lambda x, residual: attention.resid_dropout(x) + residual,
            feed_forward=lambda x, _: x + block.mlp(block.ln_2(x)),
            attention_inputs=pre_norm_inputs(block.ln_1),
            scale=attention.scaling,
        )

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits: ln_f then the LM head (use full-length, restored hidden states)."""
        return self.model.lm_head(self.base.ln_f(hidden))


class T5EncoderAdapter(EncoderAdapter):
    """The encoder of T5 / Flan-T5 (T5ForConditionalGeneration); only its self-attention eliminates.

    Pre-RMSNorm blocks: layer[0].layer_norm -> SelfAttention (q, k, v, o without bias, no
    1/sqrt(d_kv) scaling) -> residual; layer[1] (norm -> DenseReluDense -> residual); the
    encoder's final_layer_norm before the decoder. Every layer adds the relative position bias
    of the first layer's SelfAttention, here over the original positions of the kept tokens.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        config = model.config
        self.encoder: Any = self.model.encoder
        self.head_dim = config.d_kv
        self.intermediate_size = config.d_ff
        self.ffn_matrices = 3 if config.is_gated_act else 2
        self._layers: Any = self.encoder.block
        self._position_attention: Any = self._layers[0].layer[0].SelfAttention

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        return self.encoder.dropout(self.encoder.embed_tokens(input_ids))

    def layer(self, index: int) -> LayerParts:
        attention_layer, feed_forward = self._layers[index].layer[0], self._layers[index].layer[-1]
        attention = attention_layer.SelfAttention
        return LayerParts(
            query=Projection.of(attention.q),
            key=Projection.of(attention.k),
            value=Projection.of(attention.v),
            out_proj=Projection.of(attention.o),
            attention_dropout=attention.dropout,
            add_and_norm=lambda x, residual: residual + attention_layer.dropout(x),
            feed_forward=lambda x, _: feed_forward(x),
            attention_inputs=pre_norm_inputs(attention_layer.layer_norm),
            scale=attention.scaling,
        )

    def position_bias(self, positions: Tensor) -> Tensor:
        """T5's bidirectional relative position bias (B, H, n, n) between tokens at the given
        original positions (B, n): bucket(key position - query position) -> per-head scalar."""
        attention = self._position_attention
        relative = positions[:, None, :] - positions[:, :, None]
        buckets = attention._relative_position_bucket(
            relative,
            bidirectional=True,
            num_buckets=attention.relative_attention_num_buckets,
            max_distance=attention.relative_attention_max_distance,
        )
        return attention.relative_attention_bias(buckets).permute(0, 3, 1, 2)

    def attention_bias(self, state: TokenState, dtype: torch.dtype) -> Tensor:
        return self.position_bias(state.positions).to(dtype) + super().attention_bias(state, dtype)

    def encoder_states(self, hidden: Tensor) -> Tensor:
        """The encoder output the decoder cross-attends to: final_layer_norm, then dropout."""
        return self.encoder.dropout(self.encoder.final_layer_norm(hidden))

    def decoder_logits(
        self, hidden: Tensor, mask: Tensor, decoder_input_ids: Tensor, decoder_attention_mask: Tensor | None = None
    ) -> Tensor:
        """LM logits of the HF decoder cross-attending to the (kept) encoder tokens `hidden`
        (B, m, d), the engine's last-layer output, whose real slots are `mask` (B, m)."""
        return self.decode(self.encoder_states(hidden), mask, decoder_input_ids, decoder_attention_mask)

    def decode(
        self, states: Tensor, mask: Tensor, decoder_input_ids: Tensor, decoder_attention_mask: Tensor | None = None
    ) -> Tensor:
        """LM logits of the HF decoder over finished encoder outputs `states` (after the final norm,
        e.g. the stock HF encoder's `last_hidden_state`)."""
        return self.model(
            encoder_outputs=(states,),
            attention_mask=mask.long(),
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
        ).logits
