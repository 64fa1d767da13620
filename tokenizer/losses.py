"""Tokenizer training losses, as pure functions the trainer calls (each returns tensors; nothing logs).

Stage 1:  L2 + w_lpips * LPIPS + lambda_G * adaptive * GAN + VQ
Stage 2:  the same + lambda_d * ||E(X) - T(X)||^2 (T: a frozen copy of the encoder taken at the start of stage 2)
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def build_lpips(vgg_path: str | Path | None, allow_random: bool = False) -> nn.Module:
    """LPIPS-VGG (the `lpips` package) with its VGG16 backbone read from a local file; frozen, eval mode.

    Args:
        vgg_path: a torchvision VGG16 state dict (keys `features.N.*`, e.g. vgg16-397923af.pth) or a full LPIPS
            state dict (keys `net.sliceK.N.*`). The linear heads ship with the lpips package.
        allow_random: permit a randomly initialised backbone when `vgg_path` is None (perceptual loss then carries
            little meaning; for CPU demos only).
    """
    import lpips  # imports torchvision; kept local so the model package does not need it

    if vgg_path is None and not allow_random:
        raise FileNotFoundError(
            "LPIPS needs VGG16 weights: set loss.lpips_vgg_path to a local torchvision vgg16 .pth "
            "(or loss.allow_random_lpips=true to train with a random backbone)"
        )
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument internally
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if vgg_path is not None:
        path = Path(vgg_path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS VGG16 weights file {path} not found")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.net.load_state_dict(_lpips_backbone_state(state, model.net, path), strict=True)
    else:
        log.warning("LPIPS uses a RANDOM VGG16 backbone (loss.allow_random_lpips=true): perceptual loss is not "
                    "meaningful; give loss.lpips_vgg_path for real training")
    model.eval().requires_grad_(False)
    return model


def _lpips_backbone_state(state: dict[str, torch.Tensor], backbone: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Map a torchvision vgg16 or LPIPS state dict onto lpips' sliced VGG backbone, whose slices keep torchvision's
    layer numbers (`sliceK.N.weight` is `features.N.weight`); a tensor the file lacks is left for the strict load to
    name."""
    if any(k.startswith("net.slice") for k in state):
        return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.slice")}
    if not any(k.startswith("features.") for k in state):
        raise ValueError(f"{path} holds neither a torchvision vgg16 nor an LPIPS state dict")
    torchvision_keys = {key: "features." + key.split(".", 1)[1] for key in backbone.state_dict()}
    return {key: state[source] for key, source in torchvision_keys.items() if source in state}


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))), halved."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean(D(G(z)))."""
    return -logits_fake.float().mean()


def lecam_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: torch.Tensor,
               ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCAM regulariser: ||relu(D(x) - ema_fake)||^2 + ||relu(ema_real - D(G(z)))||^2 (means)."""
    return (F.relu(logits_real.float() - ema_fake).pow(2).mean()
            + F.relu(ema_real - logits_fake.float()).pow(2).mean())


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, g*p, g*p) -> (B, g*g, p*p*3) in (row, col, channel) order; the inverse of decoder.unpatchify."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def last_layer_grad_norm(loss: torch.Tensor, images: torch.Tensor, head_input: torch.Tensor, patch: int) -> torch.Tensor:
    """||d loss / d W_head||_F for the decoder's pixel head y = h W^T + b, from activations only.

    d loss / d W = sum over tokens of (d loss / d y)^T h, and y is the patchified image, so the gradient needs no
    parameter access: safe under ZeRO-3, where W is partitioned.

    Args:
        loss: scalar; images: (B, 3, H, W) decoder output in the graph of `loss`; head_input: (B, N, d) the
        normalised decoder states fed to the head; patch: the decoder's output patch size.
    """
    (grad_images,) = torch.autograd.grad(loss, images, retain_graph=True)
    grad_y = patchify(grad_images, patch).float()  # (B, N, p*p*3)
    grad_w = torch.einsum("bno,bni->oi", grad_y, head_input.detach().float())  # (p*p*3, d)
    return grad_w.norm()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, images: torch.Tensor,
                        head_input: torch.Tensor, patch: int, max_weight: float = 1e4) -> torch.Tensor:
    """||grad rec|| / (||grad gan|| + 1e-6) on the decoder's last layer, clamped to [0, max_weight], detached."""
    rec_norm = last_layer_grad_norm(rec_loss, images, head_input, patch)
    gan_norm = last_layer_grad_norm(gan_loss, images, head_input, patch)
    return (rec_norm / (gan_norm + 1e-6)).clamp(0.0, max_weight).detach()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Self-distillation ||E(X) - T(X)||^2 (mean over elements) on continuous features (B, N, C)."""
    return F.mse_loss(student.float(), teacher.detach().float())
