"""Exports: a training checkpoint (any ZeRO stage, read on CPU) -> the folder inference reads, never a DeepSpeed
checkpoint. The tokenizer's is a `VQRAE.from_pretrained` folder; the generator's is `llm.generator`'s folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from common.config import from_dict
from llm.generator import load_text_side, save_generator
from tokenizer import VQRAE, VQRAEConfig
from train.checkpoint import consolidated_state_dict

TOKENIZER_CONFIG = "vqrae_config.json"  # the VQRAEConfig a tokenizer checkpoint was trained with
EMA_FILE = "ema.safetensors"  # EMA of the trained (requires_grad) tensors
GENERATOR_META = "generator.json"  # the LM's transformers config and the VQRAE export it learns
TEXT_SIDE = "text_tokenizer"  # the expanded text tokenizer, image vocabulary and sequence format


def export_tokenizer(checkpoint: Path, directory: Path, weights: str = "ema") -> None:
    """Write a `VQRAE.from_pretrained` directory from a tokenizer checkpoint.

    Args:
        checkpoint: a checkpoints/step_* folder. directory: the export folder (written atomically).
        weights: "ema" (the EMA of every trained tensor; frozen ones as they are) or "raw".
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    config = from_dict(VQRAEConfig, json.loads((checkpoint / TOKENIZER_CONFIG).read_text()))
    with torch.device("meta"):
        model = VQRAE(config)
    state = consolidated_state_dict(checkpoint, tag="model")
    if weights == "ema":
        ema = load_file(str(checkpoint / EMA_FILE))
        unknown = sorted(set(ema) - set(state))
        if unknown:
            raise ValueError(f"{checkpoint / EMA_FILE} holds tensors the model does not have, e.g. {unknown[:3]}")
        state.update(ema)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    model.save_pretrained(directory)


def export_generator(checkpoint: Path, directory: Path) -> None:
    """Write a generator directory (llm/generator.py's layout) from a generator checkpoint."""
    meta = json.loads((checkpoint / GENERATOR_META).read_text())
    config = AutoConfig.for_model(**meta["hf_config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = consolidated_state_dict(checkpoint, tag="model")
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {checkpoint} does not fit its LM config: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    tokenizer, vocab, fmt = load_text_side(checkpoint / TEXT_SIDE)
    save_generator(directory, model, tokenizer, vocab, fmt, meta["vqrae"])
