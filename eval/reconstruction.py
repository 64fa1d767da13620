"""Reconstruction evaluation of a VQRAE tokenizer: PSNR, SSIM, rFID and codebook usage over an image set.

    python eval/reconstruction.py --model runs/siglip2-stage2/export --data /data/imagenet/val \\
        --inception pt_inception-2015-12-05-6726825d.pth --out runs/siglip2-stage2/recon-imagenet
    torchrun --nproc_per_node 8 eval/reconstruction.py --model ... --data ...   # sharded by rank, then reduced

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

Outputs in --out (default: a "<model dir>-reconstruction" folder next to the model): per_image.jsonl and
summary.json, written atomically once the pass is complete, and grid.png with --save-recons K.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from common.cli import DTYPES, add_device_arguments, reported_errors
from common.distributed import (
    all_gather_objects,
    all_reduce,
    default_num_workers,
    init_distributed,
    rank_and_world,
    shutdown,
)
from common.files import atomic_write
from data.images import build_image_dataset, collate_images
from data.transforms import ImageTransform, make_grid_png, to_uint8
from eval.metrics import (
    INCEPTION_PREPROCESSING,
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


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _writable_target(path: Path) -> bool:
    existing = path
    while not existing.exists():
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line. Args: argv: arguments (default sys.argv[1:])."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a VQRAE export (config.json + model.safetensors)")
    parser.add_argument("--data", required=True, help="an image folder, a .jsonl list or tar shards")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <model>-reconstruction)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass per process")
    parser.add_argument("--num-images", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--inception", type=Path, default=None,
                        help="FID Inception-v3 weights (pytorch-fid pt_inception-2015-12-05-6726825d.pth)")
    parser.add_argument("--inception-format", choices=INCEPTION_PREPROCESSING, default="pytorch-fid",
                        help="the preprocessing in front of the Inception network")
    add_device_arguments(parser)
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers per process (default: this process's share of the cores, at most 8)")
    parser.add_argument("--save-recons", type=int, default=0, metavar="K",
                        help="write grid.png with the first K originals over their reconstructions")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, evaluate, write and print. Bad input raises FileNotFoundError / ValueError with one clear message.

    Args:
        args: the parsed command line.
    """
    if not args.model.is_dir():
        raise FileNotFoundError(f"model directory not found: {args.model}")
    if not Path(args.data).exists() and not any(c in args.data for c in "*?[:"):
        raise FileNotFoundError(f"data path not found: {args.data}")
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    if args.batch_size <= 0 or args.num_workers < 0 or args.save_recons < 0:
        raise ValueError("--batch-size must be positive; --num-workers and --save-recons must not be negative")
    if args.num_images is not None and args.num_images <= 0:
        raise ValueError(f"--num-images must be positive, got {args.num_images}")
    out = args.out or args.model.resolve().parent / f"{args.model.resolve().name}-reconstruction"
    if not _writable_target(out):
        raise ValueError(f"output folder is not writable: {out}")

    info = init_distributed(args.device)
    device, rank = info.device, info.rank
    model = VQRAE.from_pretrained(args.model, device=device, dtype=DTYPES[args.dtype])
    resolution = model.config.encoder.image_size
    dataset = build_image_dataset(args.data, ImageTransform(resolution, mode="center"))
    inception = None
    if args.inception is not None:
        inception = InceptionFeatureExtractor.from_file(args.inception, device, args.inception_format)
    elif rank == 0:
        print("rFID skipped: no --inception weights file given (pytorch-fid's pt_inception-2015-12-05-6726825d.pth); "
              "summary records \"rfid\": null")

    summary, per_image = evaluate(
        model, dataset, batch_size=args.batch_size, device=device, inception=inception,
        num_images=args.num_images, num_workers=args.num_workers,
        grid_path=out / "grid.png" if args.save_recons else None, grid_images=args.save_recons,
        progress=not args.no_progress,
    )
    summary = {"model": str(args.model), "data": str(args.data), **summary}
    if summary["rfid"] is not None:
        summary["rfid_features"]["weights"] = str(args.inception)
    if rank == 0:
        if inception is not None and summary["rfid"] is None:
            print(f"rFID skipped: {summary['rfid_skipped_reason']}")
        write_results(out, summary, per_image)
        print(format_table(summary))
        print(f"wrote {out / 'summary.json'} and {out / 'per_image.jsonl'}")
    shutdown()
    return summary


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input prints one `error: ...` line and exits with status 2.

    Args:
        argv: arguments (default sys.argv[1:]).
    """
    args = parse_args(argv)
    with reported_errors():  # bad config, arguments or files (ConfigError is a ValueError)
        run(args)


if __name__ == "__main__":
    main()
