"""Chat with the project's models: ask about an image (understanding export), draw (generator export), reconstruct
(VQRAE export), in one conversation.

    python scripts/chat.py                                    # the CPU default's exports under runs/
    python scripts/chat.py --und runs/qwen3-und-stage2/export --gen runs/qwen3-0.6b-ar/export --device cuda
    python scripts/chat.py --model runs/tiny-unified/export   # one unified model answers and draws
    python scripts/chat.py --image cat.png --prompt "What is in the image?"
    printf '/image a.png\\nHow many circles are there?\\n/draw a photo of a red circle\\n' | python scripts/chat.py --json

The messages and commands are in `/help` (and below, under --help).

Answers stream token by token; --json prints one JSON object per turn instead ({"kind", "text" or "paths", ...,
"seconds"}). Bad input (a missing file, not an image, an unknown command, an absent model) is one line and the chat
goes on. bf16 on CUDA and fp32 on CPU unless --dtype says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common.cli import reported_errors
from common.config import apply_overrides
from demo.chat import HELP, MAKES, ChatSettings, Models, Session, add_model_arguments, chat, input_lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__ + "\n" + HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image", type=Path, default=None, help="attach this image first")
    parser.add_argument("--prompt", default=None, help="one message, then quit (after --image, if given)")
    parser.add_argument("--json", action="store_true", help="one JSON object per turn")
    parser.add_argument("--out", type=Path, default=Path("outputs/chat"), help="where drawings and reconstructions go")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampled answers (drawings: draw.seed)")
    parser.add_argument("settings", nargs="*", help="initial settings, key=value (see /settings)")
    args = parser.parse_args(argv)
    with reported_errors():
        apply_overrides(ChatSettings(), args.settings)  # a bad setting is refused before the models load
        models = Models.from_arguments(args)
        settings = apply_overrides(ChatSettings.for_models(models), args.settings)
    missing = [f"--{k} ({MAKES[k]})" for k, model in (("und", models.und), ("gen", models.gen)) if model is None]
    if missing and not args.json:
        print("not loaded: " + "; ".join(missing), file=sys.stderr)
    if models.gen is not None and not args.json:
        source = "the generator's recommendation" if models.gen.recommended else "the defaults"
        if any(item.startswith("draw.") for item in args.settings):
            source += " and the settings given"
        print(f"drawing with {source}: cfg_scale {settings.draw.cfg_scale}, temperature {settings.draw.temperature} "
              "(/settings changes them)", file=sys.stderr)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    session = Session(models, args.out, settings)
    if args.image is not None:  # an image that cannot be read ends the chat, rather than answering blind
        with reported_errors():
            record = session.attach(str(args.image))
        print(json.dumps(record) if args.json else record["text"], flush=True)
    interactive = args.prompt is None and sys.stdin.isatty()
    # lazily: a line typed at a terminal is answered before the next is read
    lines = [args.prompt] if args.prompt is not None else input_lines(">>> ") if interactive else sys.stdin
    chat(session, lines, sys.stdout, args.json, interactive)


if __name__ == "__main__":
    main()
