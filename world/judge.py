"""The shapes world's exact DPG-Bench judge ("shapes-exact"): each proposition tuple of the world's DPG set
(world/dpg.py) checked on the world's exact detector (world/detector.py) by GenEval's own rules
(eval/geneval_scoring.py), so a real rendered image answers yes to every question and a blank one no. DPG-Bench
scoring (eval/dpg_bench.py) finds it as the judge named "shapes" (pyproject.toml's "vqrae.dpg_judges" entry points).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import Image

from eval.dpg_scoring import Question
from eval.geneval_scoring import score_image
from world.detector import ShapesDetector

_TUPLE = re.compile(r"^(?P<category>[a-z]+ - [a-z]+) \((?P<args>[^()]*)\)$")


class ShapesJudge:
    """The shapes world's exact judge (see the module docstring); refuses a proposition it does not know."""

    name = "shapes-exact"

    def __init__(self):
        self.detector = ShapesDetector()

    def answer(self, images: Sequence[Image.Image], questions: Sequence[Question]) -> list[str]:
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
