"""The VQRAE encoder as a transformers vision tower, and plug-and-play into an existing LLaVA checkpoint.

    python scripts/llava_tower.py export runs/tiny-stage2/export runs/tiny-tower        # a transformers vision model
    python scripts/llava_tower.py swap /ckpt/llava-qwen-siglip runs/siglip2-stage2/export runs/llava-vqrae

`export` writes config.json + model.safetensors + preprocessor_config.json, loadable with `AutoModel` and
`AutoImageProcessor`; LLaVA's features of it (hidden_states[-1]) equal `VQRAE.encode_features`. `swap` keeps the
checkpoint's projector and language model and replaces its vision tower by the VQRAE encoder, which must have the
tower's width, patch size, resolution and feature selection; the result loads with `LlavaForConditionalGeneration`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import reported_errors
from llm.understanding import export_vision_tower, replace_vision_tower


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="VQRAE export -> transformers vision tower folder")
    export.add_argument("vqrae", type=Path)
    export.add_argument("out", type=Path)
    swap = commands.add_parser("swap", help="replace a LLaVA checkpoint's vision tower by a VQRAE encoder")
    swap.add_argument("llava", type=Path)
    swap.add_argument("vqrae", type=Path)
    swap.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    with reported_errors():
        if args.command == "export":
            print(f"wrote {export_vision_tower(args.vqrae, args.out)}")
        else:
            print(f"wrote {replace_vision_tower(args.llava, args.vqrae, args.out)}")


if __name__ == "__main__":
    main()
