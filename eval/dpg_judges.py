"""The judges DPG-Bench scoring asks its questions through (eval/dpg_scoring.py), behind one small interface:
`judge.answer(images, questions) -> answers`, one (image, question) pair each.

- LlavaJudge: any LLaVA-format transformers export from a local path (this project's understanding export, a
  llava-hf checkpoint), greedy, with LLaVA-1.5's short-answer instruction, batched.
- ShapesJudge ("shapes-exact"): the shapes world's exact judge: each proposition tuple of the world's DPG set
  (data/shapes_dpg.py) checked on the world's exact detector by GenEval's own rules (eval/geneval_scoring.py), so
  a real rendered image answers yes to every question and a blank one no.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from eval.dpg_scoring import Question

_TUPLE = re.compile(r"^(?P<category>[a-z]+ - [a-z]+) \((?P<args>[^()]*)\)$")


class Judge(Protocol):
    name: str

    def answer(self, images: Sequence[Image.Image], questions: Sequence[Question]) -> list[str]:
        """One answer per (image, question) pair."""
        ...


class LlavaJudge:
    """A LLaVA-format export answering each question on its image (greedy, short answers)."""

    def __init__(self, directory: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 32, max_new_tokens: int = 4):
        from llm.understanding import load_llava

        self.model, self.processor = load_llava(directory, device, dtype)
        self.name = f"llava:{Path(directory).resolve()}"
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def answer(self, images: Sequence[Image.Image], questions: Sequence[Question]) -> list[str]:
        from llm.understanding import answer

        out: list[str] = []
        for s in range(0, len(images), self.batch_size):
            out += answer(self.model, self.processor, list(images[s : s + self.batch_size]),
                          [q.text for q in questions[s : s + self.batch_size]], self.max_new_tokens, short=True)
        return out


class ShapesJudge:
    """The shapes world's exact judge (see the module docstring); refuses a proposition it does not know."""

    name = "shapes-exact"

    def __init__(self):
        from eval.shapes_detector import ShapesDetector

        self.detector = ShapesDetector()

    def answer(self, images: Sequence[Image.Image], questions: Sequence[Question]) -> list[str]:
        from eval.geneval_scoring import score_image

        detections: dict[int, dict] = {}
        out = []
        for image, question in zip(images, questions, strict=True):
            if id(image) not in detections:
                detections[id(image)] = self.detector.detect(image)
            record = geneval_record(question)
            correct, _ = score_image(record, detections[id(image)],
                                     lambda name, dets, im=image: self.detector.classify_colors(im, name, dets))
            out.append("yes" if correct else "no")
        return out


def geneval_record(question: Question) -> dict:
    """The GenEval prompt record whose truth is the proposition's (the world's four proposition kinds)."""
    match = _TUPLE.match(question.tuple.strip())
    args = [a.strip() for a in match.group("args").split(",")] if match else []
    kind = match.group("category") if match else None
    if kind == "entity - whole" and len(args) == 1:
        return {"tag": "single_object", "prompt": question.text, "include": [{"class": args[0], "count": 1}]}
    if kind == "other - count" and len(args) == 2 and args[1].startswith("==") and args[1][2:].isdigit():
        n = int(args[1][2:])
        return {"tag": "counting", "prompt": question.text, "include": [{"class": args[0], "count": n}],
                "exclude": [{"class": args[0], "count": n + 1}]}
    if kind == "attribute - color" and len(args) == 2:
        return {"tag": "colors", "prompt": question.text,
                "include": [{"class": args[0], "count": 1, "color": args[1]}]}
    if kind == "relation - spatial" and len(args) == 3:
        return {"tag": "position", "prompt": question.text,
                "include": [{"class": args[1], "count": 1}, {"class": args[0], "count": 1, "position": [args[2], 0]}]}
    raise ValueError(f"the shapes judge knows the world's propositions only, not {question.tuple!r}")
