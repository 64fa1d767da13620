"""The VQRAE tokenizer: config + presets, encoder, SimVQ quantizer, ViT decoder, model, losses."""

from tokenizer.config import (
    PRESETS,
    DecoderConfig,
    EncoderConfig,
    QuantizerConfig,
    VQRAEConfig,
    get_preset,
)
from tokenizer.model import VQRAE, VQRAEEncoding, VQRAEOutput

__all__ = [
    "PRESETS",
    "VQRAE",
    "DecoderConfig",
    "EncoderConfig",
    "QuantizerConfig",
    "VQRAEConfig",
    "VQRAEEncoding",
    "VQRAEOutput",
    "get_preset",
]
