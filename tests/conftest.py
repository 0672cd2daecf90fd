"""Shared fixtures: random-weight tiny models of each adapter family (no hub needed)."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)

from tokenprune.engine import (
    BertFamilyAdapter,
    DistilBertAdapter,
    EncoderAdapter,
    GPT2Adapter,
    MobileBertAdapter,
    T5EncoderAdapter,
)

# MobileBERT: hidden 32 around a 16-wide bottleneck (Q/K from the shared bottleneck), 2 stacked FFNs.
# Its NoNorm does not normalise: at the default initializer_range (0.02) every activation is ~1e-4 and
# a 1e-5 tolerance would test nothing; 0.15 keeps hidden states and logits of order 0.1-1.
MOBILEBERT = {
    "embedding_size": 16,
    "intra_bottleneck_size": 16,
    "num_feedforward_networks": 2,
    "initializer_range": 0.15,
}

FAMILIES = {
    "bert": (BertFamilyAdapter, {}),
    "roberta": (BertFamilyAdapter, {}),
    "electra": (BertFamilyAdapter, {"embedding_size": 16}),
    "distilbert": (DistilBertAdapter, {}),
    "mobilebert": (MobileBertAdapter, MOBILEBERT),
}


def tiny_model(
    family: str, attn: str = "sdpa", num_labels: int = 3, layers: int = 3, **overrides
) -> tuple[PreTrainedModel, EncoderAdapter]:
    """A random-weight 3-layer, 4-head, hidden-32 model of `family` with a classification head;
    `overrides`: further config fields."""
    adapter_cls, family_sizes = FAMILIES[family]
    extra = {**family_sizes, **overrides}
    if family == "distilbert":
        sizes = {"dim": 32, "n_layers": layers, "n_heads": 4, "hidden_dim": 64}
    else:
        sizes = {"hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 4, "intermediate_size": 64}
    config = AutoConfig.for_model(
        family, vocab_size=120, max_position_embeddings=80, num_labels=num_labels, **sizes, **extra
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn).eval()
    return model, adapter_cls(model)


def tiny_gpt2(attn: str = "sdpa", layers: int = 3) -> tuple[PreTrainedModel, GPT2Adapter]:
    """A random-weight GPT-2 LM: 4 heads, hidden 32, vocab 120, 64 positions."""
    config = AutoConfig.for_model(
        "gpt2", vocab_size=120, n_positions=64, n_embd=32, n_layer=layers, n_head=4, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    return model, GPT2Adapter(model)


def tiny_t5(attn: str = "sdpa", **overrides) -> tuple[PreTrainedModel, T5EncoderAdapter]:
    """A random-weight T5 seq2seq model: 2+2 layers, 4 heads, d_model 32, d_kv 8, d_ff 64, vocab 120."""
    sizes = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, **overrides}
    config = AutoConfig.for_model("t5", vocab_size=120, decoder_start_token_id=0, pad_token_id=0, **sizes)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config, attn_implementation=attn).eval()
    return model, T5EncoderAdapter(model)


def random_batch(batch: int = 4, length: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids >= 5 (no special ids) with ragged padding: row b has length - 5*b real tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, max(length - 5 * row, 1) :] = 0
    return ids, mask


# The files whose tests run longest (real sweeps, a SLURM cluster, DDP, CLI multiruns): collected
# first, so that `make test`'s workers (pytest-xdist, one file per worker at a time) start them
# first instead of ending on them.
LONGEST_FIRST = (
    "test_sweeps.py",
    "test_slurm.py",
    "test_train_app.py",
    "test_table.py",
    "test_ddp.py",
    "test_token_head.py",
    "test_length_adaptive.py",
    "test_ltp.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file order kept


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its share of the cores for in-process torch work, so
    that the workers do not oversubscribe them (the apps' subprocesses set their own threads)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The apps set torch's thread count for the whole process (tokenprune-bench and -search
    their `threads`, -train when `threads` is set) and leave it so: each test ends with the
    count it started with, so that no test passes or fails on another's setting."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
