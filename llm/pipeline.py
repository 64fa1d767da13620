"""Text-to-image with an exported generator (llm/generator.py): prompts -> codes (llm.sampler) -> images (the
VQRAE decoder).

    t2i = TextToImage.from_pretrained("runs/tiny-ar/export")      # a generator export, or a unified one
    images, codes = t2i.generate(["a photo of a red circle"] * 4, SamplingConfig(cfg_scale=3.0))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm.generator import SequenceFormat, load_generator, require_generator_export
from llm.sampler import CodeSampler, SamplingConfig, load_recommended
from llm.vocab import ImageVocab
from tokenizer import VQRAE


@dataclass
class TextToImage:
    """A generator ready to sample. Build with `TextToImage.from_pretrained(dir)`."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    vocab: ImageVocab
    vqrae: VQRAE
    fmt: SequenceFormat = SequenceFormat()
    recommended: dict = field(default_factory=dict)  # the export's sampling settings (llm.sampler.load_recommended)

    def __post_init__(self) -> None:
        self.sampler = CodeSampler(self.model, self.vocab)

    @staticmethod
    def check(directory: str | Path) -> None:
        """One FileNotFoundError naming what `directory` lacks to draw (a generator or a unified export), before
        anything is loaded."""
        from llm.unified import is_unified_export

        if not is_unified_export(directory):
            require_generator_export(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> TextToImage:
        from llm.unified import is_unified_export, load_unified

        if is_unified_export(directory):  # drawing with the one model that also understands
            return load_unified(directory, device, dtype).text_to_image()
        model, tokenizer, vocab, fmt, vqrae = load_generator(directory, device, dtype)
        return cls(model=model, tokenizer=tokenizer, vocab=vocab, vqrae=vqrae, fmt=fmt,
                   recommended=load_recommended(directory))

    @property
    def num_tokens(self) -> int:
        return self.vqrae.config.num_tokens

    def prompt_rows(self, prompts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Conditional and unconditional prompt ids, in the format the model was trained on."""
        cond = [self.fmt.prompt_ids(self.tokenizer, p) for p in prompts]
        uncond = [self.fmt.uncond_ids(self.tokenizer, c, self.vocab) for c in cond]
        return cond, uncond

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, image_ids: Sequence[int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] and their codes (B, N) for a batch of prompts.

        Args:
            prompts: B captions.
            sampling: the sampling settings.
            image_ids: each image's random-stream id (default 0 .. B-1): the same (seed, id, prompt) gives the same
                image in any batch.
        """
        cond, uncond = self.prompt_rows(prompts)
        codes = self.sampler.generate(cond, self.num_tokens, sampling, uncond if sampling.cfg_scale != 1 else None,
                                     image_ids=image_ids)
        images = self.vqrae.decode(codes.to(next(self.vqrae.parameters()).device))
        return images.clamp(-1, 1), codes
