"""The generator: a causal LM whose vocabulary is expanded by a VQRAE tokenizer's codes. How it is built for
training (`LMConfig`, `build_lm`), and the one pair of functions that write and read its export folder:

    DIR/config.json, model.safetensors     the causal LM with the expanded vocabulary (transformers format)
    DIR/tokenizer files                    the expanded text tokenizer
    DIR/image_vocab.json                   where the code tokens live (llm.vocab.ImageVocab)
    DIR/sequence_format.json               the prompt format used in training (template, its pinned chat template,
                                           unconditional-prompt mode)
    DIR/vqrae/                             the image tokenizer export whose codes the LM predicts
    DIR/sampling.json                      the sampling settings it was tuned and reported with (llm/sampler.py)

    save_generator(DIR, model, tokenizer, vocab, SequenceFormat("chat", "pad"), vqrae_dir)
    model, tokenizer, vocab, fmt, vqrae = load_generator(DIR, device="cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from common.config import ConfigError
from common.files import atomic_directory, atomic_write
from llm.lm import causal_lm
from llm.sampler import save_recommended
from llm.vocab import (
    FALLBACK_CHAT,
    TEMPLATES,
    UNCOND_MODES,
    ImageVocab,
    build_prompt_ids,
    expand_vocabulary,
    unconditional_prompt_ids,
)
from tokenizer import VQRAE

FORMAT_FILE = "sequence_format.json"
IMAGE_INPUTS = ("features", "codes")
VQRAE_DIR = "vqrae"


@dataclass
class LMConfig:
    """Args:
    pretrained: local causal-LM directory (Qwen3-0.6B; the CPU default: the world's Qwen3, runs/world/qwen3).
    init: new embedding rows from the "mean" of the text rows or from the "codebook" (projected).
    template: prompt format "plain" | "chat". uncond: unconditional prompt "pad" (Janus) | "empty".
    gradient_checkpointing: recompute the LM's layers in the backward pass.
    attn_implementation: "auto" (flash-attention for bf16 weights on CUDA when installed, else sdpa), or a
        transformers attention name.
    """

    pretrained: str = ""
    init: str = "mean"
    template: str = "plain"
    uncond: str = "pad"
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"

    @property
    def sequence_format(self) -> SequenceFormat:
        return SequenceFormat(self.template, self.uncond)


@dataclass(frozen=True)
class SequenceFormat:
    """How prompts are built: template "plain" | "chat", unconditional prompt "pad" | "empty" (llm/vocab.py); for
    template "chat", the chat template it renders with, pinned when training starts (`pinned`) so that an export whose
    tokenizer later carries another template (a unified model's LLaVA one) still builds the training prompts (None:
    not pinned, the tokenizer's own); and, for a unified model (llm/unified.py), how an image enters a conversation:
    "features" (continuous, through the projector) or "codes" (its code tokens in the image tokens' places)."""

    template: str = "plain"
    uncond: str = "pad"
    image_input: str = "features"
    chat_template: str | None = None

    def pinned(self, chat_template: str | None) -> SequenceFormat:
        """This format with its chat template fixed (template "chat" only; one already pinned is kept): the one
        prompts render with given a tokenizer whose template is `chat_template` (`llm.vocab.prompt_chat_template`)."""
        if self.template != "chat" or self.chat_template is not None:
            return self
        return replace(self, chat_template=chat_template or FALLBACK_CHAT)

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, caption: str) -> list[int]:
        """The conditional prompt of `caption` (`llm.vocab.build_prompt_ids`)."""
        return build_prompt_ids(tokenizer, caption, self.template, self.chat_template)

    def uncond_ids(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], vocab: ImageVocab) -> list[int]:
        """The unconditional prompt paired with `prompt_ids` (`llm.vocab.unconditional_prompt_ids`)."""
        return unconditional_prompt_ids(tokenizer, prompt_ids, vocab, self.uncond, self.template, self.chat_template)

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES or self.uncond not in UNCOND_MODES or self.image_input not in IMAGE_INPUTS:
            raise ConfigError(f"sequence format needs template in {TEMPLATES}, uncond in {UNCOND_MODES} and "
                              f"image_input in {IMAGE_INPUTS}, got {self.template!r}, {self.uncond!r}, "
                              f"{self.image_input!r}")

    def save(self, directory: Path) -> None:
        """Write sequence_format.json into `directory` (atomically)."""
        with atomic_write(Path(directory) / FORMAT_FILE) as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, directory: Path) -> SequenceFormat:
        """Read sequence_format.json from `directory`."""
        path = Path(directory) / FORMAT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {FORMAT_FILE}")
        return cls(**json.loads(path.read_text()))


def build_lm(cfg: LMConfig, vqrae: VQRAE, seed: int = 0, dtype: torch.dtype = torch.float32
             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ImageVocab]:
    """(model, tokenizer, vocab): the LM (fp32 weights, train mode) with its vocabulary expanded by `vqrae`'s codes.

    Args:
        cfg: the LM section.
        vqrae: the image tokenizer (its codebook size, and its codebook for init "codebook").
        seed: seed of the codebook projection.
        dtype: the dtype the LM will compute in (picks the attention kernel).
    """
    model, tokenizer = causal_lm(cfg.pretrained, dtype, cfg.attn_implementation)
    codebook = vqrae.quantizer.effective_codebook().detach() if cfg.init == "codebook" else None
    vocab = expand_vocabulary(model, tokenizer, vqrae.config.quantizer.codebook_size, init=cfg.init,
                              codebook=codebook, seed=seed)
    return model.train(), tokenizer, vocab


def save_text_side(directory: Path, tokenizer: PreTrainedTokenizerBase, vocab: ImageVocab,
                   fmt: SequenceFormat) -> None:
    """The expanded text tokenizer, its image vocabulary and the sequence format, into `directory`."""
    tokenizer.save_pretrained(directory)
    vocab.save(directory)
    fmt.save(directory)


def load_text_side(directory: Path) -> tuple[PreTrainedTokenizerBase, ImageVocab, SequenceFormat]:
    """What `save_text_side` wrote; the tokenizer must hold the vocabulary's tokens at its ids."""
    if not (directory / FORMAT_FILE).is_file():
        raise FileNotFoundError(f"{directory} has no {FORMAT_FILE}: not a generator's text side")
    tokenizer, vocab = AutoTokenizer.from_pretrained(directory), ImageVocab.load(directory)
    vocab.check_tokenizer(tokenizer)
    return tokenizer, vocab, SequenceFormat.load(directory)


def save_generator(directory: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   vocab: ImageVocab, fmt: SequenceFormat, vqrae_dir: str | Path, recommended: dict | None = None
                   ) -> None:
    """Write a generator export folder (see the module docstring) atomically; `vqrae_dir` is copied into it;
    `recommended`: its sampling settings (`llm.sampler.recommended_settings`)."""
    if not (Path(vqrae_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{vqrae_dir} is not a VQRAE export (no config.json)")
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        save_text_side(tmp, tokenizer, vocab, fmt)
        if recommended:
            save_recommended(tmp, recommended)
        shutil.copytree(vqrae_dir, tmp / VQRAE_DIR)


def require_generator_export(directory: str | Path) -> None:
    """One FileNotFoundError naming what `directory` lacks to be a generator export (nothing when it is one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no generator export at {directory} (train/ar_gen.py writes one)")
    for needed in ("config.json", FORMAT_FILE, VQRAE_DIR):
        if not (directory / needed).exists():
            raise FileNotFoundError(f"{directory} is not a generator export (no {needed})")


def load_generator(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                   ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ImageVocab, SequenceFormat, VQRAE]:
    """Read a generator export folder: (model in eval mode, tokenizer, vocab, sequence format, VQRAE)."""
    directory = Path(directory)
    require_generator_export(directory)
    tokenizer, vocab, fmt = load_text_side(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    vqrae = VQRAE.from_pretrained(directory / VQRAE_DIR, device=device).eval()
    return model, tokenizer, vocab, fmt, vqrae
