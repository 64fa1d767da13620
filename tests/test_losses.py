"""Tokenizer losses: adaptive GAN weight from activations equals the parameter gradient, LPIPS backbone and head loading,
hinge / LeCAM / distillation formulas, PatchGAN shapes."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from tokenizer import VQRAE, get_preset
from tokenizer.decoder import unpatchify
from tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from tokenizer.losses import (
    adaptive_gan_weight,
    build_lpips,
    distillation_loss,
    hinge_d_loss,
    hinge_g_loss,
    last_layer_grad_norm,
    lecam_loss,
    patchify,
)


def test_patchify_inverts_unpatchify():
    x = torch.randn(2, 64, 8 * 8 * 3)
    assert torch.equal(patchify(unpatchify(x, 8, 8), 8), x)


def test_last_layer_grad_norm_equals_parameter_gradient():
    torch.manual_seed(0)
    model = VQRAE(get_preset("tiny"))
    disc = PatchDiscriminator(DiscriminatorConfig(channels=16, num_layers=2))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = model(x)
    rec_loss = F.mse_loss(out.reconstruction, x)
    gan_loss = hinge_g_loss(disc(out.reconstruction))
    head = model.decoder.head.weight
    for loss in (rec_loss, gan_loss):
        (direct,) = torch.autograd.grad(loss, head, retain_graph=True)
        ours = last_layer_grad_norm(loss, out.reconstruction, out.decoder_states, patch=8)
        torch.testing.assert_close(ours, direct.norm(), rtol=1e-5, atol=1e-8)
    g_rec = torch.autograd.grad(rec_loss, head, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(gan_loss, head, retain_graph=True)[0].norm()
    for target in (0.5, 3.0):  # the GAN loss scaled so that the ratio lies inside the clamp, below and above 1
        scale = (g_rec / g_gan / target).item()
        weight = adaptive_gan_weight(rec_loss, gan_loss * scale, out.reconstruction, out.decoder_states, 8)
        torch.testing.assert_close(weight, g_rec / (g_gan * scale + 1e-6), rtol=1e-5, atol=1e-8)
        assert weight.item() == pytest.approx(target, rel=1e-3)
        assert not weight.requires_grad
    tiny_gan = gan_loss * 1e-12  # a vanishing GAN gradient: the weight stops at the clamp (default 1e4, RAE's)
    assert adaptive_gan_weight(rec_loss, tiny_gan, out.reconstruction, out.decoder_states, 8).item() == 1e4
    assert adaptive_gan_weight(rec_loss, tiny_gan, out.reconstruction, out.decoder_states, 8, 7.0) == 7.0


def test_hinge_lecam_distill_formulas():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    ema_r, ema_f = torch.tensor(0.3), torch.tensor(-0.2)
    expected = ((real - ema_f).relu() ** 2).mean() + ((ema_r - fake).relu() ** 2).mean()
    assert lecam_loss(real, fake, ema_r, ema_f).item() == pytest.approx(expected.item())
    s, t = torch.randn(2, 5, 7, requires_grad=True), torch.randn(2, 5, 7, requires_grad=True)
    loss = distillation_loss(s, t)
    assert loss.item() == pytest.approx(((s - t) ** 2).mean().item())
    loss.backward()
    assert t.grad is None  # the teacher gets no gradient


def test_lpips_loads_torchvision_vgg_file(tmp_path, capsys):
    import lpips as lpips_package

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    capsys.readouterr()
    lpips = build_lpips(tmp_path / "vgg16.pth")
    assert capsys.readouterr().out == ""  # silent: scripts print JSON on stdout
    backbone = dict(lpips.net.named_parameters())  # "sliceK.N.weight" holds torchvision's features.N.weight
    assert len(backbone) == len(list(vgg.features.parameters())) == 26
    for name, param in backbone.items():
        assert torch.equal(param, vgg.features.get_parameter(name.split(".", 1)[1])), name
    shipped = torch.load(Path(lpips_package.__file__).parent / "weights/v0.1/vgg.pth", map_location="cpu",
                         weights_only=True)
    heads = lpips.state_dict()  # the five linear heads are the package's trained ones
    assert len(shipped) == 5 and all(torch.equal(heads[k], shipped[k]) for k in shipped)
    assert not any(p.requires_grad for p in lpips.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).abs().max().item() < 1e-6
    assert (lpips(x, -x) > 0).all()
    with pytest.raises(FileNotFoundError, match="LPIPS needs VGG16 weights"):
        build_lpips(None)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_lpips(tmp_path / "missing.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="neither a torchvision vgg16 nor an LPIPS"):
        build_lpips(tmp_path / "bad.pth")
    state = vgg.state_dict()
    reordered = {k: state[k] for k in sorted(state, key=lambda k: not k.startswith("classifier"))}
    torch.save(reordered, tmp_path / "reordered.pth")  # key order is no part of the format
    assert all(torch.equal(a, b) for a, b in zip(build_lpips(tmp_path / "reordered.pth").net.parameters(),
                                                 lpips.net.parameters()))
    torch.save({k: v for k, v in state.items() if k != "features.12.bias"}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="features|slice3.12.bias"):  # a missing tensor is refused, never random
        build_lpips(tmp_path / "partial.pth")
    torch.save({"features.0.weight": torch.zeros(1), "code": Path("x")}, tmp_path / "pickle.pth")
    with pytest.raises(pickle.UnpicklingError):  # tensors only: the file is never unpickled in full
        build_lpips(tmp_path / "pickle.pth")


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_patch_discriminator_shapes(norm):
    d = PatchDiscriminator(DiscriminatorConfig(channels=16, num_layers=3, norm=norm))
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="unknown discriminator norm"):
        PatchDiscriminator(DiscriminatorConfig(norm="layer"))
