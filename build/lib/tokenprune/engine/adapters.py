"""Backbone adapters: map a HF transformers 5.x model family onto the engine's layer loop.

An adapter only points at the HF model's own sub-modules (embeddings, Q/K/V/output linears,
LayerNorms, FFN, classifier), so parameters and state_dict keys stay exactly those of the HF
model. The engine owns the layer loop and the attention arithmetic between those modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class LayerParts:
    """The pieces of one post-LayerNorm encoder layer the engine calls in order."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    out_proj: nn.Linear
    attention_dropout: float
    add_and_norm: Callable[[Tensor, Tensor], Tensor]  # (projected context, residual) -> x
    feed_forward: Callable[[Tensor], Tensor]  # x -> layer output (FFN + residual + norm)


class EncoderAdapter(ABC):
    """Common interface of a backbone family. Subclasses only locate modules."""

    def __init__(self, model: PreTrainedModel) -> None:
        # HF sub-modules are found by attribute name, which static typing cannot follow: Any.
        self.model: Any = model
        config = model.config
        self.num_layers: int = config.num_hidden_layers
        self.num_heads: int = config.num_attention_heads
        self.hidden_size: int = config.hidden_size
        self.head_dim: int = self.hidden_size // self.num_heads
        self.intermediate_size: int = getattr(config, "intermediate_size", 0)
        self.max_positions: int = config.max_position_embeddings

    @abstractmethod
    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        """Token + position (+ segment) embeddings, (B, N, d)."""

    @abstractmethod
    def layer(self, index: int) -> LayerParts:
        """Modules of encoder layer `index`."""

    @abstractmethod
    def classify(self, hidden: Tensor) -> Tensor:
        """Sequence-level logits from final hidden states whose slot 0 is [CLS]."""

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
            query=attention.query,
            key=attention.key,
            value=attention.value,
            out_proj=output.dense,
            attention_dropout=attention.dropout.p,
            add_and_norm=lambda x, residual: output.LayerNorm(output.dropout(x) + residual),
            feed_forward=layer.feed_forward_chunk,
        )

    def classify(self, hidden: Tensor) -> Tensor:
        if isinstance(self.model.classifier, nn.Linear):  # BERT: pooler -> dropout -> linear
            return self.model.classifier(self.model.dropout(self.base.pooler(hidden)))
        return self.model.classifier(hidden)  # RoBERTa / ELECTRA heads read slot 0 themselves


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
            query=attention.q_lin,
            key=attention.k_lin,
            value=attention.v_lin,
            out_proj=attention.out_lin,
            attention_dropout=attention.dropout.p,
            add_and_norm=lambda x, residual: block.sa_layer_norm(x + residual),
            feed_forward=lambda x: block.output_layer_norm(block.ffn(x) + x),
        )

    def classify(self, hidden: Tensor) -> Tensor:
        pooled = torch.relu(self.model.pre_classifier(hidden[:, 0]))
        return self.model.classifier(self.model.dropout(pooled))
