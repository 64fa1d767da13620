"""Text-to-image with an exported generator: prompts -> codes (llm.sampler) -> images (the VQRAE decoder).

A generator directory (written by `train/ar_gen.py`'s export) holds:
    config.json, model.safetensors     the causal LM with the expanded vocabulary (transformers format)
    tokenizer files                    the expanded text tokenizer
    image_vocab.json                   where the code tokens live (llm.vocab.ImageVocab)
    sequence_format.json               prompt template and unconditional-prompt mode used in training
    vqrae/                             the image tokenizer export whose codes the LM predicts
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from data.atomic import atomic_write
from llm.sampler import Engine, SamplingConfig
from llm.vocab import ImageVocab, build_prompt_ids, unconditional_prompt_ids
from tokenizer import VQRAE

FORMAT_FILE = "sequence_format.json"
VQRAE_DIR = "vqrae"


def write_sequence_format(directory: Path, template: str, uncond: str) -> None:
    with atomic_write(directory / FORMAT_FILE) as f:
        json.dump({"template": template, "uncond": uncond}, f)


@dataclass
class TextToImage:
    """An exported generator ready to sample. Build with `TextToImage.from_pretrained(dir)`."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    vocab: ImageVocab
    vqrae: VQRAE
    template: str = "plain"
    uncond: str = "pad"

    def __post_init__(self) -> None:
        self.engine = Engine(self.model, self.vocab)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> TextToImage:
        directory = Path(directory)
        for needed in ("config.json", FORMAT_FILE, VQRAE_DIR):
            if not (directory / needed).exists():
                raise FileNotFoundError(f"{directory} is not a generator export (no {needed})")
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
        fmt = json.loads((directory / FORMAT_FILE).read_text())
        return cls(model=model, tokenizer=AutoTokenizer.from_pretrained(directory), vocab=ImageVocab.load(directory),
                   vqrae=VQRAE.from_pretrained(directory / VQRAE_DIR, device=device).eval(), **fmt)

    @property
    def num_tokens(self) -> int:
        return self.vqrae.config.num_tokens

    def prompt_rows(self, prompts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Conditional and unconditional prompt ids, in the format the model was trained on."""
        cond = [build_prompt_ids(self.tokenizer, p, self.template) for p in prompts]
        uncond = [unconditional_prompt_ids(self.tokenizer, c, self.vocab, self.uncond, self.template) for c in cond]
        return cond, uncond

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] and their codes (B, N) for a batch of prompts."""
        cond, uncond = self.prompt_rows(prompts)
        codes = self.engine.generate(cond, self.num_tokens, sampling, uncond if sampling.cfg_scale != 1 else None)
        images = self.vqrae.decode(codes.to(next(self.vqrae.parameters()).device))
        return images.clamp(-1, 1), codes
