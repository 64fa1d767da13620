"""The causal language model every trainer starts from: a local transformers checkpoint, or, without one (the
CPU default), a tiny random Qwen3 with a small text tokenizer trained on the run's captions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from common.config import ConfigError
from common.distributed import barrier, is_rank_zero
from llm.text_tokenizer import corpus_tokenizer
from llm.vocab import build_tiny_qwen3
from tokenizer.encoder import resolve_attn_implementation

log = logging.getLogger("vqrae")


def causal_lm(pretrained: str, tiny: dict, work_dir: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
              attn_implementation: str = "auto", texts: Sequence[str] | None = None, key: str = "lm.pretrained"
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model with fp32 weights, its tokenizer).

    Args:
        pretrained: a local causal-LM directory (e.g. Qwen3-0.6B); empty -> the tiny random Qwen3.
        tiny: overrides of llm.vocab.build_tiny_qwen3 (e.g. num_hidden_layers).
        work_dir: where the tiny LM's text tokenizer is written (rank 0 alone; the others load it after a barrier).
        seed: seed of the tiny LM's weights.
        dtype: the dtype the LM will compute in (picks the attention kernel).
        attn_implementation: "auto" or a transformers attention name.
        texts: the captions the tiny LM's tokenizer is trained on (required without `pretrained`).
        key: the config key of `pretrained`, for error messages.
    """
    attn = resolve_attn_implementation(attn_implementation, dtype)
    if pretrained:
        path = Path(pretrained)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{key}={path}: no config.json (a local causal-LM directory)")
        return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn),
                AutoTokenizer.from_pretrained(path))
    if not texts:
        raise ConfigError(f"{key} is empty and there are no captions to train a small text tokenizer on")
    log.warning("%s is empty: a tiny RANDOM Qwen3 with a text tokenizer of the captions (CPU demo)", key)
    if is_rank_zero():
        corpus_tokenizer(texts, work_dir / "text_tokenizer")
    barrier()  # two ranks replacing one folder at once would race
    tokenizer = AutoTokenizer.from_pretrained(work_dir / "text_tokenizer")
    model = build_tiny_qwen3(tokenizer, seed=seed, **tiny)
    model.config._attn_implementation = attn
    return model, tokenizer
