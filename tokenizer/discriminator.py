"""PatchGAN discriminator (pix2pix / taming-transformers NLayerDiscriminator), used by the GAN term of the
tokenizer loss with hinge losses. Resolution-agnostic and cheap, so it runs on the CPU default and at 256-512 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DiscriminatorConfig:
    """Args: channels: width of the first conv; num_layers: strided conv layers (receptive field 70 px at 3);
    norm: "batch" (taming) or "group" (batch-size independent, safer for small per-GPU batches)."""

    channels: int = 64
    num_layers: int = 3
    norm: str = "group"


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
