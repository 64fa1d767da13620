"""Reconstruction metrics of a VQRAE tokenizer over an image set: PSNR, SSIM, rFID and codebook usage (`evaluate`),
the results' files and table; run by eval/reconstruction.py, the codebook ablation and the CPU default's report.

Conventions (see the project's reconstruction-eval spec):
- Images are ADM centre-cropped to the model's resolution; originals and reconstructions both go to uint8 with
  `data.transforms.to_uint8`, and every metric is computed from those uint8 images.
- PSNR: per image on [0, 1] floats, 10 log10(1 / MSE), averaged over images. Identical images (MSE 0) would give
  inf; every per-image value is capped at PSNR_CAP_DB and the summary counts the capped images.
- SSIM: scikit-image's definition (7x7 uniform window) with data_range=1.0 ("ssim"). "ssim_llamagen" is the same
  with data_range=2.0 on [0, 1] data, as LlamaGen computes it; it is higher and is not comparable with "ssim".
- rFID: Frechet distance between FID Inception-v3 pool features of the originals and of the reconstructions, from a
  local weights file (`--inception`); without one, rFID is null.
- Codebook: utilisation (fraction of codes used at least once over the whole pass) and perplexity (exp of the
  entropy of code usage); "codes_per_image" is the mean number of distinct codes in one image.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from common.distributed import (
    all_gather_objects,
    all_reduce,
    rank_and_world,
)
from common.files import atomic_write
from data.images import collate_images
from data.transforms import make_grid_png, to_uint8
from eval.metrics import (
    CodeUsage,
    FeatureStats,
    InceptionFeatureExtractor,
    frechet_distance,
    psnr,
    ssim,
)
from tokenizer import VQRAE

PSNR_CAP_DB = 100.0  # per-image cap; a 256px pair differing by one level in one pixel scores about 101 dB
INCEPTION_DIM = 2048
CONVERGED_MARGIN_DB = 10 * math.log10(2)  # 3.01 dB: half the mean image's squared error (`converged`)
INCEPTION_NETWORK = "FID Inception-v3 (TF 2015-12-05 graph), 2048-d pool features"


# ----------------------------------------------------------------------------------------------------------------
# Per-image metrics


def image_metrics(originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR (capped at PSNR_CAP_DB), SSIM (data_range 1) and LlamaGen's SSIM (data_range 2).

    Args:
        originals: uint8 (B, 3, H, W).
        reconstructions: uint8 (B, 3, H, W).

    Returns:
        {"psnr", "ssim", "ssim_llamagen"}: float64 (B,) tensors, each computed on the images as [0, 1] floats.
    """
    if originals.dtype != torch.uint8 or reconstructions.dtype != torch.uint8:
        raise ValueError(f"image_metrics: expected uint8 images, got {originals.dtype} and {reconstructions.dtype}")
    a, b = originals.double() / 255.0, reconstructions.double() / 255.0  # (B, 3, H, W)
    return {
        "psnr": psnr(a, b, data_range=1.0).clamp(max=PSNR_CAP_DB),
        "ssim": ssim(a, b, data_range=1.0),
        "ssim_llamagen": ssim(a, b, data_range=2.0),
    }


def distinct_codes(indices: torch.Tensor) -> torch.Tensor:
    """Number of distinct codes in each row.

    Args:
        indices: integer (B, N).

    Returns:
        int64 (B,).
    """
    ordered = indices.flatten(1).sort(dim=1).values  # (B, N)
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The evaluation pass


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


class ReconstructionStats:
    """What one pass accumulates, batch by batch: per-image records, whole-pass code usage, Inception statistics of
    originals and reconstructions, unreadable images; `summary()` reduces them across ranks.

    Args:
        model: the tokenizer (its codebook size, resolution and token grid).
        device: where the running statistics live.
        inception: the FID feature extractor; None skips rFID.
    """

    def __init__(self, model: VQRAE, device: torch.device, inception: InceptionFeatureExtractor | None = None):
        self.model, self.device, self.inception = model, device, inception
        self.usage = CodeUsage(model.quantizer.codebook_size, device)
        self.real, self.fake = FeatureStats(INCEPTION_DIM, device), FeatureStats(INCEPTION_DIM, device)
        self.records: list[dict[str, Any]] = []
        self.skipped = 0

    def update(self, batch: dict[str, Any], originals: torch.Tensor, reconstructions: torch.Tensor,
               indices: torch.Tensor) -> None:
        """One batch: `collate_images` output, its uint8 originals and reconstructions (B, 3, H, W), codes (B, N)."""
        scores = {k: v.tolist() for k, v in image_metrics(originals, reconstructions).items()}
        codes_used = distinct_codes(indices).tolist()
        self.usage.update(indices)
        if self.inception is not None:
            self.real.update(self.inception(originals))
            self.fake.update(self.inception(reconstructions))
        for j, (index, caption, meta) in enumerate(zip(batch["indices"].tolist(), batch["captions"], batch["meta"])):
            record: dict[str, Any] = {"index": index}
            source = meta.get("path", meta.get("__key__"))
            if source is not None:
                record["source"] = str(source)
            if caption:
                record["caption"] = caption
            record.update({k: v[j] for k, v in scores.items()}, codes_used=codes_used[j])
            self.records.append(record)

    def summary(self, wall_s: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(summary, per-image records in dataset order), the same on every rank (collective under a process
        group). Args: wall_s: the pass's wall time."""
        self.usage.all_reduce()
        skipped = int(all_reduce(torch.tensor([self.skipped], dtype=torch.int64, device=self.device)))
        records = sorted(all_gather_objects(self.records), key=lambda r: r["index"])
        if not records:
            raise ValueError(f"no readable images among those evaluated ({skipped} unreadable)")
        rfid, rfid_note = None, "no Inception weights given"
        if self.inception is not None:
            self.real.all_reduce()
            self.fake.all_reduce()
            if self.real.count >= 2:
                rfid = frechet_distance(*self.real.mean_cov(), *self.fake.mean_cov())
                rfid_note = None
            else:
                rfid_note = f"needs at least 2 images, have {self.real.count}"
        config = self.model.config
        summary: dict[str, Any] = {
            "num_images": len(records),
            "skipped_unreadable": skipped,
            "psnr": _mean([r["psnr"] for r in records]),
            "psnr_capped_images": sum(r["psnr"] >= PSNR_CAP_DB for r in records),
            "psnr_cap_db": PSNR_CAP_DB,
            "ssim": _mean([r["ssim"] for r in records]),
            "ssim_data_range": 1.0,
            "ssim_llamagen": _mean([r["ssim_llamagen"] for r in records]),
            "ssim_llamagen_data_range": 2.0,
            "rfid": rfid,
            "rfid_features": None if rfid is None else {"network": INCEPTION_NETWORK,
                                                        "preprocessing": self.inception.preprocessing},
            "rfid_skipped_reason": rfid_note,
            "utilisation": self.usage.utilisation(),
            "perplexity": self.usage.perplexity(),
            "codebook_size": self.usage.num_codes,
            "codes_per_image": _mean([r["codes_used"] for r in records]),
            "tokens_per_image": config.num_tokens,
            "resolution": config.encoder.image_size,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "world_size": rank_and_world()[1],
            "wall_time_s": wall_s,
            "images_per_s": len(records) / wall_s,
        }
        return summary, records


@torch.no_grad()
def evaluate(
    model: VQRAE,
    dataset: Dataset,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    inception: InceptionFeatureExtractor | None = None,
    num_images: int | None = None,
    num_workers: int = 0,
    grid_path: str | Path | None = None,
    grid_images: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Reconstruct every image of `dataset` and score it.

    Under an initialised process group, each rank takes every world_size-th image and the results are reduced
    (every rank returns the same summary and per-image list).

    Args:
        model: the tokenizer; it is put in eval mode and stays on its device and dtype.
        dataset: an `ImageDataset` (or any dataset of its sample dicts) whose transform yields the model's resolution.
        batch_size: images per forward pass (per rank).
        device: where the images go (the model's device).
        inception: the FID feature extractor; None skips rFID.
        num_images: evaluate only the first `num_images` images of the dataset (all when None).
        num_workers: DataLoader workers.
        grid_path: where rank 0 writes a PNG of its first `grid_images` originals (top) over reconstructions.
        grid_images: images in the grid (0: no grid).
        progress: show a tqdm bar on rank 0.

    Returns:
        (summary, per_image): summary metrics (see the module docstring) and one record per evaluated image in
        dataset order: {"index", ["source"], ["caption"], "psnr", "ssim", "ssim_llamagen", "codes_used"}.
    """
    total = len(dataset) if num_images is None else min(num_images, len(dataset))
    if total <= 0:
        raise ValueError(f"nothing to evaluate: the dataset has {len(dataset)} images and num_images={num_images}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rank, world_size = rank_and_world()
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    model.eval()

    shard = Subset(dataset, range(rank, total, world_size))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_images, pin_memory=device.type == "cuda")
    stats = ReconstructionStats(model, device, inception)
    grid_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    grid_have = 0
    start = time.perf_counter()
    bar = tqdm(total=len(shard), desc="reconstruction", unit="img", disable=not progress or rank != 0)
    for batch in loader:
        stats.skipped += batch["skipped"]
        bar.update(len(batch["indices"]) + batch["skipped"])
        if len(batch["indices"]) == 0:
            continue
        x = batch["pixel_values"].to(device, non_blocking=True)  # (B, 3, H, W) float32, exactly u / 127.5 - 1
        out = model(x.to(dtype))
        originals = to_uint8(x)  # (B, 3, H, W) uint8, the decoded pixels again
        reconstructions = to_uint8(out.reconstruction)  # (B, 3, H, W) uint8
        if originals.shape != reconstructions.shape:
            raise ValueError(f"images of shape {tuple(originals.shape)} do not match the model's reconstructions "
                             f"{tuple(reconstructions.shape)}; is the transform at the model's resolution?")
        stats.update(batch, originals, reconstructions, out.indices)
        if grid_have < grid_images:
            take = min(grid_images - grid_have, len(originals))
            grid_rows.append((batch["pixel_values"][:take].clone(), out.reconstruction[:take].float().cpu()))
            grid_have += take
    bar.close()
    summary, records = stats.summary(time.perf_counter() - start)
    if grid_path is not None and grid_rows and rank == 0:
        make_grid_png([torch.cat([r[0] for r in grid_rows]), torch.cat([r[1] for r in grid_rows])], grid_path)
    return summary, records


# ----------------------------------------------------------------------------------------------------------------
# Output


def converged(curve: dict[str, Any], held_out_psnr: float, mean_image_psnr: float) -> bool:
    """A tokenizer run's convergence, the codebook ablation's stated rule: no logged loss non-finite (`curve`: the
    logged "loss" and "l2" lists, None where non-finite, and "skipped_nonfinite"), no step skipped as non-finite, and
    the held-out PSNR at least CONVERGED_MARGIN_DB above the mean image's."""
    finite = all(v is not None for key in ("loss", "l2") for v in curve[key])
    return finite and curve["skipped_nonfinite"] == 0 and held_out_psnr >= mean_image_psnr + CONVERGED_MARGIN_DB


def mean_image_psnr(dataset, num_images: int | None) -> float:
    """Mean PSNR of the held-out images against their mean image (uint8, as reconstructions are scored)."""
    total = len(dataset) if num_images is None else min(num_images, len(dataset))
    images = [to_uint8(collate_images([dataset[i]])["pixel_values"]) for i in range(total)]
    images = torch.cat([x for x in images if x.numel()])
    mean = images.double().mean(0, keepdim=True).round().to(torch.uint8)
    return float(psnr(images.double() / 255, mean.expand_as(images).double() / 255).mean())


def write_results(out_dir: str | Path, summary: dict[str, Any], per_image: list[dict[str, Any]]) -> None:
    """Write per_image.jsonl, then summary.json (so a summary means a complete run), each atomically.

    Args:
        out_dir: the output folder (created).
        summary: the summary dict.
        per_image: the per-image records.
    """
    out_dir = Path(out_dir)
    with atomic_write(out_dir / "per_image.jsonl") as f:
        for record in per_image:
            f.write(json.dumps(record, allow_nan=False) + "\n")
    with atomic_write(out_dir / "summary.json") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
        f.write("\n")


def format_table(summary: dict[str, Any]) -> str:
    """A short human-readable table of the main numbers.

    Args:
        summary: what `evaluate` returned (plus any keys the caller added).
    """
    rfid = "skipped" if summary["rfid"] is None else f"{summary['rfid']:.4f}"
    rows = [
        ("images", f"{summary['num_images']} ({summary['skipped_unreadable']} unreadable skipped)"),
        ("resolution", f"{summary['resolution']}"),
        ("PSNR (dB)", f"{summary['psnr']:.4f}"),
        ("SSIM (data_range 1)", f"{summary['ssim']:.4f}"),
        ("SSIM LlamaGen (data_range 2)", f"{summary['ssim_llamagen']:.4f}"),
        ("rFID", rfid + ("" if summary["rfid_features"] is None
                         else f" [{summary['rfid_features']['preprocessing']} preprocessing]")),
        ("codebook utilisation", f"{summary['utilisation']:.4f} of {summary['codebook_size']}"),
        ("code perplexity", f"{summary['perplexity']:.1f}"),
        ("codes per image", f"{summary['codes_per_image']:.1f} of {summary['tokens_per_image']} tokens"),
        ("throughput", f"{summary['images_per_s']:.1f} img/s ({summary['wall_time_s']:.1f} s)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
