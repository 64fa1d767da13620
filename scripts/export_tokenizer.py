"""Export a tokenizer training checkpoint as a `VQRAE.from_pretrained` directory (config.json + model.safetensors).

    python scripts/export_tokenizer.py runs/tiny-stage1                      # latest checkpoint, EMA weights
    python scripts/export_tokenizer.py runs/tiny-stage1/checkpoints/step_00001000 --out tok --weights raw

Works for every ZeRO stage, on CPU. Inference and evaluation read only what this writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.loop import complete_checkpoints, is_checkpoint
from train.tokenizer import export


def find_checkpoint(path: Path) -> Path:
    """A checkpoints/step_* folder, or the latest complete one of a run folder."""
    if is_checkpoint(path):
        return path
    done = complete_checkpoints(path)
    if not done:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run folder with complete checkpoints")
    return done[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a run folder or one of its checkpoints/step_* folders")
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: RUN/export)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    args = parser.parse_args()
    checkpoint = find_checkpoint(args.checkpoint)
    out = args.out or checkpoint.parent.parent / "export"
    export(checkpoint, out, weights=args.weights)
    print(f"exported {checkpoint} ({args.weights} weights) to {out}")


if __name__ == "__main__":
    main()
