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
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.atomic import atomic_write  # noqa: E402
from data.codes import MANIFEST, chunk_paths, code_dtype, write_chunk  # noqa: E402
from data.images import build_image_dataset, collate_images  # noqa: E402
from data.transforms import ImageTransform  # noqa: E402
from tokenizer import VQRAE  # noqa: E402


@torch.no_grad()
def extract(model: VQRAE, dataset, out: Path, chunk_size: int, batch_size: int, rank: int = 0, world: int = 1,
            num_workers: int = 0, dtype: torch.dtype = torch.float32, progress: bool = True) -> dict[str, int]:
    """Encode this rank's missing chunks; returns counts {"chunks", "images", "skipped"}."""
    device = next(model.parameters()).device
    n_chunks = (len(dataset) + chunk_size - 1) // chunk_size
    todo = [c for c in range(rank, n_chunks, world) if not chunk_paths(out, c)[1].is_file()]
    total = sum(min(chunk_size, len(dataset) - c * chunk_size) for c in todo)
    counts = {"chunks": 0, "images": 0, "skipped": 0}
    bar = tqdm(total=total, desc=f"codes rank {rank}", unit="img", disable=not progress)
    np_dtype = code_dtype(model.config.quantizer.codebook_size)
    for chunk in todo:
        indices = list(range(chunk * chunk_size, min((chunk + 1) * chunk_size, len(dataset))))
        subset = torch.utils.data.Subset(dataset, indices)
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate_images,
                                             num_workers=num_workers)
        codes, rows = [], []
        for batch in loader:
            counts["skipped"] += batch["skipped"]
            bar.update(len(batch["captions"]) + batch["skipped"])
            if not batch["captions"]:
                continue
            x = batch["pixel_values"].to(device, dtype)
            codes.append(model.encode(x).indices.cpu().numpy().astype(np_dtype))
            rows += [{"index": int(i), "caption": c} for i, c in zip(batch["indices"], batch["captions"])]
        width = model.config.num_tokens
        write_chunk(out, chunk, np.concatenate(codes) if codes else np.zeros((0, width), np_dtype), rows)
        counts["chunks"] += 1
        counts["images"] += len(rows)
    bar.close()
    return counts


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
    try:
        model = VQRAE.from_pretrained(args.tokenizer)
        dataset = build_image_dataset(args.data, ImageTransform(model.config.encoder.image_size, "center"))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", "0"))) if args.device == "cuda" \
        else torch.device(args.device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = model.to(device, dtype).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"tokenizer": str(args.tokenizer.resolve()), "data": args.data, "num_samples": len(dataset),
                "chunk_size": args.chunk_size, "codebook_size": model.config.quantizer.codebook_size,
                "grid_size": model.config.grid_size, "num_tokens": model.config.num_tokens,
                "image_size": model.config.encoder.image_size}
    existing = args.out / MANIFEST
    if existing.is_file():
        old = json.loads(existing.read_text())
        diff = sorted(k for k in manifest if k != "tokenizer" and old.get(k) != manifest[k])
        if diff:
            print(f"error: {args.out} holds codes made with other settings ({', '.join(diff)}); use another --out",
                  file=sys.stderr)
            sys.exit(2)
    elif rank == 0:
        with atomic_write(existing) as f:
            json.dump(manifest, f, indent=2)
    counts = extract(model, dataset, args.out, args.chunk_size, args.batch_size, rank, world, args.num_workers, dtype)
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
