"""The chat's logic: the exports it loads (`Models`), one conversation (`Session`: answering, drawing,
reconstructing, settings), the drawing rule, and the transcript loop. The commands and rules users see are documented
in `HELP` (what `/help` prints and scripts/chat.py, the command that runs it, shows under --help); demo/web.py serves
the same sessions as a web page.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import TextStreamer

from common.cli import DTYPES, default_device, dtype_of
from common.config import ConfigError, apply_overrides, to_dict
from common.files import atomic_write
from data.transforms import adm_center_crop, pil_to_tensor, to_pil, to_rgb, to_uint8
from eval.metrics import psnr
from llm.sampler import SamplingConfig

REPO = Path(__file__).resolve().parents[1]
HELP = """\
A message is a question about the attached image (the conversation's history is kept; the image goes into the first
question only, as LLaVA's CLI does; a message with no image attached is a text-only question), or a command:

    /image PATH         attach an image and start a new conversation (a message starting with an image path does too)
    /draw PROMPT        generate draw.count images of PROMPT, save PNGs, print their paths
    /reconstruct PATH   image -> codes -> image: save the round trip, print PSNR and the number of codes
    /settings [k=v ..]  show or change settings: answer.temperature (0 = greedy), answer.top_p,
                        answer.max_new_tokens; draw.cfg_scale, draw.temperature, draw.top_k, draw.top_p, draw.seed,
                        draw.count, draw.spec_window, draw.spec_init
    /reset              forget the image and the history
    /help, /quit        (an empty line or end of input quits too)

Drawing requests in plain words: a message that is not a question (no "?" in it) starting with "draw" or
"paint" (optionally "me", then "an image of", "a picture of" or "a drawing of"), or with "generate" or "create"
followed by one of those three, is `/draw` of the rest ("draw a photo of a red circle" -> "a photo of a red
circle"; "generate an image of two squares" -> "two squares"; "Create a caption for this image" is a question).
Drawing uses the generator export's recommended sampling settings (its sampling.json: what it was tuned and
reported with) unless draw.* settings say otherwise.
"""
DEFAULTS = {"und": REPO / "runs" / "tiny-und-stage2" / "export", "gen": REPO / "runs" / "tiny-ar" / "export"}
MAKES = {"und": "deepspeed train/understanding.py, then its stage 2 (train/configs/understanding/tiny-stage2.yaml)",
         "gen": "deepspeed train/ar_gen.py", "tok": "deepspeed train/tokenizer.py"}
KIND_NAMES = {"und": "an understanding", "gen": "a generator", "tok": "a VQRAE"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_OF_AN_IMAGE = r"(?:an?\s+)?(?:image|picture|drawing)\s+of\s+"
DRAW_REQUEST = re.compile(r"^\s*(?:please\s+)?(?:(?:draw|paint)\s+(?:me\s+)?(?:" + _OF_AN_IMAGE + r")?"
                          r"|(?:generate|create)\s+(?:me\s+)?" + _OF_AN_IMAGE + r")(?P<prompt>[^?]*[^?\s])\s*$",
                          re.IGNORECASE)


@dataclass
class AnswerSettings:
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ConfigError("answer.temperature must be >= 0, answer.top_p in (0, 1], answer.max_new_tokens >= 1")


@dataclass(frozen=True)
class DrawSettings(SamplingConfig):
    count: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.count <= 64:
            raise ConfigError(f"draw.count must be in 1..64, got {self.count}")


@dataclass
class ChatSettings:
    answer: AnswerSettings = field(default_factory=AnswerSettings)
    draw: DrawSettings = field(default_factory=DrawSettings)

    @classmethod
    def for_models(cls, models: Models) -> ChatSettings:
        """The defaults, drawing with the generator's recommended sampling settings (when it has them)."""
        recommended = models.gen.recommended if models.gen is not None else {}
        return cls(draw=DrawSettings(**recommended))


def default_export(key: str) -> Path | None:
    """The CPU default's export for --und / --gen when it exists (else that part is not loaded)."""
    path = DEFAULTS.get(key)
    return path if path is not None and path.is_dir() else None


def draw_prompt(message: str) -> str | None:
    """The prompt of a drawing request in plain words (the rule in `HELP`), else None."""
    match = DRAW_REQUEST.match(message)
    return match.group("prompt").strip() if match else None


def read_image(path: str | Path) -> Image.Image:
    """An image file as RGB, or one clear error; one of more pixels than PIL's MAX_IMAGE_PIXELS is refused (PIL
    itself only warns below twice that)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no image file {path}")
    try:
        with Image.open(path) as image:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and image.width * image.height > limit:
                raise ValueError(f"{path} is too large an image ({image.width}x{image.height} pixels, more than "
                                 f"{limit})")
            return to_rgb(image.copy())
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path} is too large an image ({e})") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e.__class__.__name__})") from e


class Streamer(TextStreamer):
    """transformers' TextStreamer writing the answer's text to `sink` as it is generated."""

    def __init__(self, tokenizer, sink: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.sink = sink

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.sink(text)


class Models:
    """The exports a chat uses, each loaded once: understanding (LLaVA), generator (with its VQRAE), and the VQRAE
    that reconstructs (the generator's own unless another is given)."""

    def __init__(self, und: Path | None, gen: Path | None, tok: Path | None, device: str, dtype: torch.dtype):
        from llm.generator import FORMAT_FILE
        from llm.understanding import is_llava_export
        from llm.unified import is_unified_export, load_answerer, load_unified
        from tokenizer.model import VQRAE, is_vqrae_export

        self.und = self.gen = self.vqrae = None
        for key, path in (("und", und), ("gen", gen), ("tok", tok)):
            if path is not None and not Path(path).is_dir():
                raise FileNotFoundError(f"--{key} {path}: no such directory (make it with: {MAKES[key]})")
        kinds = {"und": is_llava_export, "gen": lambda p: (Path(p) / FORMAT_FILE).is_file(), "tok": is_vqrae_export}
        for key, path in (("und", und), ("gen", gen), ("tok", tok)):
            if path is not None and not kinds[key](path):
                found = [f"--{k}" for k, is_kind in kinds.items() if is_kind(path)]
                raise ConfigError(f"--{key} {path} is not {KIND_NAMES[key]} export"
                                  + (f" (it is one for {found[0]})" if found else ""))
        if und is not None and gen is not None and Path(und).resolve() == Path(gen).resolve() and \
                is_unified_export(und):  # one model answers and draws: loaded once
            unified = load_unified(und, device, dtype)
            self.und = (unified.llava, unified.processor, unified.inputs_hook())
            self.gen, self.vqrae = unified.text_to_image(), unified.vqrae
            und = gen = None
        if und is not None:
            self.und = load_answerer(und, device, dtype)
        if gen is not None:
            from llm.pipeline import TextToImage

            self.gen = TextToImage.from_pretrained(gen, device=device, dtype=dtype)
            self.vqrae = self.gen.vqrae
        if tok is not None:
            self.vqrae = VQRAE.from_pretrained(tok, device=device).eval()

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> Models:
        """The exports `add_model_arguments` named (the CPU default's where not given), in the dtype it chose."""
        given = {k: args.model if args.model is not None and k != "tok" else getattr(args, k) for k in KIND_NAMES}
        if args.model is not None:
            from llm.unified import is_unified_export

            if args.und or args.gen:
                raise ConfigError("--model names the one model that answers and draws: give it without --und / --gen")
            if not is_unified_export(args.model):
                raise ConfigError(f"--model {args.model} is not a unified export (make one with: deepspeed "
                                  "train/unified.py); give an understanding export as --und, a generator's as --gen")
        paths = {k: given[k] if given[k] is not None else default_export(k) for k in KIND_NAMES}
        dtype = dtype_of(args.dtype or ("bf16" if args.device == "cuda" else "fp32"))
        return cls(paths["und"], paths["gen"], paths["tok"], args.device, dtype)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --und, --gen, --tok, --device, --dtype (bf16 on cuda, fp32 on cpu by default); read with
    `Models.from_arguments`."""
    parser.add_argument("--model", type=Path, default=None, help="a unified export (train/unified.py): the one model "
                        "that answers and draws, loaded once")
    parser.add_argument("--und", type=Path, default=None, help=f"understanding export (default {DEFAULTS['und']})")
    parser.add_argument("--gen", type=Path, default=None, help=f"generator export (default {DEFAULTS['gen']})")
    parser.add_argument("--tok", type=Path, default=None, help="VQRAE export that reconstructs (default: the "
                        "generator's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device())
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")


class Session:
    """One conversation: the attached image, the history, the settings; `handle(line)` runs one turn and returns its
    record (None once the user quits). Answer text goes to `sink` as it streams."""

    def __init__(self, models: Models, out_dir: Path, settings: ChatSettings | None = None,
                 sink: Callable[[str], None] | None = None):
        self.models, self.out_dir = models, out_dir
        self.settings = settings or ChatSettings.for_models(models)
        self.sink = sink or (lambda text: None)
        self.image: Image.Image | None = None
        self.image_path: str | None = None
        self.messages: list[dict] = []
        self.turn = 0

    # -- commands ---------------------------------------------------------------------------------------------
    def handle(self, line: str) -> dict[str, Any] | None:
        line = line.strip()
        if not line or line in ("/quit", "/exit"):
            return None
        start = time.perf_counter()
        self.turn += 1
        try:
            record = self._dispatch(line)
        except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
            record = {"kind": "error", "text": str(e).splitlines()[0] if str(e) else e.__class__.__name__}
        record["seconds"] = round(time.perf_counter() - start, 3)
        return record

    def _dispatch(self, line: str) -> dict[str, Any]:
        first, _, question = line.partition(" ")
        if first.lower().endswith(IMAGE_SUFFIXES):  # an image path (absolute ones start with "/" too)
            record = self.attach(first)
            return self.ask(question.strip()) if question.strip() else record
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            rest = rest.strip()
            handlers = {"/image": self.attach, "/draw": self.draw, "/reconstruct": self.reconstruct,
                        "/settings": self.change_settings, "/reset": lambda _: self.reset(), "/help": self.help}
            if command not in handlers:
                raise ValueError(f"unknown command {command} (/help lists them)")
            if command in ("/image", "/draw", "/reconstruct") and not rest:
                raise ValueError(f"{command} needs an argument (/help)")
            return handlers[command](rest)
        prompt = draw_prompt(line)
        return self.draw(prompt) if prompt is not None else self.ask(line)

    def help(self, _: str = "") -> dict[str, Any]:
        return {"kind": "help", "text": HELP.strip()}

    def reset(self) -> dict[str, Any]:
        self.image = self.image_path = None
        self.messages = []
        return {"kind": "reset", "text": "new conversation"}

    def attach(self, path: str) -> dict[str, Any]:
        image = read_image(path)
        self.reset()
        self.image, self.image_path = image, str(path)
        return {"kind": "image", "text": f"attached {path} ({image.width}x{image.height}); new conversation",
                "path": str(path)}

    def ask(self, question: str) -> dict[str, Any]:
        from llm.understanding import reply, user_turn

        if self.models.und is None:
            raise ValueError(f"no understanding model loaded (--und; make one with: {MAKES['und']})")
        model, processor, hook = self.models.und
        turn = user_turn(question, with_image=self.image is not None and not self.messages)
        s = self.settings.answer
        text = reply(model, processor, [*self.messages, turn], self.image, s.max_new_tokens, s.temperature, s.top_p,
                     streamer=Streamer(processor.tokenizer, self.sink), hook=hook)
        self.messages += [turn, {"role": "assistant", "content": [{"type": "text", "text": text}]}]
        return {"kind": "answer", "text": text, "image": self.image_path, "turns": len(self.messages) // 2}

    def draw(self, prompt: str) -> dict[str, Any]:
        if self.models.gen is None:
            raise ValueError(f"no generator loaded (--gen; make one with: {MAKES['gen']})")
        s = self.settings.draw
        images, _ = self.models.gen.generate([prompt] * s.count, s)
        paths = []
        for i, image in enumerate(images.float().cpu()):
            path = self.out_dir / f"draw-{self.turn:04d}-{i}.png"
            with atomic_write(path, "wb") as f:
                to_pil(image).save(f, format="PNG")
            paths.append(str(path))
        return {"kind": "draw", "prompt": prompt, "paths": paths,
                "text": f"drew {len(paths)} image(s) of {prompt!r}: " + " ".join(paths)}

    @torch.no_grad()
    def reconstruct(self, path: str) -> dict[str, Any]:
        vqrae = self.models.vqrae
        if vqrae is None:
            raise ValueError(f"no VQRAE loaded (--tok or --gen; make one with: {MAKES['tok']})")
        size = vqrae.config.encoder.image_size
        original = adm_center_crop(read_image(path), size)
        param = next(vqrae.parameters())
        codes = vqrae.encode(pil_to_tensor(original)[None].to(param.device, param.dtype)).indices
        rebuilt = to_uint8(vqrae.decode(codes).float().clamp(-1, 1)).cpu()[0]
        target = torch.from_numpy(np.array(original)).permute(2, 0, 1)
        out = self.out_dir / f"reconstruct-{self.turn:04d}.png"
        with atomic_write(out, "wb") as f:
            Image.fromarray(rebuilt.permute(1, 2, 0).numpy()).save(f, format="PNG")
        value = float(psnr(rebuilt.double() / 255, target.double() / 255))
        return {"kind": "reconstruct", "paths": [str(out)], "psnr": round(value, 4), "codes": int(codes.numel()),
                "codebook_size": vqrae.config.quantizer.codebook_size,
                "text": f"{out}: {size}x{size}, {codes.numel()} codes of {vqrae.config.quantizer.codebook_size}, "
                        f"PSNR {value:.2f} dB"}

    def change_settings(self, items: str) -> dict[str, Any]:
        if items:
            self.settings = apply_overrides(self.settings, items.split())
        flat = {f"{section}.{k}": v for section, values in to_dict(self.settings).items() for k, v in values.items()
                if k not in ("backend", "cuda_graph", "compile")}
        return {"kind": "settings", "settings": flat, "text": " ".join(f"{k}={v}" for k, v in flat.items())}


# ----------------------------------------------------------------------------------------------- the loop


def chat(session: Session, lines, out: TextIO, as_json: bool, interactive: bool) -> None:
    """Run turns from `lines` until one quits; print each record (text, or one JSON object a line)."""
    streamed: list[str] = []

    def sink(text: str) -> None:  # answers stream to the terminal in text mode
        streamed.append(text)
        if not as_json:
            out.write(text)
            out.flush()

    session.sink = sink
    for line in lines:
        streamed.clear()
        if not as_json and not interactive:  # a transcript shows what was asked
            out.write(f">>> {line.strip()}\n")
        record = session.handle(line)
        if record is None:
            break
        if as_json:
            out.write(json.dumps(record) + "\n")
        elif record["kind"] == "answer":
            out.write("\n" if streamed else record["text"] + "\n")
        else:
            out.write(("error: " if record["kind"] == "error" else "") + record["text"] + "\n")
        out.flush()


def input_lines(prompt: str):
    """Lines typed at a terminal (readline editing and history) until end of input."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
            return
