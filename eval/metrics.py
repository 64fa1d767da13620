"""Reconstruction metrics: PSNR, SSIM (scikit-image's definition, batched in torch), Frechet distance with a
mergeable feature accumulator, the FID Inception-v3 feature extractor (local weights only) and codebook usage.

    stats_real, stats_fake = FeatureStats(2048), FeatureStats(2048)
    inception = InceptionFeatureExtractor.from_file("pt_inception-2015-12-05-6726825d.pth", device)
    stats_real.update(inception(to_uint8(x)))        # x: (B, 3, H, W) in [-1, 1]
    stats_fake.update(inception(to_uint8(x_rec)))
    rfid = frechet_distance(*stats_real.mean_cov(), *stats_fake.mean_cov())
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.files import atomic_write
from tokenizer.quantizer import perplexity as code_perplexity

# ----------------------------------------------------------------------------------------------------------------
# PSNR and SSIM


def _as_batch(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if a.shape != b.shape or a.dim() not in (3, 4):
        raise ValueError(f"{name}: expected two (C, H, W) or (B, C, H, W) tensors of one shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    single = a.dim() == 3
    return (a[None] if single else a), (b[None] if single else b), single


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10 * log10(data_range^2 / MSE), computed in float64.

    Args:
        a: images (B, C, H, W) or (C, H, W), e.g. in [0, 1].
        b: images of the same shape.
        data_range: the value range of the images (1.0 for [0, 1]).

    Returns:
        (B,) float64 tensor (a 0-dim tensor for unbatched input); identical images give inf.
    """
    a, b, single = _as_batch(a, b, "psnr")
    mse = (a.double() - b.double()).square().flatten(1).mean(1)  # (B,)
    out = 10.0 * torch.log10(data_range**2 / mse)
    return out[0] if single else out


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> torch.Tensor:
    """Mean structural similarity per image, equal to `skimage.metrics.structural_similarity(x, y,
    channel_axis=-1, data_range=data_range)` with its defaults: a 7x7 uniform window, K1 = 0.01, K2 = 0.03,
    sample covariances (N / (N - 1)), the border of (win_size - 1) / 2 cropped, channels averaged.

    Computed in float64; only windows that lie fully inside the image are averaged, so no padding is needed.

    Args:
        a: images (B, C, H, W) or (C, H, W), e.g. in [0, 1].
        b: images of the same shape.
        data_range: the value range of the images (1.0 for [0, 1]; LlamaGen passes 2.0).
        win_size: the odd window side.

    Returns:
        (B,) float64 tensor (a 0-dim tensor for unbatched input).
    """
    a, b, single = _as_batch(a, b, "ssim")
    if win_size % 2 == 0 or min(a.shape[-2:]) < win_size:
        raise ValueError(f"ssim: win_size must be odd and at most the image side, got {win_size} for "
                         f"{tuple(a.shape[-2:])}")
    x, y = a.double(), b.double()
    n = win_size * win_size
    cov_norm = n / (n - 1)

    def mean(t: torch.Tensor) -> torch.Tensor:  # window means over the valid region: (B, C, H - w + 1, W - w + 1)
        return F.avg_pool2d(t, win_size, stride=1)

    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    out = s.mean(dim=(2, 3)).mean(dim=1)  # (B,)
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance


def _float64_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), in float64.

    Tr sqrtm(S1 S2) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    sqrt(S1) S2 sqrt(S1), which is stable even for singular covariances (no offset retries, no complex parts).

    Args:
        mu1: (D,) mean of the first feature set.
        sigma1: (D, D) covariance of the first feature set.
        mu2: (D,) mean of the second feature set.
        sigma2: (D, D) covariance of the second feature set.
    """
    mu1, mu2, s1, s2 = (_float64_numpy(t) for t in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape} do not match")
    evals, evecs = np.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


class FeatureStats:
    """Running sum, outer-product sum and count of feature vectors (float64); merge across ranks by summing.

    Args:
        dim: the feature dimension.
        device: where the accumulators live (a CUDA device for NCCL all-reduce).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features.

        Args:
            features: (N, dim).
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"FeatureStats: expected (N, {self.dim}) features, got {tuple(features.shape)}")
        f = features.detach().to(self.sum.device, torch.float64)  # (N, D)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]

    def merge(self, other: FeatureStats) -> None:
        """Add another accumulator's features to this one.

        Args:
            other: an accumulator of the same dimension.
        """
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats: cannot merge dim {other.dim} into dim {self.dim}")
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.sum.device)
        self.count += other.count

    def all_reduce(self) -> None:
        """Sum the accumulators over all ranks of the default process group (no-op when not distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        for t in (self.sum, self.outer, count):
            torch.distributed.all_reduce(t)
        self.count = int(count.item())

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (D,), unbiased covariance (D, D)) as float64 numpy arrays, like `np.cov(features, rowvar=False)`."""
        if self.count < 2:
            raise ValueError(f"FeatureStats: need at least 2 features for a covariance, have {self.count}")
        mu = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu().numpy(), cov.cpu().numpy()

    def save_npz(self, path: str | Path) -> None:
        """Write mu, sigma (the pytorch-fid .npz keys) and count, atomically.

        Args:
            path: the .npz file.
        """
        mu, sigma = self.mean_cov()
        with atomic_write(path, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, count=self.count)


def load_fid_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid style .npz file.

    Args:
        path: the .npz file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics file not found: {path}")
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {sorted(data.files)}")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


# ----------------------------------------------------------------------------------------------------------------
# Inception-v3 features

INCEPTION_PREPROCESSING = ("pytorch-fid", "torch-fidelity")


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x `resize_bilinear(align_corners=False)`: source coordinate dst * in / out (no half-pixel
    shift), as torch-fidelity reproduces it.

    Args:
        x: (B, C, H, W) float.
        size: the output side.
    """
    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = src.long()
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).to(x.dtype)

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top = x[:, :, ylo][..., xlo] + (x[:, :, ylo][..., xhi] - x[:, :, ylo][..., xlo]) * dx
    bottom = x[:, :, yhi][..., xlo] + (x[:, :, yhi][..., xhi] - x[:, :, yhi][..., xlo]) * dx
    return top + (bottom - top) * dy[:, None]


def build_fid_inception() -> nn.Module:
    """The FID Inception-v3 (TensorFlow 2015-12-05 graph ported by pytorch-fid), randomly initialised.

    Its state dict has the keys of pt_inception-2015-12-05-6726825d.pth (also torch-fidelity's weights file).
    """
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


def _is_torchscript(path: str | Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


class InceptionFeatureExtractor(nn.Module):
    """2048-d pool features of the FID Inception-v3 from uint8 images (B, 3, H, W).

    Preprocessing "pytorch-fid": x / 255, torch bilinear resize to 299, 2x - 1 (pytorch-fid's `InceptionV3`).
    "torch-fidelity": TensorFlow-1 bilinear resize to 299, (x - 128) / 128 (torch-fidelity's extractor).
    Both use the same weights file; report which one produced the features.

    Args:
        preprocessing: one of INCEPTION_PREPROCESSING.
    """

    def __init__(self, preprocessing: str = "pytorch-fid"):
        super().__init__()
        if preprocessing not in INCEPTION_PREPROCESSING:
            raise ValueError(f"InceptionFeatureExtractor: unknown preprocessing {preprocessing!r}, "
                             f"expected one of {INCEPTION_PREPROCESSING}")
        self.preprocessing = preprocessing
        self.net = build_fid_inception()
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(
        cls, path: str | Path, device: torch.device | str = "cpu", preprocessing: str = "pytorch-fid"
    ) -> InceptionFeatureExtractor:
        """Load pt_inception-2015-12-05-*.pth (pytorch-fid) or weights-inception-2015-12-05-*.pth (torch-fidelity).

        Args:
            path: the local weights file (nothing is downloaded).
            device: where the network runs.
            preprocessing: one of INCEPTION_PREPROCESSING.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights not found: {path} (expected pytorch-fid's "
                                    f"pt_inception-2015-12-05-6726825d.pth)")
        if _is_torchscript(path):
            raise ValueError(f"{path} is a TorchScript archive (like clean-fid's inception-2015-12-05.pt); expected "
                             f"pytorch-fid's state dict pt_inception-2015-12-05-6726825d.pth")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as err:
            reason = (str(err).splitlines() or [""])[0]
            raise ValueError(f"cannot read Inception weights {path} as a state dict: {reason}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        model = cls(preprocessing)
        expected = set(model.net.state_dict())
        found = set(state) if isinstance(state, dict) else set()
        if found != expected:
            missing, unexpected = sorted(expected - found), sorted(found - expected)
            raise ValueError(f"{path} is not an FID Inception-v3 state dict: {len(missing)} missing keys "
                             f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
        model.net.load_state_dict(state)
        return model.to(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pool features (B, 2048) float32.

        Args:
            images: uint8 (B, 3, H, W).
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionFeatureExtractor: expected uint8 (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        x = images.to(next(self.parameters()).device, torch.float32)
        if self.preprocessing == "pytorch-fid":
            x = F.interpolate(x / 255.0, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        else:
            x = (resize_bilinear_tf1(x, 299) - 128) / 128
        net = self.net  # (B, 3, 299, 299)
        for layer in (net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1,
                      net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, net.maxpool2,
                      net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
                      net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c):
            x = layer(x)
        return x.mean(dim=(2, 3))  # (B, 2048)


# ----------------------------------------------------------------------------------------------------------------
# Codebook usage


class CodeUsage:
    """How often each of K codes was used; mergeable across ranks by summing counts.

    Args:
        num_codes: the codebook size K.
        device: where the counts live (a CUDA device for NCCL all-reduce).
    """

    def __init__(self, num_codes: int, device: torch.device | str = "cpu"):
        self.num_codes = num_codes
        self.counts = torch.zeros(num_codes, dtype=torch.int64, device=device)

    def update(self, indices: torch.Tensor) -> None:
        """Count a batch of code indices of any shape.

        Args:
            indices: integer tensor with values in [0, K).
        """
        flat = indices.detach().flatten().to(self.counts.device, torch.int64)
        if flat.numel() == 0:
            return
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= self.num_codes:
            raise ValueError(f"CodeUsage: indices must lie in [0, {self.num_codes}), got range [{low}, {high}]")
        self.counts += torch.bincount(flat, minlength=self.num_codes)

    def merge(self, other: CodeUsage) -> None:
        """Add another accumulator's counts.

        Args:
            other: an accumulator of the same size.
        """
        if other.num_codes != self.num_codes:
            raise ValueError(f"CodeUsage: cannot merge {other.num_codes} codes into {self.num_codes}")
        self.counts += other.counts.to(self.counts.device)

    def all_reduce(self) -> None:
        """Sum the counts over all ranks of the default process group (no-op when not distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.counts)

    def utilisation(self) -> float:
        """Fraction of codes used at least once."""
        return (self.counts > 0).sum().item() / self.num_codes

    def perplexity(self) -> float:
        """exp(entropy): the effective number of codes (K for uniform use); 1.0 before any update."""
        return float(code_perplexity(self.counts.double()))

    def entropy(self) -> float:
        """Entropy (nats) of the usage distribution; 0.0 before any update."""
        return math.log(self.perplexity())

    def summary(self) -> dict[str, float]:
        """{"utilisation", "perplexity", "entropy", "tokens"} for logging."""
        return {"utilisation": self.utilisation(), "perplexity": self.perplexity(), "entropy": self.entropy(),
                "tokens": float(self.counts.sum().item())}
