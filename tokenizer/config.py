"""VQRAE configuration: dataclasses for encoder, quantizer and decoder, and the named presets.

A preset is a complete `VQRAEConfig`; an experiment overrides fields of it (strict: unknown keys are errors):

    cfg = get_preset("siglip2-so400m-p16-256")
    cfg = apply_overrides(cfg, ["quantizer.codebook_size=32768"])   # from common.config
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.config import ConfigError

SIGLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ----------------------------------------------------------------------------------------------------------------
# The VQRAE model config


@dataclass
class EncoderConfig:
    """The vision foundation model whose continuous features are the tokenizer's latent.

    Args:
        tower: a transformers config as a dict with its `model_type` (e.g. "siglip_vision_model",
            "siglip2_vision_model", "internvl_vision", or any AutoModel vision tower); or a timm model:
            {"model_type": "timm", "model_name", "image_size", "patch_size", "hidden_size", + timm create_model
            keywords}. Built with random weights, or read from a pretrained directory (a timm model: a weights
            file) by `tokenizer.encoder.load_pretrained_encoder`.
        feature_layer: which hidden state is the feature, as transformers' LLaVA `vision_feature_layer` reads it:
            hidden_states[feature_layer], the residual stream after that layer, never the tower's final norm; -1
            the last layer's output, -k (k >= 2) the k-th layer's from the end (LLaVA uses -2). The layers after it
            are removed from the model.
        image_mean, image_std: the tower's input normalisation (applied to images in [0, 1]).
        attn_implementation: "auto" (flash_attention_2 when the flash-attn package and a GPU are present, else
            sdpa), "sdpa", "flash_attention_2" or "eager".
    """

    tower: dict[str, Any] = field(default_factory=dict)
    feature_layer: int = -1
    image_mean: tuple[float, float, float] = SIGLIP_MEAN_STD[0]
    image_std: tuple[float, float, float] = SIGLIP_MEAN_STD[1]
    attn_implementation: str = "auto"

    @property
    def model_type(self) -> str:
        return self.tower.get("model_type", "")

    def _tower_int(self, key: str) -> int:
        value = self.tower.get(key)
        if isinstance(value, (list, tuple)):
            value = value[0]
        if not isinstance(value, int):
            raise ConfigError(f"encoder.tower needs an integer '{key}' (got {value!r})")
        return value

    @property
    def hidden_size(self) -> int:
        return self._tower_int("hidden_size")

    @property
    def patch_size(self) -> int:
        return self._tower_int("patch_size")

    @property
    def image_size(self) -> int:
        if self.model_type == "siglip2_vision_model":  # NaFlex towers have a patch budget instead of a size
            return self.patch_size * round(self._tower_int("num_patches") ** 0.5)
        return self._tower_int("image_size")


@dataclass
class QuantizerConfig:
    """SimVQ: features -> linear to `codebook_dim` -> nearest row of C W (C frozen, W learned).

    Args:
        codebook_size: K, the number of codes.
        codebook_dim: D, the code dimension (the paper: >= the encoder width; 1536 for SigLIP2-so400m).
        beta: weight of the commitment term ||sg(z_q) - z||^2.
        search_budget_mb: memory for one chunk of the (rows x K) fp32 distance matrix in nearest-code search.
    """

    codebook_size: int = 16384
    codebook_dim: int = 1536
    beta: float = 0.25
    search_budget_mb: int = 64


@dataclass
class DecoderConfig:
    """A ViT mirroring the encoder: bottleneck projection, transformer layers, linear pixel head, unpatchify.

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: transformer shape.
        patch_size: output pixels per token side; 0 means the encoder's patch size (output = input resolution).
        hidden_act, layer_norm_eps: as in the SigLIP layers the decoder is built from.
    """

    hidden_size: int = 1152
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 0
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6


@dataclass
class VQRAEConfig:
    """The whole tokenizer. Pixel range of inputs and decoded images: [-1, 1]."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def grid_size(self) -> int:
        """Tokens per image side."""
        return self.encoder.image_size // self.encoder.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def output_patch_size(self) -> int:
        return self.decoder.patch_size or self.encoder.patch_size

    def validate(self) -> None:
        if not self.encoder.model_type:
            raise ConfigError("encoder.tower needs a 'model_type' (e.g. 'siglip_vision_model')")
        if self.encoder.image_size % self.encoder.patch_size:
            raise ConfigError(
                f"encoder image size {self.encoder.image_size} is not divisible by patch size {self.encoder.patch_size}"
            )
        depth = None if self.encoder.model_type == "timm" else self.encoder._tower_int("num_hidden_layers")
        if self.encoder.feature_layer >= 0 or (depth is not None and self.encoder.feature_layer < -depth):
            raise ConfigError(f"encoder.feature_layer must be in [-num_layers, -1], got {self.encoder.feature_layer}")
        if self.decoder.hidden_size % self.decoder.num_attention_heads:
            raise ConfigError("decoder.hidden_size must be divisible by decoder.num_attention_heads")
        if self.quantizer.codebook_size < 2 or self.quantizer.codebook_dim < 1:
            raise ConfigError("quantizer.codebook_size must be >= 2 and quantizer.codebook_dim >= 1")
        if self.encoder.attn_implementation not in ("auto", "sdpa", "flash_attention_2", "eager"):
            raise ConfigError(f"unknown encoder.attn_implementation {self.encoder.attn_implementation!r}")


def _siglip_tower(hidden: int, layers: int, heads: int, mlp: int, patch: int, image: int) -> dict[str, Any]:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": mlp,
        "patch_size": patch,
        "image_size": image,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "vision_use_head": False,
    }


def _so400m(image: int) -> VQRAEConfig:
    return VQRAEConfig(
        encoder=EncoderConfig(tower=_siglip_tower(1152, 27, 16, 4304, 16, image)),
        quantizer=QuantizerConfig(codebook_size=16384, codebook_dim=1536),
        decoder=DecoderConfig(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304),
    )


def _internvit_300m() -> VQRAEConfig:
    tower = {
        "model_type": "internvl_vision",
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "patch_size": 14,
        "image_size": 448,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "use_mean_pooling": False,
    }
    return VQRAEConfig(
        encoder=EncoderConfig(tower=tower, image_mean=IMAGENET_MEAN_STD[0], image_std=IMAGENET_MEAN_STD[1]),
        quantizer=QuantizerConfig(codebook_size=16384, codebook_dim=1536),
        decoder=DecoderConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
            hidden_act="gelu", layer_norm_eps=1e-6,
        ),
    )


def _timm_vit(name: str, hidden: int, layers: int, heads: int, patch: int, image: int, **tower: Any) -> VQRAEConfig:
    """A timm ViT as the encoder (weights from a local file: `model.encoder_path=/ckpt/<name>.safetensors`), the
    decoder mirroring it, the paper's codebook."""
    return VQRAEConfig(
        encoder=EncoderConfig(tower={"model_type": "timm", "model_name": name, "hidden_size": hidden,
                                     "patch_size": patch, "image_size": image, **tower},
                              image_mean=IMAGENET_MEAN_STD[0], image_std=IMAGENET_MEAN_STD[1]),
        quantizer=QuantizerConfig(codebook_size=16384, codebook_dim=1536),
        decoder=DecoderConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                              intermediate_size=4 * hidden, hidden_act="gelu", layer_norm_eps=1e-6),
    )


def _tiny() -> VQRAEConfig:
    return VQRAEConfig(
        encoder=EncoderConfig(tower=_siglip_tower(64, 2, 4, 256, 8, 64)),
        quantizer=QuantizerConfig(codebook_size=512, codebook_dim=128),
        decoder=DecoderConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    )


def _tiny_p4_32() -> VQRAEConfig:
    """The CPU default: `tiny` at 32 px with 4 px patches (still 8 x 8 tokens), whose reconstructions of the shapes
    world keep shapes legible to its exact detector far sooner than 8 px patches at 64 px do."""
    cfg = _tiny()
    cfg.encoder.tower.update(patch_size=4, image_size=32)
    return cfg


PRESETS: dict[str, Callable[[], VQRAEConfig]] = {
    "siglip2-so400m-p16-256": lambda: _so400m(256),
    "siglip2-so400m-p16-512": lambda: _so400m(512),
    "internvit-300m-p14-448": _internvit_300m,
    "timm-dinov2-b14-224": lambda: _timm_vit("vit_base_patch14_dinov2", 768, 12, 12, 14, 224),
    "timm-dinov2-b14-reg4-224": lambda: _timm_vit("vit_base_patch14_reg4_dinov2", 768, 12, 12, 14, 224),
    "timm-internvit-300m-p14-448": lambda: _timm_vit("vit_intern300m_patch14_448", 1024, 24, 16, 14, 448),
    "tiny": _tiny,
    "tiny-p4-32": _tiny_p4_32,
}


def get_preset(name: str) -> VQRAEConfig:
    """A fresh copy of a named preset config."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name]())
