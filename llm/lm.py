"""The causal language model every trainer starts from: a local transformers checkpoint (Qwen3-0.6B on a cluster;
on the CPU default, the world's pretrained Qwen3 that scripts/prepare_world.py writes)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tokenizer.encoder import resolve_attn_implementation


def causal_lm(pretrained: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "auto",
              key: str = "lm.pretrained") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model with fp32 weights, its tokenizer) from a local causal-LM directory.

    Args:
        pretrained: the directory (config.json, weights, tokenizer files).
        dtype: the dtype the LM will compute in (picks the attention kernel).
        attn_implementation: "auto" or a transformers attention name.
        key: the config key of `pretrained`, for error messages.
    """
    path = Path(pretrained)
    if not pretrained or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{key}={pretrained!r}: not a local causal-LM directory (no config.json)")
    attn = resolve_attn_implementation(attn_implementation, dtype)
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn),
            AutoTokenizer.from_pretrained(path))
