"""Pre-tokenise an image + caption dataset into VQRAE code chunks for generator training.

    python scripts/extract_codes.py --tokenizer runs/tiny-stage2/export --data runs/world-64/train/shards \
        --out runs/codes-tiny
    torchrun --nproc_per_node 8 scripts/extract_codes.py --tokenizer TOK --data /data/shards --out /data/codes \
        --device cuda --dtype bf16

Chunks of --chunk-size dataset indices are shared round-robin across ranks; each is written atomically, and
chunks already on disk are skipped, so an interrupted run resumes where it stopped. Unreadable images are
skipped and counted. Images go through the ADM centre crop at the tokenizer's resolution.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from data.codes import ensure_manifest, extract_codes
from data.images import build_image_dataset
from data.transforms import ImageTransform
from tokenizer import VQRAE
from tokenizer.config import reported_errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a VQRAE export (config.json + safetensors)")
    parser.add_argument("--data", required=True, help="image folder, jsonl or tar shards (captions from them)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chunk-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    with reported_errors():
        model = VQRAE.from_pretrained(args.tokenizer)
        dataset = build_image_dataset(args.data, ImageTransform(model.config.encoder.image_size, "center"))
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", "0"))) if args.device == "cuda" \
        else torch.device(args.device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = model.to(device, dtype).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    with reported_errors():
        ensure_manifest(args.out, args.tokenizer, model.config, args.data, len(dataset), args.chunk_size,
                        write=rank == 0)
    counts = extract_codes(model, dataset, args.out, args.chunk_size, args.batch_size, rank, world, args.num_workers, dtype)
    if world > 1:
        totals = torch.tensor([counts["chunks"], counts["images"], counts["skipped"]])
        dist.all_reduce(totals)
        counts = dict(zip(("chunks", "images", "skipped"), totals.tolist()))
        dist.destroy_process_group()
    if rank == 0:
        print(f"wrote {counts['chunks']} chunks, {counts['images']} images, skipped {counts['skipped']} unreadable "
              f"-> {args.out}")


if __name__ == "__main__":
    main()
