"""Exports: a training checkpoint (any ZeRO stage, read on CPU) -> the folder inference reads, never a DeepSpeed
checkpoint. The tokenizer's is a `VQRAE.from_pretrained` folder; the generator's is `llm.generator`'s folder."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from common.config import from_dict
from llm.generator import load_text_side, save_generator
from llm.sampler import load_recommended
from tokenizer import VQRAE, VQRAEConfig
from train.checkpoint import consolidated_state_dict

TOKENIZER_CONFIG = "vqrae_config.json"  # the VQRAEConfig a tokenizer checkpoint was trained with
EMA_FILE = "ema.safetensors"  # EMA of the trained (requires_grad) tensors
GENERATOR_META = "generator.json"  # the LM's transformers config and the VQRAE export it learns
TEXT_SIDE = "text_tokenizer"  # the expanded text tokenizer, image vocabulary and sequence format


def find_export(path: str, is_export: Callable[[Path], bool], key: str, what: str) -> Path:
    """An export folder from a config value naming it or a run folder holding it in export/."""
    for candidate in (Path(path), Path(path) / "export"):
        if is_export(candidate):
            return candidate
    raise FileNotFoundError(f"{key}={path}: no {what} there or in its export/ folder")


def fill_from_checkpoint(model: torch.nn.Module, state: dict[str, torch.Tensor], tied: bool, checkpoint: Path,
                         base: torch.nn.Module | None = None) -> None:
    """Load a consolidated state dict into a model built on the meta device: every parameter must come from it and
    nothing else may be in it (a tied LM head is re-tied, on `base` when the model wraps one, e.g. with peft)."""
    if tied:
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    result = model.load_state_dict(state, strict=False, assign=True)
    if any(p.is_meta for p in model.parameters()):  # the head left out above (peft's trainable tokens keep it)
        (base or model).tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {checkpoint} does not fit its model config: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")


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
    fill_from_checkpoint(model, consolidated_state_dict(checkpoint, tag="model"), config.tie_word_embeddings,
                         checkpoint)
    tokenizer, vocab, fmt = load_text_side(checkpoint / TEXT_SIDE)
    save_generator(directory, model, tokenizer, vocab, fmt, meta["vqrae"], load_recommended(checkpoint / TEXT_SIDE))


LLAVA_CONFIG = "llava_config.json"  # the understanding model's LlavaConfig
PROCESSOR_DIR = "processor"  # its LlavaProcessor (tokenizer with <image>, chat template, image processor)
PROJECTOR_FILE = "projector.safetensors"  # the projector alone (LLaVA's mm_projector), fp32
LORA_CONFIG = "lora.json"  # present when the LLM trains LoRA adapters
ADAPTER_DIR = "adapter"  # the unmerged adapter of an export made with lora.merge_on_export=false


def export_understanding(checkpoint: Path, directory: Path, extra: Callable[[Path], None] | None = None) -> None:
    """Write an understanding export (llm/understanding.py's `save_llava` layout, loadable by transformers'
    LlavaForConditionalGeneration + AutoProcessor) from a checkpoint; LoRA adapters are merged into the LLM, or kept
    unmerged in directory/adapter/ (a peft adapter of the exported base model). `extra` writes more files into the
    export folder (`save_llava`)."""
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    from llm.understanding import lora_config, save_llava

    config = LlavaConfig.from_dict(json.loads((checkpoint / LLAVA_CONFIG).read_text()))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    lora = json.loads((checkpoint / LORA_CONFIG).read_text()) if (checkpoint / LORA_CONFIG).is_file() else None
    base = None
    if lora is not None:
        from peft import get_peft_model

        base = model
        model = get_peft_model(model, lora_config(lora["r"], lora["alpha"], lora["dropout"], lora["target_modules"],
                                                  lora.get("trainable_tokens"), config.tie_word_embeddings))
    fill_from_checkpoint(model, consolidated_state_dict(checkpoint, tag="model"), config.tie_word_embeddings,
                         checkpoint, base)
    processor = AutoProcessor.from_pretrained(checkpoint / PROCESSOR_DIR)
    if lora is not None and not lora["merge"]:
        with tempfile.TemporaryDirectory() as adapter:
            model.save_pretrained(adapter)  # the adapter alone, before unloading removes it

            def write(tmp: Path) -> None:
                shutil.copytree(adapter, tmp / ADAPTER_DIR)
                if extra is not None:
                    extra(tmp)

            save_llava(model.unload(), processor, directory, write)
        return
    save_llava(model.merge_and_unload() if lora is not None else model, processor, directory, extra)


UNIFIED_META = "unified.json"  # a unified model's image vocabulary, sequence format and VQRAE export


def export_unified(checkpoint: Path, directory: Path) -> None:
    """Write a unified export (llm/unified.py's layout) from a unified checkpoint."""
    from llm.generator import SequenceFormat
    from llm.unified import unified_files
    from llm.vocab import ImageVocab

    meta = json.loads((checkpoint / UNIFIED_META).read_text())
    export_understanding(checkpoint, directory, unified_files(ImageVocab(**meta["vocab"]),
                                                              SequenceFormat(**meta["format"]), meta["vqrae"],
                                                              meta.get("sampling")))
