"""A web page for the project's models (gradio, `pip install -c constraints.txt -e ".[demo]"`): an understanding
panel (image + question -> answer, the conversation kept per browser session), a generation panel (prompt, CFG,
temperature, seed, a gallery of several images) and a reconstruction panel (image -> codes -> image, PSNR), all on
the same loaded models.

    python scripts/web_demo.py                                # the CPU default's exports, http://127.0.0.1:7860
    python scripts/web_demo.py --und runs/qwen3-und-stage2/export --gen runs/qwen3-0.6b-ar/export --device cuda
    python scripts/web_demo.py --model runs/tiny-unified/export     # one unified model answers and draws

It listens on 127.0.0.1 unless --host says otherwise (binding elsewhere prints a warning) and never makes a public
share link. Images come only as uploads (the page cannot name a file on the server), are refused past --max-upload-mb,
past MAX_PIXELS pixels or when they are not images; the models serve one request at a time (one lock for the device
they share: answering and drawing never run together); numbers from the page are checked before they reach the
settings. Every browser session has its own conversation and output folder, removed when the session ends; at most
MAX_SESSIONS folders are kept (the oldest go first). Drawing starts from the generator's recommended sampling
settings (its sampling.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from common.cli import reported_errors
from demo.chat import Models, add_model_arguments
from demo.web import LOCAL, MAX_PIXELS, Demo, build


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default=LOCAL, help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-upload-mb", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None, help="where drawings and reconstructions go (default: a "
                        "temporary folder)")
    args = parser.parse_args(argv)
    with reported_errors(FileNotFoundError, ValueError, ImportError):
        try:
            import gradio  # noqa: F401  (checked before the models load)
        except ImportError as e:
            raise ImportError('the web demo needs gradio: pip install -c constraints.txt -e ".[demo]"') from e
        models = Models.from_arguments(args)
    if args.host != LOCAL:
        print(f"warning: listening on {args.host}: anyone who can reach it can use these models", file=sys.stderr)
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    out = args.out or Path(tempfile.mkdtemp(prefix="vqrae-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    page = build(Demo(models, out))
    page.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=False, max_file_size=int(args.max_upload_mb * 1024 * 1024),
        allowed_paths=[str(out)], show_error=True)


if __name__ == "__main__":
    main()
