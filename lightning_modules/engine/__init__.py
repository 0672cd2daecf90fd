"""The prunable-encoder engine shared by every method."""

from tokenprune.engine.adapters import (
    BertFamilyAdapter,
    DistilBertAdapter,
    EncoderAdapter,
    GPT2Adapter,
    LayerParts,
    MobileBertAdapter,
    Projection,
    T5EncoderAdapter,
)
from tokenprune.engine.encoder import PrunableEncoder
from tokenprune.engine.state import EncoderOutput, LayerTrace, TokenState

__all__ = [
    "BertFamilyAdapter",
    "DistilBertAdapter",
    "EncoderAdapter",
    "EncoderOutput",
    "GPT2Adapter",
    "LayerParts",
    "LayerTrace",
    "MobileBertAdapter",
    "PrunableEncoder",
    "Projection",
    "T5EncoderAdapter",
    "TokenState",
]
