"""Symmetric ViT pixel decoder (VQRAE section 4.2.3, RAE-style).

quantized (B, N, D) -> bottleneck Linear(D, d) + positions -> SigLIP transformer layers -> LayerNorm
-> Linear(d, p*p*3) -> unpatchify -> image (B, 3, H, W) in [-1, 1]
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from tokenizer.config import DecoderConfig
from tokenizer.encoder import DtypeAwareAttention, set_attention


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position table (grid*grid, dim), half the channels for rows, half for columns."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.flatten()[:, None] * omega[None]  # (N, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(ys), embed(xs)], dim=1).float()  # (N, dim)


def unpatchify(patches: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """(B, grid*grid, patch*patch*3) in (row, col, channel) order -> (B, 3, grid*patch, grid*patch)."""
    b = patches.shape[0]
    x = patches.reshape(b, grid, grid, patch, patch, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, grid * patch, grid * patch)


class LearnedPositions(nn.Module):
    """Adds a learned (grid*grid, d) position table initialised to 2D sin-cos. A module of its own, so every
    parameter is used inside the forward of the module that owns it (what ZeRO-3's gathering hooks need)."""

    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.table = nn.Parameter(sincos_2d(grid, dim)[None])  # (1, N, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table.to(x.dtype)


class ViTDecoder(DtypeAwareAttention):
    """Pixel decoder over a grid x grid token map."""

    def __init__(self, cfg: DecoderConfig, in_dim: int, grid: int, patch_size: int, attn_implementation: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.grid = grid
        self.patch_size = patch_size
        d = cfg.hidden_size
        layer_cfg = SiglipVisionConfig(
            hidden_size=d,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            hidden_act=cfg.hidden_act,
            layer_norm_eps=cfg.layer_norm_eps,
        )
        self.attn_implementation = attn_implementation
        set_attention(layer_cfg, attn_implementation, torch.get_default_dtype())
        self.embed = nn.Linear(in_dim, d)  # bottleneck projection
        self.pos_embed = LearnedPositions(grid, d)
        self.layers = SiglipEncoder(layer_cfg)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(d, patch_size * patch_size * 3)
        self.apply(_init_weights)
        nn.init.zeros_(self.head.bias)

    def update_attention(self) -> None:
        """Re-pick the attention kernel for the layers' current dtype."""
        set_attention(self.layers.config, self.attn_implementation, self.embed.weight.dtype)

    def forward_features(self, z: torch.Tensor) -> torch.Tensor:
        """Args: z (B, N, D) quantized vectors, N = grid*grid. Returns: normalised states (B, N, d) fed to the head."""
        x = self.pos_embed(self.embed(z))  # (B, N, d)
        x = self.layers(inputs_embeds=x).last_hidden_state  # (B, N, d)
        return self.norm(x)

    def forward_head(self, states: torch.Tensor) -> torch.Tensor:
        """Args: states (B, N, d). Returns: images (B, 3, grid*p, grid*p)."""
        return unpatchify(self.head(states), self.grid, self.patch_size)  # head: (B, N, p*p*3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(z))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
