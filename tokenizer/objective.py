"""The tokenizer's training objective assembled from `tokenizer.losses`: its weights (`LossConfig`), the generator
side (reconstruction + VQ + adaptive GAN [+ distillation in stage 2]) and the discriminator side (hinge + LeCAM).

    loss, parts = generator_loss(cfg, model(x), x, step, lpips, teacher, disc, patch)
    d_loss, d_parts = discriminator_loss(cfg, disc, x, reconstruction, lecam_state)

Pure functions of tensors and modules: the trainer and the step benchmark call the very same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError
from tokenizer.losses import adaptive_gan_weight, distillation_loss, hinge_d_loss, hinge_g_loss, lecam_loss
from tokenizer.model import VQRAEOutput


@dataclass
class LossConfig:
    """Weights and schedule of the tokenizer loss (defaults: the VGT recipe; see specs/recipes.md).

    Args:
        l2_weight, lpips_weight: reconstruction terms. lpips_vgg_path: a local torchvision VGG16 file;
            allow_random_lpips: train with a random VGG (CPU demos only).
        gan_weight: lambda_G; adaptive_gan: scale it by ||grad rec|| / ||grad gan|| on the decoder's last layer,
            clamped to adaptive_max. disc_start / gan_start: steps from which the discriminator trains / the GAN
            term enters the generator loss.
        lecam_weight, lecam_decay: the LeCAM regulariser and the decay of its running means.
        distill_weight: lambda_d of stage 2's self-distillation ||E(X) - T(X)||^2.
    """

    l2_weight: float = 1.0
    lpips_weight: float = 1.1
    lpips_vgg_path: str = ""
    allow_random_lpips: bool = False
    gan_weight: float = 0.1
    adaptive_gan: bool = True
    adaptive_max: float = 1e4
    disc_start: int = 30000
    gan_start: int = 30000
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    distill_weight: float = 0.1

    def __post_init__(self) -> None:
        weights = ("l2_weight", "lpips_weight", "gan_weight", "lecam_weight", "distill_weight", "adaptive_max")
        negative = [name for name in weights if not getattr(self, name) >= 0]  # also refuses nan
        if negative:
            raise ConfigError(f"loss.{', loss.'.join(negative)} must be >= 0")
        if not 0 <= self.lecam_decay < 1:
            raise ConfigError(f"loss.lecam_decay must be in [0, 1), got {self.lecam_decay}")


class LeCAMState:
    """Running means of the discriminator's real / fake logits (LeCAM's anchors)."""

    def __init__(self, real: float = 0.0, fake: float = 0.0):
        self.real, self.fake = real, fake

    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, decay: float) -> None:
        self.real = decay * self.real + (1 - decay) * logits_real.float().mean().item()
        self.fake = decay * self.fake + (1 - decay) * logits_fake.float().mean().item()


def generator_loss(cfg: LossConfig, out: VQRAEOutput, x: torch.Tensor, step: int, lpips: nn.Module | None,
                   teacher: nn.Module | None, disc: nn.Module | None, patch: int, bf16: bool = False
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator-side loss and its parts.

    Args:
        cfg: the loss weights. out: the VQRAE forward of `x`. x: the images (B, 3, H, W) in [-1, 1].
        step: the optimizer step (the GAN term enters at cfg.gan_start).
        lpips: the LPIPS module (None when cfg.lpips_weight is 0).
        teacher: stage 2's frozen encoder copy T (None in stage 1).
        disc: the discriminator module (not its engine: no engine backward hooks), None without GAN.
        patch: the decoder's output patch size (for the adaptive GAN weight).
        bf16: run LPIPS under bf16 autocast.
    """
    rec = out.reconstruction
    parts = {"l2": F.mse_loss(rec.float(), x.float())}
    rec_loss = cfg.l2_weight * parts["l2"]
    if cfg.lpips_weight > 0:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            parts["lpips"] = lpips(rec.float(), x.float()).float().mean()
        rec_loss = rec_loss + cfg.lpips_weight * parts["lpips"]
    loss = rec_loss + out.vq_loss
    parts["vq"] = out.vq_loss
    if teacher is not None:
        with torch.no_grad():
            target = teacher(x)
        parts["distill"] = distillation_loss(out.features, target)
        loss = loss + cfg.distill_weight * parts["distill"]
    if cfg.gan_weight > 0 and step >= cfg.gan_start:
        parts["g_adv"] = hinge_g_loss(disc(rec))
        weight = torch.tensor(1.0, device=x.device)
        if cfg.adaptive_gan:
            weight = adaptive_gan_weight(rec_loss, parts["g_adv"], rec, out.decoder_states, patch, cfg.adaptive_max)
        parts["gan_weight"] = weight
        loss = loss + cfg.gan_weight * weight * parts["g_adv"]
    return loss, parts


def discriminator_loss(cfg: LossConfig, disc: nn.Module, x: torch.Tensor, rec: torch.Tensor, state: LeCAMState
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinge loss of the discriminator on real images and detached reconstructions, plus LeCAM against the running
    means in `state` (updated here); returns (loss, logged parts)."""
    logits_real, logits_fake = disc(x), disc(rec.detach())
    loss = hinge_d_loss(logits_real, logits_fake)
    parts = {"d_loss": loss.detach(), "logits_real": logits_real.float().mean().detach(),
             "logits_fake": logits_fake.float().mean().detach()}
    if cfg.lecam_weight > 0:
        ema_real, ema_fake = (torch.tensor(v, device=x.device) for v in (state.real, state.fake))
        loss = loss + cfg.lecam_weight * lecam_loss(logits_real, logits_fake, ema_real, ema_fake)
        state.update(logits_real, logits_fake, cfg.lecam_decay)
    return loss, parts
