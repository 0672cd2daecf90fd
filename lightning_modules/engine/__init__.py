"""The prunable-encoder engine shared by every method."""
from lightning_modules.engine.adapters import BertFamilyAdapter, DistilBertAdapter, EncoderAdapter, LayerParts
from lightning_modules.engine.encoder import PrunableEncoder
from lightning_modules.engine.state import EncoderOutput, LayerTrace, TokenState

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
