"""Text-to-image with an exported generator (train/ar_gen.py): PNGs, a grid, and the settings that made them.

    python scripts/generate.py --model runs/tiny-ar/export --prompt "a photo of a red circle" -n 4
    python scripts/generate.py --model runs/qwen3-0.6b-ar/export --prompt "a corgi on a beach" -n 8 \
        --cfg-scale 5 --temperature 1.0 --top-k 0 --top-p 1.0 --seed 0 --device cuda --out outputs/corgi

Writes OUT/0000.png ..., OUT/grid.png and OUT/settings.json (model, prompt and every sampling setting). Image i
draws from the random stream (--seed, i), so the first images of `-n 8` are those of `-n 4`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.cli import add_device_arguments, dtype_of, reported_errors
from common.files import atomic_write
from data.transforms import make_grid_png, to_pil
from llm.pipeline import TextToImage
from llm.sampler import add_sampling_arguments, sampling_from_arguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="generator export directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("-n", type=int, default=4, help="images to sample")
    parser.add_argument("--out", type=Path, default=Path("outputs/generate"))
    add_sampling_arguments(parser)
    add_device_arguments(parser)
    args = parser.parse_args()
    with reported_errors():
        if args.n < 1:
            raise ValueError(f"-n (images to sample) must be at least 1, got {args.n}")
        TextToImage.check(args.model)
        t2i = TextToImage.from_pretrained(args.model, device=args.device, dtype=dtype_of(args.dtype))
        sampling = sampling_from_arguments(args, t2i.recommended)
        print(f"sampling: {sampling.to_dict()} (options not given: the model's recommendation, else the defaults)")
        images, _ = t2i.generate([args.prompt] * args.n, sampling)
    images = images.float().cpu()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        with atomic_write(args.out / f"{i:04d}.png", "wb") as f:
            to_pil(image).save(f, format="PNG")
    make_grid_png([images], args.out / "grid.png")
    with atomic_write(args.out / "settings.json") as f:
        json.dump({"model": str(args.model.resolve()), "prompt": args.prompt, "n": args.n,
                   "sampling": sampling.to_dict(), "dtype": args.dtype}, f, indent=2)
    print(f"wrote {args.n} images and grid.png to {args.out}")


if __name__ == "__main__":
    main()
