"""Caption + code sequences for next-token training of the generator (format defined once in llm/vocab.py).

Each item is prompt + <|image_start|> + H*W code tokens + <|image_end|>, with labels only on the codes and the end
token; with probability `caption_dropout` the prompt is the unconditional one the sampler uses for CFG. The drop
decision is seeded by (seed, epoch, index), so a resumed run draws the same drops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from common.config import ConfigError
from data.codes import CodeDataset
from data.keys import epoch_and_index
from data.transforms import sample_seed
from llm.generator import SequenceFormat
from llm.vocab import (
    IGNORE_INDEX,
    ImageVocab,
    build_sequence,
    caption_problem,
)


class CaptionCodeSequences(torch.utils.data.Dataset):
    """Args:
    codes: extracted codes + captions. tokenizer: the expanded text tokenizer. vocab: its image vocabulary.
    fmt: the sequence format (llm.generator.SequenceFormat, pinned; the sampler's must be the same). caption_dropout:
    probability of the unconditional prompt. seed: the run's data seed.
    """

    def __init__(self, codes: CodeDataset, tokenizer: PreTrainedTokenizerBase, vocab: ImageVocab,
                 fmt: SequenceFormat = SequenceFormat(), caption_dropout: float = 0.1, seed: int = 0):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if codes.codebook_size != vocab.codebook_size:
            raise ValueError(f"codes use {codes.codebook_size} codes but the vocabulary has {vocab.codebook_size}")
        self.codes, self.tokenizer, self.vocab = codes, tokenizer, vocab
        self.fmt, self.dropout, self.seed = fmt, caption_dropout, seed
        self._check_captions()

    def _check_captions(self) -> None:
        """Refuse, before training starts, a caption the sequence format would refuse at its step: one holding an
        image-token or special-token string (every such string contains "<|" or is special to this tokenizer)."""
        markers = {"<|", *(t for t in self.tokenizer.all_special_tokens if t and "<|" not in t)}
        for marker in sorted(markers):
            for i in self.codes.captions.containing(marker):
                problem = caption_problem(self.codes.captions[i], self.tokenizer)
                if problem:
                    raise ConfigError(f"{self.codes.directory}: row {i} (dataset index {self.codes.indices[i]}): "
                                      f"{problem}; fix the captions and extract the codes again")

    def __len__(self) -> int:
        return len(self.codes)

    def dropped(self, epoch: int, index: int) -> bool:
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
        return bool(rng.random() < self.dropout)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = epoch_and_index(key)
        row = self.codes[i]
        prompt = self.fmt.prompt_ids(self.tokenizer, row["caption"])
        drop = self.dropped(epoch, i)
        if drop:
            prompt = self.fmt.uncond_ids(self.tokenizer, prompt, self.vocab)
        input_ids, labels = build_sequence(prompt, row["codes"], self.vocab)
        return {"input_ids": input_ids, "labels": labels, "dropped": drop, "caption": row["caption"]}


def collate_sequences(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest sequence: pad ids with attention 0 and label -100."""
    length = max(s["input_ids"].numel() for s in samples)
    b = len(samples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.long)
    for row, s in enumerate(samples):
        n = s["input_ids"].numel()
        input_ids[row, :n], labels[row, :n], mask[row, :n] = s["input_ids"], s["labels"], 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
            "dropped": sum(s["dropped"] for s in samples), "captions": [s["caption"] for s in samples]}
