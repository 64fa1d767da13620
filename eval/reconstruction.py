"""Reconstruction evaluation of a VQRAE tokenizer: PSNR, SSIM, rFID and codebook usage over an image set.

    python eval/reconstruction.py --model runs/siglip2-stage2/export --data /data/imagenet/val \\
        --inception pt_inception-2015-12-05-6726825d.pth --out runs/siglip2-stage2/recon-imagenet
    torchrun --nproc_per_node 8 eval/reconstruction.py --model ... --data ...   # sharded by rank, then reduced

Metrics and their conventions: eval/reconstruction_scoring.py (the project's reconstruction-eval spec).
Outputs in --out (default: a "<model dir>-reconstruction" folder next to the model): per_image.jsonl and
summary.json, written atomically once the pass is complete, and grid.png with --save-recons K.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from common.cli import DTYPES, add_device_arguments, reported_errors
from common.distributed import default_num_workers, init_distributed, shutdown
from data.images import build_image_dataset
from data.transforms import ImageTransform
from eval.metrics import INCEPTION_PREPROCESSING, InceptionFeatureExtractor
from eval.reconstruction_scoring import evaluate, format_table, write_results
from tokenizer import VQRAE


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
