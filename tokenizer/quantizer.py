"""SimVQ vector quantizer with a high-dimensional codebook (VQRAE section 4.2.2).

features (B, N, C) --in_proj--> z (B, N, D) --nearest row of C W--> indices (B, N) --> z_q = (C W)[indices]

C (K x D) is a frozen random codebook (init N(0, D^-0.5)); W (D x D) is learned, so the effective codebook C W moves
as a whole and every code stays in use. Decoding indices always goes through C W.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.config import QuantizerConfig

AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def code_scores(z: torch.Tensor, codebook_t: torch.Tensor, e_sq: torch.Tensor) -> torch.Tensor:
    """||e_k||^2 - 2 z_i.e_k for a block of rows, (M, K) fp32: the squared distance minus ||z_i||^2, which is
    constant along a row, so its argmin is the nearest code. One fused matmul-add.

    Args:
        z: (M, D) rows; codebook_t: (D, K) the codebook transposed; e_sq: (K,) = ||e||^2.
    """
    return torch.addmm(e_sq, z, codebook_t, beta=1.0, alpha=-2.0)


def nearest_code_full(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Reference nearest-code search that holds the whole (M, K) score matrix. Args: z (M, D), codebook (K, D)."""
    codebook = codebook.float()
    return code_scores(z.float(), codebook.t(), codebook.pow(2).sum(1)).argmin(1)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which ops on `device` run in their inputs' dtype even inside an autocast region."""
    if device.type in AUTOCAST_DEVICES:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. the meta device: no autocast exists there


@torch.no_grad()
def nearest_code(z: torch.Tensor, codebook: torch.Tensor, budget_mb: int = 64) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for every row of z, in fp32 (also under an active autocast),
    a block of rows at a time so that the score block never exceeds `budget_mb`. Returns the same indices as
    `nearest_code_full`.

    Args:
        z: (M, D) vectors; codebook: (K, D); budget_mb: memory for one (rows, K) fp32 block.
    Returns:
        (M,) int64 indices.
    """
    z, codebook = z.float(), codebook.float()
    m, k = z.shape[0], codebook.shape[0]
    rows = max(1, min(m, (budget_mb << 20) // (4 * k)))
    out = torch.empty(m, dtype=torch.long, device=z.device)
    with no_autocast(z.device):  # autocast would run the addmm in bf16
        codebook_t, e_sq = codebook.t(), codebook.pow(2).sum(1)  # (D, K), (K,)
        for start in range(0, m, rows):
            out[start : start + rows] = code_scores(z[start : start + rows], codebook_t, e_sq).argmin(1)
    return out


@dataclass
class QuantizerOutput:
    """Args:
    quantized: (B, N, D) z_q in the forward pass; gradients reach z through the straight-through estimator.
    indices: (B, N) int64 code indices.
    loss: scalar beta * ||sg(z_q) - z||^2 + ||z_q - sg(z)||^2.
    metrics: detached scalars: commitment, codebook, code_usage (fraction of codes hit in this batch),
        code_perplexity (exp of the entropy of this batch's code histogram).
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class SimVQ(nn.Module):
    """SimVQ quantizer: frozen codebook C, learned linear W, nearest neighbour in C W."""

    def __init__(self, cfg: QuantizerConfig, in_dim: int):
        super().__init__()
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.codebook_dim
        self.in_proj = nn.Linear(in_dim, d)
        # A direct (frozen) parameter of this module, so ZeRO-3 gathers it whenever this module runs.
        self.codebook = nn.Parameter(torch.randn(k, d) * d**-0.5, requires_grad=False)  # C (K, D)
        self.codebook_proj = nn.Linear(d, d, bias=False)  # W
        nn.init.eye_(self.codebook_proj.weight)  # C W starts as C
        self.register_buffer("code_hits", torch.zeros(k, dtype=torch.long), persistent=False)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def effective_codebook(self) -> torch.Tensor:
        """C W, (K, D), in the parameters' dtype (never downcast by an active autocast)."""
        with no_autocast(self.codebook.device):
            return self.codebook_proj(self.codebook)

    def forward(self, features: torch.Tensor) -> QuantizerOutput:
        """Args: features (B, N, C). Returns: QuantizerOutput."""
        z = self.in_proj(features)  # (B, N, D)
        codebook = self.effective_codebook()  # (K, D)
        indices = nearest_code(z.detach().flatten(0, -2), codebook.detach(), self.cfg.search_budget_mb)
        indices = indices.view(z.shape[:-1])  # (B, N)
        z_q = F.embedding(indices, codebook).to(z.dtype)  # (B, N, D)
        commitment = F.mse_loss(z.float(), z_q.detach().float())
        codebook_loss = F.mse_loss(z_q.float(), z.detach().float())
        loss = self.cfg.beta * commitment + codebook_loss
        quantized = z_q.detach() + (z - z.detach())  # straight-through; the forward value is exactly z_q
        metrics = {"commitment": commitment.detach(), "codebook": codebook_loss.detach(), **self._count(indices)}
        return QuantizerOutput(quantized, indices, loss, metrics)

    @torch.no_grad()
    def _count(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = indices.flatten()  # a static-shape histogram (bincount's size depends on the data; compile-friendly)
        hits = torch.zeros_like(self.code_hits).index_add_(0, flat, torch.ones_like(flat))
        self.code_hits += hits
        return {"code_usage": (hits > 0).float().mean(), "code_perplexity": perplexity(hits)}

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (...,) -> vectors (..., D) of the effective codebook C W."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"code indices must be an integer tensor, got dtype {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"code indices out of range: min {int(indices.min())}, max {int(indices.max())}, "
                f"codebook size {self.codebook_size}"
            )
        return F.embedding(indices.long(), self.effective_codebook())

    def reset_usage(self) -> None:
        """Start a new whole-pass usage count."""
        self.code_hits.zero_()

    def usage(self) -> dict[str, float]:
        """Utilisation (fraction of codes hit at least once) and perplexity since the last `reset_usage`."""
        return {"utilisation": float((self.code_hits > 0).float().mean()), "perplexity": float(perplexity(self.code_hits))}


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a histogram of code counts (float64); 1.0 for an empty histogram. No data-dependent shapes
    or branches (0 log 0 = 0 through xlogy), so it compiles without graph breaks."""
    p = counts.double() / counts.sum().clamp_min(1)
    return torch.exp(-torch.xlogy(p, p).sum())
