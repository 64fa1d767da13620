"""The sample grids of the trainers that draw (the generator, the unified model): every run.sample_every steps a few
prompts are sampled with explicit settings and decoded by the VQRAE into a PNG grid in the run folder."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data.transforms import make_grid_png
from llm.fused import has_peft_adapters
from llm.generator import SequenceFormat
from llm.sampler import CodeSampler, SamplingConfig
from llm.vocab import ImageVocab
from tokenizer import VQRAE


@dataclass
class SampleSection:
    """Prompts sampled into a PNG grid every run.sample_every steps, with these explicit settings."""

    prompts: tuple[str, ...] = ("a photo of a red circle", "a photo of two squares",
                                "a photo of a triangle left of a circle",
                                "a photo of a blue square and a yellow circle")
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=3.0))


class SampleGrid:
    """Draws `section`'s prompts with a causal LM holding `vocab`; keeps the sampler between calls."""

    def __init__(self, section: SampleSection, tokenizer: PreTrainedTokenizerBase, vocab: ImageVocab,
                 fmt: SequenceFormat, vqrae: VQRAE):
        self.section, self.vocab, self.vqrae = section, vocab, vqrae
        self.cond = [fmt.prompt_ids(tokenizer, p) for p in section.prompts]
        self.uncond = [fmt.uncond_ids(tokenizer, c, vocab) for c in self.cond]
        self.sampler: CodeSampler | None = None

    @torch.no_grad()
    def write(self, model: PreTrainedModel, path: Path | None, zero3: bool) -> None:
        """Sample on every rank (under ZeRO-3 the weights are gathered collectively); the rank given a `path`
        decodes and writes the grid there. `model` is put back in train mode."""
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters())) if zero3 else contextlib.nullcontext()
        sampling = self.section.sampling
        if has_peft_adapters(model):  # transformers' forward applies the adapters, the fused decode step would not
            sampling = dataclasses.replace(sampling, backend="hf")
        model.eval()
        with gather:
            if self.sampler is None:
                self.sampler = CodeSampler(model, self.vocab)
            codes = self.sampler.generate(self.cond, self.vqrae.config.num_tokens, sampling, self.uncond)
        model.train()
        if path is not None:
            images = self.vqrae.decode(codes.to(next(self.vqrae.parameters()).device)).clamp(-1, 1)
            make_grid_png([images.cpu()], path, min_cell=128)
