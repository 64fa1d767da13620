"""The encoder: a transformers vision tower (SigLIP, SigLIP2, InternViT, CLIP, or any AutoModel vision tower) or a
timm vision transformer (DINOv2, InternViT-300M, EVA, ... through timm's intermediate-feature API) whose continuous
patch features (B, N, C) are both the understanding features and the input of the quantizer.

Built from `EncoderConfig.tower` with random weights (tests, presets), or from a local pretrained directory with
`load_pretrained_encoder` (the one place that reads pretrained weights: every tensor of the tower must be found).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, PretrainedConfig

from common.config import ConfigError
from common.weights import in_loaded_layout, load_exactly, read_state_dict
from tokenizer.config import EncoderConfig

log = logging.getLogger(__name__)

# Keys of a transformers config that describe where it came from, not what it is.
_NON_ARCH_KEYS = ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "id2label",
                  "label2id", "_attn_implementation_autoset", "output_hidden_states", "return_dict")


@dataclass(frozen=True)
class TowerFamily:
    """How to run one kind of transformers vision tower as a patch-feature encoder.

    Args:
        layers: dotted path of the tower's ModuleList of transformer layers.
        final_norm: dotted path of the norm the tower applies after its last layer, to `last_hidden_state` or (CLIP)
            to the pooled CLS token (None if none); VQRAE never applies it (features are hidden states, as LLaVA
            reads them), so it is replaced by an identity.
        prefix_tokens: tokens before the patch tokens in the output (a CLS token: 1).
        naflex: the tower takes flattened patches + `spatial_shapes` (SigLIP2 NaFlex) instead of an image.
        unused: dotted paths of modules VQRAE never runs (pooling heads), removed at build time.
    """

    layers: str
    final_norm: str | None = None
    prefix_tokens: int = 0
    naflex: bool = False
    unused: tuple[str, ...] = ()


FAMILIES: dict[str, TowerFamily] = {
    "siglip_vision_model": TowerFamily("encoder.layers", "post_layernorm", unused=("head",)),
    "siglip2_vision_model": TowerFamily("encoder.layers", "post_layernorm", naflex=True, unused=("head",)),
    "internvl_vision": TowerFamily("encoder.layer", "layernorm", prefix_tokens=1),
    "clip_vision_model": TowerFamily("encoder.layers", "post_layernorm", prefix_tokens=1),
}


TIMM = "timm"  # EncoderConfig.tower["model_type"] of a timm model
_TIMM_KEYS = ("model_type", "model_name", "image_size", "patch_size", "hidden_size")  # the rest: create_model kwargs


def create_timm_model(name: str, weights: str | Path | None, source: str, key: str, **kwargs: Any) -> nn.Module:
    """timm's `create_model(name, **kwargs)`, random or with `weights` (a local safetensors / .pth file read by timm's
    own loader: strictly, position embeddings resampled as timm does); never downloads. `key` names the model's config
    key and `source` the weights in the one-line errors."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"{key}: timm has no model {name!r}")
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{source} not found")
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": str(weights), "num_classes": 0}}
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:  # strict loading: missing / unexpected keys, or shapes
        raise ValueError(f"{source} does not fit {name} ({' '.join(str(e).split())[:400]})") from None


def timm_tower(cfg: EncoderConfig, weights: str | Path | None = None) -> nn.Module:
    """The timm model of `cfg.tower` ({"model_type": "timm", "model_name", "image_size", "patch_size", "hidden_size",
    + any timm `create_model` keyword}), random or with `weights` (see `create_timm_model`)."""
    name = cfg.tower.get("model_name")
    if not isinstance(name, str) or not name:
        raise ConfigError("encoder.tower of model_type 'timm' needs a 'model_name' (e.g. vit_base_patch14_dinov2)")
    kwargs = {k: v for k, v in cfg.tower.items() if k not in _TIMM_KEYS}
    model = create_timm_model(name, weights, f"timm weights file {weights}", "encoder.tower.model_name",
                              img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.hidden_size,
                              num_classes=0, **kwargs)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "prune_intermediate_layers"):
        raise ConfigError(f"timm model {name} has no intermediate-feature API (forward_intermediates)")
    return model


FLASH_DTYPES = (torch.float16, torch.bfloat16)  # flash-attn rejects fp32


def flash_attention_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attn_implementation(requested: str, dtype: torch.dtype) -> str:
    """The attention kernel for weights of `dtype`: 'auto' -> flash_attention_2 when the flash-attn package and a
    CUDA device exist and the weights are bf16 / fp16, else sdpa; anything else as asked."""
    if requested != "auto":
        return requested
    return "flash_attention_2" if dtype in FLASH_DTYPES and flash_attention_available() else "sdpa"


def set_attention(config: PretrainedConfig, requested: str, dtype: torch.dtype) -> None:
    """Point a transformers config (read by its attention layers at every forward) at the kernel for `dtype`."""
    config._attn_implementation = resolve_attn_implementation(requested, dtype)


def set_gradient_checkpointing(module: nn.Module, enable: bool = True) -> None:
    """Turn activation checkpointing on/off for every transformers layer (non-reentrant) and timm model inside
    `module`."""
    for sub in module.modules():
        if hasattr(sub, "gradient_checkpointing"):
            sub._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
            sub.gradient_checkpointing = enable
        elif hasattr(sub, "grad_checkpointing") and hasattr(sub, "set_grad_checkpointing"):  # a timm model
            sub.set_grad_checkpointing(enable)


def _get(module: nn.Module, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), module)


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


class DtypeAwareAttention(nn.Module):
    """A module of transformers layers whose attention kernel follows its weights' dtype: every dtype or device
    change (`.to`, `.bfloat16()`, DeepSpeed's conversion) calls `update_attention`, so "auto" picks flash-attention
    for bf16 weights on CUDA and never for fp32 ones."""

    def update_attention(self) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.update_attention()
        return self


def tower_config(cfg: EncoderConfig) -> PretrainedConfig:
    """The transformers config of the tower described by `cfg.tower`."""
    kwargs = {k: v for k, v in cfg.tower.items() if k != "model_type"}
    try:
        config = AutoConfig.for_model(cfg.model_type, **kwargs)
    except ValueError as e:
        raise ConfigError(f"encoder.tower: unknown transformers model_type {cfg.model_type!r}") from e
    set_attention(config, cfg.attn_implementation, torch.get_default_dtype())
    return config


def tower_dict(config: PretrainedConfig) -> dict[str, Any]:
    """The architecture-defining part of a transformers config, for `EncoderConfig.tower`."""
    out = {"model_type": config.model_type}
    out.update({k: v for k, v in config.to_diff_dict().items() if k not in _NON_ARCH_KEYS and k != "model_type"})
    for key in ("hidden_size", "patch_size", "image_size", "num_hidden_layers"):  # always explicit
        if hasattr(config, key):
            out[key] = getattr(config, key)
    return out


class VisionEncoder(DtypeAwareAttention):
    """Images in [-1, 1] (B, 3, H, W) -> continuous patch features (B, N, C).

    No `torch.no_grad` inside: stage 1 freezes the parameters from outside, stage 2 trains them.
    """

    def __init__(self, cfg: EncoderConfig, tower: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.timm_index: int | None = None
        if cfg.model_type == TIMM:
            self.tower = tower if tower is not None else timm_tower(cfg)
            depth = len(self.tower.blocks)
            if not -depth <= cfg.feature_layer <= -1:
                raise ConfigError(f"encoder.feature_layer must be in [-{depth}, -1] for this {depth}-block timm "
                                  f"model, got {cfg.feature_layer}")
            self.timm_index = depth + cfg.feature_layer  # the block whose output hidden_states[feature_layer] is
            self.tower.prune_intermediate_layers([self.timm_index], prune_norm=True, prune_head=True)
        else:
            self.tower = tower if tower is not None else AutoModel.from_config(tower_config(cfg))
        self.family = FAMILIES.get(cfg.model_type)
        self.patch_size = cfg.patch_size
        self.hidden_size = cfg.hidden_size
        if self.family is not None:
            self._prune(self.family)
        mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
        # x_tower = ((x + 1) / 2 - mean) / std = x * scale + shift
        self.register_buffer("scale", 0.5 / std, persistent=False)
        self.register_buffer("shift", (0.5 - mean) / std, persistent=False)

    def _prune(self, family: TowerFamily) -> None:
        """Drop the layers after `feature_layer`, the final norm and unused heads."""
        for path in family.unused:
            parent, _, name = path.rpartition(".")
            owner = _get(self.tower, parent) if parent else self.tower
            if hasattr(owner, name):
                delattr(owner, name)
                if hasattr(owner, "use_head"):
                    owner.use_head = False
        if family.final_norm is not None:
            _set(self.tower, family.final_norm, nn.Identity())
        if self.cfg.feature_layer != -1:
            layers = _get(self.tower, family.layers)
            keep = len(layers) + self.cfg.feature_layer + 1
            _set(self.tower, family.layers, nn.ModuleList(list(layers)[:keep]))

    def update_attention(self) -> None:
        """Re-pick the attention kernel for the tower's current dtype (timm models pick their own: SDPA)."""
        if self.timm_index is None:
            set_attention(self.tower.config, self.cfg.attn_implementation, next(self.tower.parameters()).dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Args: pixel_values (B, 3, H, W) in [-1, 1]. Returns: features (B, N, C), N = (H / p) * (W / p)."""
        x = pixel_values * self.scale.to(pixel_values.dtype) + self.shift.to(pixel_values.dtype)
        dtype = next(self.tower.parameters()).dtype
        x = x.to(dtype)
        if self.timm_index is not None:  # the block's output, prefix (class, register) tokens removed, no norm
            return self.tower.forward_intermediates(x, indices=[self.timm_index], norm=False, output_fmt="NLC",
                                                    intermediates_only=True)[0]
        if self.family is None:  # any other tower: read the requested hidden state
            hidden = self.tower(pixel_values=x, output_hidden_states=True).hidden_states[self.cfg.feature_layer]
            grid = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
            return hidden[:, hidden.shape[1] - grid :]
        if self.family.naflex:
            hidden = self.tower(**self._naflex_inputs(x)).last_hidden_state
        else:
            hidden = self.tower(pixel_values=x).last_hidden_state
        return hidden[:, self.family.prefix_tokens :]

    def _naflex_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """SigLIP2 NaFlex towers take (B, N, p*p*3) patches in (row, col, channel) order plus the grid shape."""
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)
        shapes = torch.tensor([[h // p, w // p]], device=x.device).expand(b, 2)
        mask = torch.ones(b, patches.shape[1], dtype=torch.long, device=x.device)
        return {"pixel_values": patches, "spatial_shapes": shapes, "pixel_attention_mask": mask}


def vision_config(path: str | Path) -> PretrainedConfig:
    """The vision tower's config in a local transformers directory (a dual encoder's or a VLM's `vision_config`)."""
    config = AutoConfig.from_pretrained(path)
    return getattr(config, "vision_config", None) or config


def saved_mean_std(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The image normalisation a checkpoint folder saves, in either of transformers' layouts: an image processor's
    preprocessor_config.json, or a whole processor's processor_config.json (its "image_processor" entry; what
    `SiglipProcessor.save_pretrained` writes alone in transformers 5); None when neither holds one."""
    for name, entry in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        file = path / name
        if file.is_file():
            data = json.loads(file.read_text())
            data = data.get(entry, {}) if entry else data
            if "image_mean" in data and "image_std" in data:
                return tuple(data["image_mean"]), tuple(data["image_std"])
    return None


def load_pretrained_encoder(path: str | Path, cfg: EncoderConfig | None = None) -> VisionEncoder:
    """Load a pretrained vision tower from a local directory, or for a timm `cfg` from a local weights file (never
    downloads; see `timm_tower`, normalisation from the timm model's pretrained config).

    The directory may hold a vision tower (e.g. SiglipVisionModel) or a model whose config has a `vision_config`
    (a SiglipModel / Siglip2Model / CLIPModel dual encoder, an InternVL or LLaVA checkpoint); only the vision weights
    are read, wherever they are stored (e.g. InternVL's "vision_tower." prefix). Every tensor of the tower must be in
    the checkpoint, with its shape; otherwise one ValueError names the missing ones. Normalisation comes from the
    directory's saved image processor when it has one (`saved_mean_std`).

    Args:
        path: local directory with config.json and weights (safetensors or pytorch_model.bin, possibly sharded).
        cfg: the encoder config whose `feature_layer` and `attn_implementation` to use (its `tower` is replaced by the
            directory's).
    """
    path = Path(path)
    cfg = EncoderConfig() if cfg is None else cfg
    if cfg.model_type == TIMM:
        tower = timm_tower(cfg, path)
        mean, std = (tuple(float(v) for v in tower.pretrained_cfg.get(k, d)) for k, d in
                     (("mean", cfg.image_mean), ("std", cfg.image_std)))
        log.info("loaded timm %s from %s", cfg.tower["model_name"], path)
        return VisionEncoder(dataclasses.replace(cfg, image_mean=mean, image_std=std), tower=tower)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"encoder weights directory {path} not found or has no config.json")
    vision = vision_config(path)
    mean_std = saved_mean_std(path) or (cfg.image_mean, cfg.image_std)
    loaded = EncoderConfig(
        tower=tower_dict(vision), feature_layer=cfg.feature_layer, image_mean=tuple(mean_std[0]),
        image_std=tuple(mean_std[1]), attn_implementation=cfg.attn_implementation,
    )
    tower = AutoModel.from_config(tower_config(loaded))
    source = f"encoder weights {path}"
    prefix = load_exactly(tower, in_loaded_layout(tower, read_state_dict(path), source), source, prefer="vision")
    log.info("loaded %s vision tower from %s (keys under %r)", vision.model_type, path, prefix)
    return VisionEncoder(loaded, tower=tower)
