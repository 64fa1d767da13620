"""Pre-tokenise an image + caption dataset into VQRAE code chunks for generator training.

    python scripts/extract_codes.py --tokenizer runs/tiny-stage2/export --data runs/world/train/shards \\
        --out runs/codes-tiny
    torchrun --nproc_per_node 8 scripts/extract_codes.py --tokenizer TOK --data /data/shards --out /data/codes \\
        --device cuda --dtype bf16

Chunks of --chunk-size dataset indices are shared round-robin across ranks; each is written atomically, and
chunks already on disk are skipped, so an interrupted run resumes where it stopped. Unreadable images are
skipped and counted. Images go through the ADM centre crop at the tokenizer's resolution. OUT/summary.json, written
last, records a finished pass (counts of this run, complete chunks in OUT).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.cli import add_device_arguments, dtype_of, reported_errors
from common.distributed import all_reduce, barrier, default_num_workers, init_distributed, shutdown
from common.files import write_atomic
from data.codes import CHUNK_SIZE, complete_chunks, ensure_manifest, extract_codes
from data.images import build_image_dataset
from data.shard_cache import ShardOptions
from data.transforms import ImageTransform
from tokenizer import VQRAE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a VQRAE export (config.json + safetensors)")
    parser.add_argument("--data", required=True,
                        help="image folder, jsonl, tar shards, or indexed shards (URL, brace pattern, shardindex.json)")
    parser.add_argument("--shard-cache", default="", help="where remote shards are cached (default: "
                        "$VQRAE_SHARD_CACHE, else ~/.cache/vqrae/shards)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers per process (default: this process's share of the cores, at most 8)")
    add_device_arguments(parser)
    args = parser.parse_args()
    with reported_errors():
        info = init_distributed(args.device)
        model = VQRAE.from_pretrained(args.tokenizer, device=info.device, dtype=dtype_of(args.dtype)).eval()
        dataset = build_image_dataset(args.data, ImageTransform(model.config.encoder.image_size, "center"),
                                      shards=ShardOptions(cache_dir=args.shard_cache))
        args.out.mkdir(parents=True, exist_ok=True)
        ensure_manifest(args.out, args.tokenizer, model.config, args.data, len(dataset), args.chunk_size,
                        write=info.is_main)
    barrier()
    workers = default_num_workers() if args.num_workers is None else args.num_workers
    counts = extract_codes(model, dataset, args.out, args.chunk_size, args.batch_size, info.rank, info.world_size,
                           workers, dtype_of(args.dtype), progress=info.is_main)
    totals = all_reduce(torch.tensor([counts["chunks"], counts["images"], counts["skipped"]]))
    shutdown()
    if info.is_main:
        chunks, images, skipped = totals.tolist()
        summary = {"tokenizer": str(args.tokenizer), "data": args.data, "chunks_written": chunks,
                   "images_written": images, "skipped_unreadable": skipped,
                   "complete_chunks": len(complete_chunks(args.out))}
        write_atomic(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")  # written last: a finished pass
        print(f"wrote {chunks} chunks, {images} images, skipped {skipped} unreadable -> {args.out}")


if __name__ == "__main__":
    main()
