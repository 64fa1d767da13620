"""The web demo's logic (gradio): the page (`build`) and what its buttons call (`Demo`: one lock for every model call,
a session and an output folder per browser session, the page's numbers checked). The rules users see are documented
in scripts/web_demo.py, the command that serves it.
"""

from __future__ import annotations

import math
import shutil
import threading
import uuid
from pathlib import Path

from demo.chat import ChatSettings, Models, Session

LOCAL = "127.0.0.1"
MAX_PIXELS = 64_000_000  # decoded size past which an upload is refused (a decompression bomb guard)
MAX_SESSIONS = 64  # session output folders kept; the oldest is removed past this


class Demo:
    """The loaded models, one lock for every model call (they share one device: a drawing's CUDA-graph capture must
    never meet an answer), and the folder outputs go to (one sub-folder per browser session)."""

    def __init__(self, models: Models, out_dir: Path, max_sessions: int = MAX_SESSIONS):
        self.models, self.out_dir, self.max_sessions = models, out_dir, max_sessions
        self.lock = threading.Lock()
        self.folders_lock = threading.Lock()  # the list below (requests run in several threads)
        self.folders: list[Path] = []  # session folders, oldest first

    def session(self, state: Session | None) -> Session:
        """The browser session's own conversation and output folder (made on its first request; past
        max_sessions folders the oldest is removed). A session whose first request failed is lost to the page (gradio
        keeps no state from a failed call) and wrote nothing: its folder does not exist and it is dropped from the
        count, so failed requests never push a live session's outputs out."""
        if state is not None:
            return state
        folder = self.out_dir / uuid.uuid4().hex
        with self.folders_lock:
            self.folders = [f for f in self.folders if f.exists()] + [folder]
            while len(self.folders) > self.max_sessions:
                shutil.rmtree(self.folders.pop(0), ignore_errors=True)
        return Session(self.models, folder)  # drawing from the generator's recommended settings

    def forget(self, state: Session | None) -> None:
        """A browser session ended: its output folder goes."""
        if state is not None:
            shutil.rmtree(state.out_dir, ignore_errors=True)
            with self.folders_lock:
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
