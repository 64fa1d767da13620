"""The VQRAE tokenizer: config + presets, encoder, SimVQ quantizer, ViT decoder, model."""

from tokenizer.config import (
    PRESETS,
    ConfigError,
    DecoderConfig,
    EncoderConfig,
    QuantizerConfig,
    VQRAEConfig,
    apply_overrides,
    from_dict,
    get_preset,
    to_dict,
)
from tokenizer.model import VQRAE, VQRAEEncoding, VQRAEOutput

__all__ = [
    "PRESETS",
    "VQRAE",
    "ConfigError",
    "DecoderConfig",
    "EncoderConfig",
    "QuantizerConfig",
    "VQRAEConfig",
    "VQRAEEncoding",
    "VQRAEOutput",
    "apply_overrides",
    "from_dict",
    "get_preset",
    "to_dict",
]
