"""The prunable-encoder engine shared by every method."""

from tokenprune.engine.adapters import BertFamilyAdapter, DistilBertAdapter, EncoderAdapter, LayerParts
from tokenprune.engine.encoder import PrunableEncoder
from tokenprune.engine.state import EncoderOutput, LayerTrace, TokenState

__all__ = [
    "BertFamilyAdapter",
    "DistilBertAdapter",
    "EncoderAdapter",
    "EncoderOutput",
    "LayerParts",
    "LayerTrace",
    "PrunableEncoder",
    "TokenState",
]
