"""Export a tokenizer training checkpoint as a `VQRAE.from_pretrained` directory (config.json + model.safetensors).

    python scripts/export_tokenizer.py runs/tiny-stage1                      # latest checkpoint, EMA weights
    python scripts/export_tokenizer.py runs/tiny-stage1/checkpoints/step_00001000 --out tok --weights raw

Works for every ZeRO stage, on CPU. Inference and evaluation read only what this writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import reported_errors
from train.checkpoint import find_checkpoint
from train.exports import export_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a run folder or one of its checkpoints/step_* folders")
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: RUN/export)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    args = parser.parse_args()
    with reported_errors():
        checkpoint = find_checkpoint(args.checkpoint)
        out = args.out or checkpoint.parent.parent / "export"
        export_tokenizer(checkpoint, out, weights=args.weights)
    print(f"exported {checkpoint} ({args.weights} weights) to {out}")


if __name__ == "__main__":
    main()
