"""The tokenizer's objective (tokenizer/objective.py) against the paper's formula, term by term, with the real tiny
VQRAE, the real LPIPS module (random VGG backbone) and the real PatchGAN discriminator."""

import copy

import pytest
import torch
import torch.nn.functional as F

from common.config import ConfigError
from tokenizer.config import get_preset
from tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from tokenizer.losses import build_lpips
from tokenizer.model import VQRAE
from tokenizer.objective import LeCAMState, LossConfig, discriminator_loss, generator_loss

PATCH = 8


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = VQRAE(get_preset("tiny"))
    teacher = copy.deepcopy(model.encoder).requires_grad_(False).eval()
    with torch.no_grad():  # the student moves away from its teacher, as after stage 2's first steps
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    disc = PatchDiscriminator(DiscriminatorConfig(channels=16, num_layers=2))
    return model, teacher, disc, build_lpips(None, allow_random=True)


def images(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def head_grad_norm(loss, model) -> torch.Tensor:
    return torch.autograd.grad(loss, model.decoder.head.weight, retain_graph=True)[0].norm()


def test_recipe_defaults():
    """The VGT recipe (specs/recipes.md): L2 x1, LPIPS x1.1, GAN x0.1 from step 30k, LeCAM 0.001, distill 0.1; the
    adaptive weight clamped to [0, 1e4] as RAE's; LeCAM's running means start at 0."""
    cfg = LossConfig()
    assert cfg.adaptive_max == 1e4 and (LeCAMState().real, LeCAMState().fake) == (0.0, 0.0)
    assert (cfg.l2_weight, cfg.lpips_weight, cfg.gan_weight, cfg.gan_start, cfg.disc_start) == (1, 1.1, 0.1, 30000,
                                                                                               30000)
    assert (cfg.lecam_weight, cfg.lecam_decay, cfg.distill_weight, cfg.adaptive_gan) == (0.001, 0.999, 0.1, True)
    assert cfg.allow_random_lpips is False  # a random VGG only when asked for (CPU demos)


@pytest.mark.parametrize("override", [{"gan_weight": -0.1}, {"lpips_weight": float("nan")}, {"distill_weight": -1.0},
                                      {"lecam_weight": -1e-3}, {"lecam_decay": 1.0}, {"lecam_decay": 1.5},
                                      {"lecam_decay": -0.5}])
def test_negative_weights_and_decays_outside_0_1_are_refused(override):
    with pytest.raises(ConfigError, match=f"loss.{next(iter(override))} must be"):
        LossConfig(**override)
    assert LossConfig(lecam_decay=0.0, gan_weight=0.0).lecam_decay == 0.0  # the bounds: 0 is allowed, 1 is not


def test_stage1_before_the_gan_is_reconstruction_plus_vq(parts):
    model, _, disc, lpips = parts
    x = images()
    out = model(x)
    cfg = LossConfig(l2_weight=0.7, lpips_weight=1.3, gan_start=10)
    loss, terms = generator_loss(cfg, out, x, 9, lpips, None, disc, PATCH)
    l2 = ((out.reconstruction - x) ** 2).mean()
    perceptual = lpips(out.reconstruction, x).mean()
    assert set(terms) == {"l2", "lpips", "vq"}
    torch.testing.assert_close(terms["l2"], l2)
    assert torch.equal(terms["lpips"], perceptual)  # fp32 unless bf16=True
    torch.testing.assert_close(loss, 0.7 * l2 + 1.3 * perceptual + out.vq_loss)
    _, small = generator_loss(LossConfig(lpips_weight=0.5, gan_start=10), out, x, 9, lpips, None, disc, PATCH)
    torch.testing.assert_close(small["lpips"], perceptual)  # any positive weight computes the term
    loss0, terms0 = generator_loss(LossConfig(lpips_weight=0.0, gan_start=10), out, x, 9, None, None, None, PATCH)
    assert set(terms0) == {"l2", "vq"}
    torch.testing.assert_close(loss0, l2 + out.vq_loss)
    _, bf16 = generator_loss(cfg, out, x, 9, lpips, None, disc, PATCH, bf16=True)
    assert not torch.equal(bf16["lpips"], perceptual)
    torch.testing.assert_close(bf16["lpips"], perceptual, rtol=0.05, atol=0.01)


def test_gan_term_enters_at_gan_start_with_the_adaptive_weight(parts):
    model, _, disc, lpips = parts
    x = images()
    out = model(x)
    cfg = LossConfig(gan_start=10, gan_weight=0.4)
    loss, terms = generator_loss(cfg, out, x, 10, lpips, None, disc, PATCH)
    rec_loss = ((out.reconstruction - x) ** 2).mean() + 1.1 * lpips(out.reconstruction, x).mean()
    g_adv = -disc(out.reconstruction).mean()
    weight = (head_grad_norm(rec_loss, model) / (head_grad_norm(g_adv, model) + 1e-6)).clamp(0, 1e4)
    assert set(terms) == {"l2", "lpips", "vq", "g_adv", "gan_weight"}
    torch.testing.assert_close(terms["g_adv"], g_adv)
    torch.testing.assert_close(terms["gan_weight"], weight, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(loss, rec_loss + out.vq_loss + 0.4 * weight * g_adv, rtol=1e-5, atol=1e-6)
    assert 1e-3 < float(weight) < 1e4  # an interior value: the clamp did not decide it
    # the weight is a constant of the backward pass: the gradient is that of the loss with the number in its place
    (ours,) = torch.autograd.grad(loss, out.reconstruction, retain_graph=True)
    (fixed,) = torch.autograd.grad(rec_loss + out.vq_loss + 0.4 * float(weight) * g_adv, out.reconstruction,
                                   retain_graph=True)
    torch.testing.assert_close(ours, fixed, rtol=1e-4, atol=1e-9)

    _, clamped = generator_loss(LossConfig(gan_start=0, adaptive_max=1e-3), out, x, 0, lpips, None, disc, PATCH)
    torch.testing.assert_close(clamped["gan_weight"], torch.tensor(1e-3))
    loss_fixed, plain = generator_loss(LossConfig(gan_start=0, gan_weight=0.4, adaptive_gan=False), out, x, 0, lpips,
                                       None, disc, PATCH)
    assert float(plain["gan_weight"]) == 1.0
    torch.testing.assert_close(loss_fixed, rec_loss + out.vq_loss + 0.4 * g_adv, rtol=1e-5, atol=1e-6)
    _, off = generator_loss(LossConfig(gan_start=0, gan_weight=0.0), out, x, 5, lpips, None, None, PATCH)
    assert "g_adv" not in off  # gan_weight 0: no discriminator needed, no term
    _, later = generator_loss(cfg, out, x, 13, lpips, None, disc, PATCH)
    assert "g_adv" in later  # and it stays after gan_start


def test_stage2_distills_to_the_frozen_teacher_only_through_the_student(parts):
    model, teacher, disc, lpips = parts
    x = images()
    out = model(x)
    cfg = LossConfig(distill_weight=0.3, gan_start=10**6)
    loss, terms = generator_loss(cfg, out, x, 0, lpips, teacher, disc, PATCH)
    with torch.no_grad():
        target = teacher(x)
    distill = ((out.features - target) ** 2).mean()
    assert float(distill.detach()) > 0
    torch.testing.assert_close(terms["distill"], distill)
    base, _ = generator_loss(cfg, out, x, 0, lpips, None, disc, PATCH)
    torch.testing.assert_close(loss, base + 0.3 * distill)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    model.zero_grad(set_to_none=True)


def test_discriminator_hinge_plus_lecam_against_the_running_means(parts):
    model, _, disc, _ = parts
    x = images()
    rec = model(x).reconstruction
    cfg = LossConfig(lecam_weight=0.5, lecam_decay=0.9)
    state = LeCAMState(real=0.3, fake=-0.2)
    loss, terms = discriminator_loss(cfg, disc, x, rec, state)
    real, fake = disc(x), disc(rec.detach())
    hinge = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    lecam = F.relu(real - (-0.2)).pow(2).mean() + F.relu(0.3 - fake).pow(2).mean()
    torch.testing.assert_close(loss, hinge + 0.5 * lecam)
    torch.testing.assert_close(terms["d_loss"], hinge)
    torch.testing.assert_close(terms["logits_real"], real.mean())
    torch.testing.assert_close(terms["logits_fake"], fake.mean())
    assert not any(t.requires_grad for t in terms.values())
    assert state.real == pytest.approx(0.9 * 0.3 + 0.1 * float(real.mean()))
    assert state.fake == pytest.approx(0.9 * -0.2 + 0.1 * float(fake.mean()))
    loss.backward()
    assert all(p.grad is None for p in model.parameters())  # the reconstruction is detached
    assert all(p.grad is not None for p in disc.parameters())
    disc.zero_grad(set_to_none=True)
    before = LeCAMState(real=0.3, fake=-0.2)
    plain, _ = discriminator_loss(LossConfig(lecam_weight=0.0), disc, x, rec, before)
    torch.testing.assert_close(plain, hinge)
    assert (before.real, before.fake) == (0.3, -0.2)  # no LeCAM: the means stay
