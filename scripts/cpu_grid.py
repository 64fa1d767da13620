"""A captioned grid of the CPU default (run after its tokenizer and generator phases): held-out images of the world
(runs/world/heldout; top row), their reconstructions by the stage-2 tokenizer (middle row) and the trained
generator's samples for the same captions (bottom row, drawn with the generator run's sampling settings, seed 42),
each column's caption under it.

    python scripts/cpu_grid.py              # runs/cpu_grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.cli import reported_errors
from data.images import build_image_dataset
from data.transforms import ImageTransform, make_grid_png

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("-n", type=int, default=8, help="columns")
    parser.add_argument("--out", type=Path, default=None, help="default: RUNS/cpu_grid.png")
    args = parser.parse_args()
    with reported_errors():
        from llm.pipeline import TextToImage
        from tokenizer import VQRAE
        from world.report import generator_sampling

        vqrae = VQRAE.from_pretrained(args.runs / "tiny-stage2" / "export").eval()
        t2i = TextToImage.from_pretrained(args.runs / "tiny-ar" / "export")
        held_out = build_image_dataset(str(args.runs / "world" / "heldout" / "captions.jsonl"),
                                       ImageTransform(vqrae.config.encoder.image_size, "center"))
        items = [held_out[i] for i in range(args.n)]
        originals = torch.stack([item["pixel_values"] for item in items])
        captions = [item["caption"] for item in items]
        reconstructions = vqrae.decode(vqrae.encode(originals).indices).clamp(-1, 1)
        samples, _ = t2i.generate(captions, generator_sampling(args.runs))
        out = make_grid_png([originals, reconstructions, samples.float()], args.out or args.runs / "cpu_grid.png",
                            padding=4, min_cell=128, captions=captions)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
