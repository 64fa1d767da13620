"""The judges DPG-Bench scoring asks its questions through (eval/dpg_scoring.py), behind one small interface:
`judge.answer(images, questions) -> answers`, one (image, question) pair each.

- LlavaJudge: any LLaVA-format transformers export from a local path (this project's understanding export, a
  llava-hf checkpoint), greedy, with LLaVA-1.5's short-answer instruction, batched.
- any judge a package declares under the "vqrae.dpg_judges" entry-point group (`load_judge`), e.g. the shapes
  world's exact judge (world/judge.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from eval.dpg_scoring import Question

JUDGE_PLUGINS = "vqrae.dpg_judges"  # entry-point group: name -> a Judge class built without arguments


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
