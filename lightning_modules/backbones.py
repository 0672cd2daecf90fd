"""Build a HF model + engine adapter + tokenizer path from a `conf/backbone/*.yaml` spec.

A spec has `name`, `pretrained` (a hub id / local folder, or a `_target_` node returning one,
or null for random weights), `tokenizer` (same forms), `config` (overrides,
or the full config when `pretrained` is null), `adapter` (a `_target_` node, `_partial_`) and
optionally `head`: `classification` (default; token classification for token-level tasks),
`causal_lm` (GPT-2 with GPT2Adapter) or `seq2seq_lm` (T5 / Flan-T5 with T5EncoderAdapter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
    PreTrainedModel,
)

from tokenprune.checks import check_choice
from tokenprune.engine.adapters import EncoderAdapter

# The HF auto class each backbone `head` builds (token-level tasks override `classification`).
HEADS: dict[str, Any] = {
    "classification": AutoModelForSequenceClassification,
    "causal_lm": AutoModelForCausalLM,
    "seq2seq_lm": AutoModelForSeq2SeqLM,
}


def resolve_location(value: Any) -> str | None:
    """A path/hub id given directly, or computed by a `_target_` node (packaged models)."""
    if isinstance(value, Mapping) and "_target_" in value:
        return str(instantiate(value))
    return None if value is None else str(value)


def tokenizer_location(spec: Mapping[str, Any]) -> str:
    location = resolve_location(spec.get("tokenizer"))
    if location is None:
        raise ValueError(f"backbone.tokenizer is missing for backbone={spec.get('name')}")
    return location


def load_config(spec: Mapping[str, Any], num_labels: int) -> PretrainedConfig:
    overrides = dict(spec.get("config") or {})
    pretrained = resolve_location(spec.get("pretrained"))
    if pretrained is None:
        model_type = overrides.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"backbone '{spec.get('name')}' has pretrained=null, so config.model_type is required")
        config = AutoConfig.for_model(model_type, **overrides)
    else:
        config = AutoConfig.from_pretrained(pretrained, **overrides)
    config.num_labels = num_labels
    if num_labels == 1:
        config.problem_type = "regression"
    return config


def load_backbone(
    spec: Mapping[str, Any], num_labels: int, token_level: bool = False
) -> tuple[PreTrainedModel, EncoderAdapter]:
    """The HF model with the spec's head (sequence or token classification, causal or seq2seq LM)
    and its engine adapter."""
    head = spec.get("head", "classification")
    check_choice("backbone.head", head, tuple(HEADS))
    config = load_config(spec, num_labels)
    auto = AutoModelForTokenClassification if token_level and head == "classification" else HEADS[head]
    pretrained = resolve_location(spec.get("pretrained"))
    model = auto.from_config(config) if pretrained is None else auto.from_pretrained(pretrained, config=config)
    adapter = instantiate(spec["adapter"])(model)
    return model, adapter


def assert_same_backbone(
    checkpoint_hparams: Mapping[str, Any], spec: Mapping[str, Any], setting: str = "ckpt_path"
) -> None:
    """Refuse a checkpoint trained on another backbone, naming both."""
    saved = (checkpoint_hparams.get("backbone") or {}).get("name")
    if saved is not None and saved != spec.get("name"):
        raise ValueError(
            f"{setting} holds a '{saved}' checkpoint but backbone={spec.get('name')}; "
            f"run with backbone={saved} or pick a checkpoint of {spec.get('name')}"
        )
