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
import math
import shutil
import sys
import tempfile
import threading
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root first

import torch

from common.cli import reported_errors
from scripts.chat import ChatSettings, Models, Session, add_model_arguments

LOCAL = "127.0.0.1"
MAX_PIXELS = 64_000_000  # decoded size past which an upload is refused (a decompression bomb guard)
MAX_SESSIONS = 64  # session output folders kept; the oldest is removed past this


class Demo:
    """The loaded models, one lock for every model call (they share one device: a drawing's CUDA-graph capture must
    never meet an answer), and the folder outputs go to (one sub-folder per browser session)."""

    def __init__(self, models: Models, out_dir: Path, max_sessions: int = MAX_SESSIONS):
        self.models, self.out_dir, self.max_sessions = models, out_dir, max_sessions
        self.lock = threading.Lock()
        self.folders: list[Path] = []  # session folders, oldest first

    def session(self, state: Session | None) -> Session:
        """The browser session's own conversation and output folder (made on its first request; past
        max_sessions folders the oldest is removed)."""
        if state is not None:
            return state
        folder = self.out_dir / uuid.uuid4().hex
        self.folders.append(folder)
        while len(self.folders) > self.max_sessions:
            shutil.rmtree(self.folders.pop(0), ignore_errors=True)
        return Session(self.models, folder, ChatSettings.for_models(self.models))

    def forget(self, state: Session | None) -> None:
        """A browser session ended: its output folder goes."""
        if state is not None:
            shutil.rmtree(state.out_dir, ignore_errors=True)
            self.folders = [f for f in self.folders if f != state.out_dir]

    def ask(self, image: str | None, question: str, history: list, state: Session | None):
        """Understanding: (chat history, cleared question box, session). A new image starts a new conversation."""
        session = self.session(state)
        if not question.strip():
            raise error("Type a question.")
        if image is not None and image != session.image_path:
            call(session.attach, image)
            history = []
        elif image is None and session.image is not None:
            session.reset()
            history = []
        with self.lock:
            record = call(session.ask, question.strip())
        return [*history, {"role": "user", "content": question},
                {"role": "assistant", "content": record["text"]}], "", session

    def reset(self, state: Session | None):
        session = self.session(state)
        session.reset()
        return [], None, session

    def draw(self, prompt: str, cfg_scale: float, temperature: float, seed: float, count: float,
             state: Session | None):
        """Generation: the gallery's images (paths) and the session."""
        session = self.session(state)
        if not prompt.strip():
            raise error("Type a prompt.")
        values = (number("CFG scale", cfg_scale, 1, 10), number("Temperature", temperature, 0, 2),
                  number("Seed", seed, 0, 2**31 - 1, integer=True), number("Images", count, 1, 16, integer=True))
        call(session.change_settings, "draw.cfg_scale={} draw.temperature={} draw.seed={} draw.count={}".format(*values))
        with self.lock:
            record = checked(session.handle(f"/draw {prompt.strip()}"))
        return record["paths"], session

    def reconstruct(self, image: str | None, state: Session | None):
        """Reconstruction: (the reconstruction's path, a line with PSNR and codes, the session)."""
        session = self.session(state)
        if image is None:
            raise error("Upload an image.")
        with self.lock:
            record = checked(session.handle(f"/reconstruct {image}"))
        return record["paths"][0], f"PSNR {record['psnr']:.2f} dB, {record['codes']} codes of " \
                                   f"{record['codebook_size']}", session


def error(message: str):
    """The page's error message (a gradio exception)."""
    import gradio as gr

    return gr.Error(message)


def number(name: str, value, low: float, high: float, integer: bool = False) -> float | int:
    """A number from the page, checked: finite, in [low, high], whole when `integer`; else the page's error."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise error(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x) or not low <= x <= high or (integer and x != int(x)):
        raise error(f"{name} must be {'a whole number ' if integer else ''}in [{low}, {high}], got {value!r}")
    return int(x) if integer else x


def checked(record: dict) -> dict:
    """A turn's record, or the page's error message for a refused one."""
    if record["kind"] == "error":
        raise error(record["text"])
    return record


def call(fn, *args) -> dict:
    """A session method's record, its one-line refusal shown on the page."""
    try:
        return fn(*args)
    except (FileNotFoundError, ValueError) as e:
        raise error(str(e).splitlines()[0]) from e


def build(demo: Demo):
    import gradio as gr

    with gr.Blocks(title="VQRAE") as page:
        state = gr.State(None, delete_callback=demo.forget)  # a session that ends takes its folder with it
        gr.Markdown("# VQRAE: understand, draw, reconstruct with one tokenizer")
        with gr.Tab("Understanding"):
            with gr.Row():
                und_image = gr.Image(type="filepath", sources=["upload"], label="Image", elem_id="und-image")
                with gr.Column():
                    conversation = gr.Chatbot(label="Conversation", elem_id="conversation")
                    question = gr.Textbox(label="Question", placeholder="What color is the circle?",
                                          elem_id="question")
                    with gr.Row():
                        ask = gr.Button("Ask", variant="primary", elem_id="ask")
                        clear = gr.Button("New conversation")
            ask.click(demo.ask, [und_image, question, conversation, state], [conversation, question, state])
            question.submit(demo.ask, [und_image, question, conversation, state], [conversation, question, state])
            clear.click(demo.reset, [state], [conversation, und_image, state])
        with gr.Tab("Generation"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", value="a photo of a red circle", elem_id="prompt")
                    draw_defaults = ChatSettings.for_models(demo.models).draw  # the generator's recommendation
                    cfg = gr.Slider(1, 10, value=draw_defaults.cfg_scale, step=0.5, label="CFG scale")
                    temperature = gr.Slider(0, 2, value=draw_defaults.temperature, step=0.05,
                                            label="Temperature (0 = greedy)")
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    count = gr.Slider(1, 16, value=4, step=1, label="Images")
                    draw = gr.Button("Draw", variant="primary", elem_id="draw")
                gallery = gr.Gallery(label="Samples", columns=4, elem_id="gallery")
            draw.click(demo.draw, [prompt, cfg, temperature, seed, count, state], [gallery, state])
        with gr.Tab("Reconstruction"):
            with gr.Row():
                rec_in = gr.Image(type="filepath", sources=["upload"], label="Image", elem_id="rec-image")
                with gr.Column():
                    rec_out = gr.Image(type="filepath", label="Reconstruction", interactive=False,
                                       elem_id="reconstruction")
                    rec_info = gr.Textbox(label="Round trip", interactive=False, elem_id="rec-info")
                    rebuild = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct")
            rebuild.click(demo.reconstruct, [rec_in, state], [rec_out, rec_info, state])
    return page


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
