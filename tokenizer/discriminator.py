"""The discriminators of the tokenizer's GAN term (hinge losses, adaptive weight and LeCAM in tokenizer/objective.py):

- "patchgan": pix2pix / taming-transformers' NLayerDiscriminator. Resolution-agnostic and cheap, so it runs on the
  CPU default and at 256-512 px.
- "dino": RAE's: a frozen DINO ViT (timm, local weights) whose tokens at several blocks feed small trainable heads;
  DiffAugment (colour, translation, cutout) on real and fake inputs alike, fake images rounded to the uint8 grid
  first (straight-through, so the generator's gradient passes) as RAE does.

`build_discriminator(cfg)` makes either; `requires_grad_` of the DINO one never unfreezes its backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError

KINDS = ("patchgan", "dino")


@dataclass
class DiscriminatorConfig:
    """Args:
        kind: "patchgan" or "dino" (see the module docstring).
        channels: PatchGAN: width of the first conv. num_layers: strided conv layers (receptive field 70 px at 3).
        norm: PatchGAN: "batch" (taming) or "group" (batch-size independent, safer for small per-GPU batches).
        dino_model: the timm model of the DINO backbone; dino_path: its local weights file (required for "dino";
            empty only with dino_random, for tests). dino_image_size: images are resized to this before it.
        dino_blocks: the blocks whose output tokens feed a head each (RAE: four, spread over the depth).
        dino_overrides: timm create_model keywords (e.g. a tiny depth for tests).
        diffaug: DiffAugment policy, comma-separated of color, translation, cutout ("" = none).
    """

    kind: str = "patchgan"
    channels: int = 64
    num_layers: int = 3
    norm: str = "group"
    dino_model: str = "vit_small_patch8_224"
    dino_path: str = ""
    dino_random: bool = False
    dino_image_size: int = 224
    dino_blocks: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    dino_overrides: dict = field(default_factory=dict)
    diffaug: str = "color,translation,cutout"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"disc.kind must be one of {KINDS}, got {self.kind!r}")
        unknown = {p for p in self.diffaug.split(",") if p} - set(AUGMENTS)
        if unknown:
            raise ConfigError(f"disc.diffaug: unknown policies {sorted(unknown)} (known: {', '.join(AUGMENTS)})")
        if self.kind == "dino" and not self.dino_path and not self.dino_random:
            raise ConfigError("disc.kind=dino needs disc.dino_path (local weights of the DINO ViT, e.g. "
                              "the timm vit_small_patch8_224.dino weights as a .safetensors file)")


def _norm(kind: str, channels: int) -> nn.Module:
    norms = {"batch": lambda: nn.BatchNorm2d(channels), "group": lambda: nn.GroupNorm(32 if channels >= 32 else 1,
                                                                                       channels)}
    if kind not in norms:
        raise ValueError(f"unknown discriminator norm {kind!r} (known: {', '.join(norms)})")
    return norms[kind]()


class PatchDiscriminator(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> patch logits (B, 1, H', W')."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        c = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(3, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, cfg.num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < cfg.num_layers else 1
            layers += [
                nn.Conv2d(c * prev, c * mult, 4, stride=stride, padding=1, bias=False),
                _norm(cfg.norm, c * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(c * mult, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------- RAE's DINO one


def _color(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    x = x + (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gy = (gy[None] + dy + 1).clamp(0, h + 1)
    gx = (gx[None] + dx + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])  # zeros outside: shifted-in pixels are blank
    return padded[torch.arange(b, device=x.device)[:, None, None], :, gy, gx].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    ox = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    top, left = oy - ch // 2, ox - cw // 2  # a ch x cw square from (top, left), cut where it leaves the image
    inside = (gy[None] >= top) & (gy[None] < top + ch) & (gx[None] >= left) & (gx[None] < left + cw)
    return x * (~inside)[:, None].to(x.dtype)


AUGMENTS = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020): differentiable random colour / translation / cutout, drawn per image."""
    for name in (p for p in policy.split(",") if p):
        x = AUGMENTS[name](x)
    return x


def round_to_uint8_grid(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] rounded to the values a uint8 image can hold, with the identity's gradient."""
    grid = ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    return x + (grid - x).detach()


class DinoDiscriminator(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> token logits (B, len(dino_blocks) * N) of a frozen DINO ViT's heads."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        from tokenizer.encoder import create_timm_model

        self.backbone = create_timm_model(
            cfg.dino_model, cfg.dino_path or None, f"disc.dino_path={cfg.dino_path}", "disc.dino_model",
            img_size=cfg.dino_image_size, num_classes=0, **cfg.dino_overrides).eval().requires_grad_(False)
        depth = len(self.backbone.blocks)
        if not cfg.dino_blocks or any(not 0 <= i < depth for i in cfg.dino_blocks):
            raise ConfigError(f"disc.dino_blocks must be block indices in [0, {depth}), got {cfg.dino_blocks}")
        self.blocks, self.size, self.policy = sorted(set(cfg.dino_blocks)), cfg.dino_image_size, cfg.diffaug
        width = self.backbone.embed_dim
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                                 nn.Linear(width, 1)) for _ in self.blocks)
        mean, std = self.backbone.pretrained_cfg["mean"], self.backbone.pretrained_cfg["std"]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def requires_grad_(self, requires_grad: bool = True) -> DinoDiscriminator:
        super().requires_grad_(requires_grad)
        self.backbone.requires_grad_(False)  # the backbone stays frozen whatever the trainer toggles
        return self

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = diff_augment(round_to_uint8_grid(images), self.policy) if self.training else round_to_uint8_grid(images)
        x = F.interpolate((x + 1) / 2, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        tokens = self.backbone.forward_intermediates(x, indices=self.blocks, norm=False, output_fmt="NLC",
                                                     intermediates_only=True)
        return torch.cat([head(t).flatten(1) for head, t in zip(self.heads, tokens)], dim=1)


def build_discriminator(cfg: DiscriminatorConfig) -> nn.Module:
    """The discriminator `cfg.kind` names."""
    return DinoDiscriminator(cfg) if cfg.kind == "dino" else PatchDiscriminator(cfg)
