"""RAE's DINO discriminator: a frozen timm DINO ViT with trainable heads; DiffAugment; uint8 rounding; the heads
train, the backbone never does, the generator's gradient passes through; and a trainer run with it under ZeRO-2."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from common.config import ConfigError
from tests.test_train_tokenizer import args, train, world  # noqa: F401  (world: a fixture)
from tokenizer.discriminator import (
    DinoDiscriminator,
    DiscriminatorConfig,
    build_discriminator,
    diff_augment,
    round_to_uint8_grid,
)
from tokenizer.losses import hinge_d_loss, hinge_g_loss

TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2}


def tiny_cfg(**kw) -> DiscriminatorConfig:
    fields = {"kind": "dino", "dino_random": True, "dino_image_size": 32, "dino_blocks": [1, 3], "dino_overrides": TINY}
    return DiscriminatorConfig(**{**fields, **kw})


def test_heads_train_and_the_backbone_never_does():
    torch.manual_seed(0)
    disc = build_discriminator(tiny_cfg())
    assert isinstance(disc, DinoDiscriminator)
    disc.requires_grad_(True).train()  # what the trainer does before its step
    assert not any(p.requires_grad for p in disc.backbone.parameters())
    assert all(p.requires_grad for p in disc.heads.parameters()) and not disc.backbone.training
    backbone = {k: v.clone() for k, v in disc.backbone.state_dict().items()}
    heads = {k: v.clone() for k, v in disc.heads.state_dict().items()}
    opt = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=1e-3)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    fake = torch.zeros(4, 3, 32, 32)
    first = None
    for _ in range(20):
        loss = hinge_d_loss(disc(real), disc(fake))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert all(torch.equal(v, disc.backbone.state_dict()[k]) for k, v in backbone.items())
    assert any(not torch.equal(v, disc.heads.state_dict()[k]) for k, v in heads.items())


def test_the_generators_gradient_passes_through_the_frozen_backbone():
    torch.manual_seed(0)
    disc = build_discriminator(tiny_cfg()).requires_grad_(False).train()
    generator = torch.nn.Conv2d(3, 3, 3, padding=1)
    fake = torch.tanh(generator(torch.rand(2, 3, 32, 32)))
    hinge_g_loss(disc(fake)).backward()
    assert generator.weight.grad is not None and generator.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())


def test_uint8_rounding_and_diffaugment():
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    rounded = round_to_uint8_grid(x)
    u8 = (rounded + 1) * 127.5
    assert torch.allclose(u8, u8.round(), atol=1e-4) and (rounded - x).abs().max() <= 1 / 255 + 1e-6
    rounded.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through
    torch.manual_seed(0)
    y = torch.rand(8, 3, 16, 16, requires_grad=True)
    out = diff_augment(y, "color,translation,cutout")
    assert out.shape == y.shape and not torch.equal(out[0] - y[0], out[1] - y[1])  # drawn per image
    out.sum().backward()
    assert y.grad is not None and torch.equal(diff_augment(y, ""), y)
    disc = build_discriminator(tiny_cfg()).eval()  # no augmentation at eval, only the rounding
    images = torch.rand(2, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.equal(disc(images), disc(round_to_uint8_grid(images)))
        assert disc(images).shape == (2, 2 * 16)  # two heads x 4 x 4 tokens (ViT-S/8 at 32 px)


def diffaugment_reference(x: torch.Tensor, policy: str) -> torch.Tensor:
    """DiffAugment as its authors' PyTorch code computes it (mit-han-lab/data-efficient-gans, DiffAugment_pytorch.py),
    followed step by step: the same draws in the same order, the translation as a gather from a 1-pixel zero-padded
    copy, the cutout as a mask written at clamped indices."""
    b, _, h, w = x.shape
    for name in policy.split(","):
        if name == "color":
            x = x + (torch.rand(b, 1, 1, 1) - 0.5)
            x = (x - x.mean(dim=1, keepdim=True)) * (torch.rand(b, 1, 1, 1) * 2) + x.mean(dim=1, keepdim=True)
            mean = x.mean(dim=[1, 2, 3], keepdim=True)
            x = (x - mean) * (torch.rand(b, 1, 1, 1) + 0.5) + mean
        elif name == "translation":
            sx, sy = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
            tx = torch.randint(-sx, sx + 1, size=[b, 1, 1])
            ty = torch.randint(-sy, sy + 1, size=[b, 1, 1])
            gb, gx, gy = torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(w), indexing="ij")
            gx = torch.clamp(gx + tx + 1, 0, h + 1)
            gy = torch.clamp(gy + ty + 1, 0, w + 1)
            x = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0]).permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)
        elif name == "cutout":
            size = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
            ox = torch.randint(0, h + (1 - size[0] % 2), size=[b, 1, 1])
            oy = torch.randint(0, w + (1 - size[1] % 2), size=[b, 1, 1])
            gb, gx, gy = torch.meshgrid(torch.arange(b), torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
            gx = torch.clamp(gx + ox - size[0] // 2, min=0, max=h - 1)
            gy = torch.clamp(gy + oy - size[1] // 2, min=0, max=w - 1)
            mask = torch.ones(b, h, w)
            mask[gb, gx, gy] = 0
            x = x * mask.unsqueeze(1)
    return x


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
@pytest.mark.parametrize("size", [(16, 16), (15, 20)])
def test_diff_augment_is_diffaugments_own_computation(policy, size):
    x = torch.rand(64, 3, *size) * 2 - 1
    torch.manual_seed(7)
    ours = diff_augment(x, policy)
    torch.manual_seed(7)
    assert torch.allclose(ours, diffaugment_reference(x, policy), atol=1e-6)
    if policy == "cutout":  # every image loses part of a square; one well inside loses all of it
        lost = (ours == 0).all(1).flatten(1).sum(1)
        assert lost.min() > 0 and lost.max() == ((size[0] + 1) // 2) * ((size[1] + 1) // 2)


def test_refusals():
    with pytest.raises(ConfigError, match="disc.kind"):
        DiscriminatorConfig(kind="stylegan")
    with pytest.raises(ConfigError, match="needs disc.dino_path"):
        DiscriminatorConfig(kind="dino")
    with pytest.raises(ConfigError, match="unknown policies"):
        DiscriminatorConfig(diffaug="color,flip")
    with pytest.raises(ConfigError, match="dino_blocks must be block indices in \\[0, 4\\)"):
        build_discriminator(tiny_cfg(dino_blocks=[4]))
    with pytest.raises(FileNotFoundError, match="dino_path=.* not found"):
        build_discriminator(DiscriminatorConfig(kind="dino", dino_path="/nonexistent.safetensors"))


def test_a_tokenizer_run_with_the_dino_discriminator_under_zero2(world, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    model = timm.create_model(DiscriminatorConfig().dino_model, pretrained=False, img_size=32, num_classes=0, **TINY)
    weights = tmp_path / "dino-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "run"
    train(*args(world, out, "run.steps=4", "deepspeed.zero_stage=2", "loss.gan_start=2", "loss.disc_start=1",
                "disc.kind=dino", f"disc.dino_path={weights}", "disc.dino_image_size=32", "disc.dino_blocks=[1, 3]",
                "disc.dino_overrides={depth: 4, embed_dim: 32, num_heads: 2}"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and "d_loss" in rows[-1] and "gan_weight" in rows[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
