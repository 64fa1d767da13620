"""One model that understands and draws through the one tokenizer: the understanding model (a transformers LLaVA:
VQRAE tower -> mlp2x_gelu projector -> LM) whose LM's vocabulary is expanded by VQRAE's codes (llm/vocab.py, the one
sequence format). It answers from the continuous features and draws by predicting codes that the VQRAE decoder
turns into pixels. Its export is an understanding export (the processor's tokenizer holds the code tokens) with the
image vocabulary, the sequence format and the VQRAE beside it:

    DIR/config.json, model.safetensors, processor + tokenizer files   LlavaForConditionalGeneration + AutoProcessor
    DIR/image_vocab.json, sequence_format.json                        where the codes live, the prompt format
    DIR/vqrae/                                                        the VQRAE export (encoder = tower, decoder)
    DIR/sampling.json                                                 its recommended sampling settings

    llava, processor = load_llava(DIR)            # transformers alone: understanding
    unified = load_unified(DIR)                    # both: unified.llava answers, unified.text_to_image() draws
    images, codes = unified.text_to_image().generate(["a photo of a red circle"], SamplingConfig(cfg_scale=3.0))
    answer(unified.llava, unified.processor, [image], ["How many circles?"], hook=unified.inputs_hook())

An image may also enter a conversation as its discrete codes (code-token embeddings in the `<image>` tokens' places,
no projector): the sequence format's image_input "codes", the input of the continuous-vs-discrete comparison.

Drawing runs the project's sampler (fused backend, CFG, per-image random streams) on `language_model_view`, a
causal LM that shares the LLaVA model's language-model and head tensors (no copy, the same speed as a generator).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedModel

from common.config import ConfigError
from llm.generator import FORMAT_FILE, VQRAE_DIR, SequenceFormat
from llm.sampler import load_recommended, save_recommended
from llm.understanding import is_llava_export, load_llava, save_llava
from llm.vocab import VOCAB_FILE, ImageVocab, expand_vocabulary
from tokenizer import VQRAE


def is_unified_export(directory: str | Path) -> bool:
    """True for a LLaVA export that also holds an image vocabulary, a sequence format and a VQRAE."""
    directory = Path(directory)
    return is_llava_export(directory) and all((directory / f).exists() for f in (VOCAB_FILE, FORMAT_FILE, VQRAE_DIR))


def language_model_view(llava: LlavaForConditionalGeneration) -> PreTrainedModel:
    """The LLaVA model's language model as a transformers causal LM (e.g. Qwen3ForCausalLM) whose body and head ARE
    the LLaVA model's modules: the same tensors, so what one computes the other computes, and training one trains
    both."""
    with torch.device("meta"):
        view = AutoModelForCausalLM.from_config(llava.config.text_config)
    view.model = llava.model.language_model
    view.lm_head = llava.lm_head
    view.config = llava.model.language_model.config
    return view.train(llava.training)


def expand_llava(llava: LlavaForConditionalGeneration, processor: LlavaProcessor, vqrae: VQRAE, init: str = "mean",
                 seed: int = 0) -> ImageVocab:
    """Expand an understanding model's vocabulary by `vqrae`'s codes (in place: the processor's tokenizer and the LM's
    embeddings; text ids, `<image>` and the projector unchanged); returns the image vocabulary."""
    codebook = vqrae.quantizer.effective_codebook().detach() if init == "codebook" else None
    return expand_vocabulary(llava, processor.tokenizer, vqrae.config.quantizer.codebook_size, init=init,
                             codebook=codebook, seed=seed)


def fit_vocab(vocab: ImageVocab, llava: LlavaForConditionalGeneration) -> ImageVocab:
    """`vocab` with the model's embedding row count (adding `<image>` to a generator's tokenizer may have grown it);
    the code ids themselves never move."""
    rows = llava.get_input_embeddings().weight.shape[0]
    return vocab if rows == vocab.embedding_rows else dataclasses.replace(vocab, embedding_rows=rows)


def check_tokenizer_side(vocab: ImageVocab, processor: LlavaProcessor) -> None:
    """Refuse a processor whose `<image>` token lies among the codes (it could never be both)."""
    if vocab.is_code(torch.tensor(processor.image_token_id)):
        raise ConfigError(f"the <image> token id {processor.image_token_id} lies inside the code range "
                          f"{vocab.code_range}")
    vocab.check_tokenizer(processor.tokenizer)


def save_unified(directory: str | Path, llava: LlavaForConditionalGeneration, processor: LlavaProcessor,
                 vocab: ImageVocab, fmt: SequenceFormat, vqrae_dir: str | Path, recommended: dict | None = None
                 ) -> Path:
    """Write a unified export (see the module docstring) atomically; `vqrae_dir` (a VQRAE export) is copied in;
    `recommended`: its sampling settings (`llm.sampler.recommended_settings`)."""
    check_tokenizer_side(vocab, processor)
    return save_llava(llava, processor, directory, unified_files(vocab, fmt, vqrae_dir, recommended))


def unified_files(vocab: ImageVocab, fmt: SequenceFormat, vqrae_dir: str | Path, recommended: dict | None = None
                  ) -> Callable[[Path], None]:
    """What a unified export holds beyond the LLaVA export (the tokenizer is the processor's, written by it): a
    function writing the image vocabulary, the sequence format, the recommended sampling settings (when given) and a
    copy of the VQRAE export into a folder."""
    if not (Path(vqrae_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{vqrae_dir} is not a VQRAE export (no config.json)")

    def write(directory: Path) -> None:
        vocab.save(directory)
        fmt.save(directory)
        if recommended:
            save_recommended(directory, recommended)
        shutil.copytree(vqrae_dir, directory / VQRAE_DIR)

    return write


@torch.no_grad()
def image_codes(vqrae: VQRAE, processor: LlavaProcessor, pixel_values: torch.Tensor) -> torch.Tensor:
    """The VQRAE codes (B, N) of a batch of the processor's pixels (normalised by its mean / std)."""
    ip = processor.image_processor
    mean, std = (torch.tensor(v, device=pixel_values.device).view(1, 3, 1, 1) for v in (ip.image_mean, ip.image_std))
    param = next(vqrae.parameters())
    signed = (pixel_values.float() * std + mean) * 2 - 1  # [-1, 1], what VQRAE.encode takes
    return vqrae.encode(signed.to(param.device, param.dtype)).indices


def codes_in_place(inputs: dict[str, torch.Tensor], codes: torch.Tensor, vocab: ImageVocab, image_token_id: int
                   ) -> dict[str, torch.Tensor]:
    """Model inputs with the images given as codes: each image's `<image>` tokens (one per feature, as many as its
    codes) replaced by its code tokens, in order, and no pixel_values."""
    ids = inputs["input_ids"].clone()
    slots = ids == image_token_id
    if int(slots.sum()) != codes.numel():
        raise ValueError(f"{int(slots.sum())} image tokens for {codes.shape[0]} images of {codes.shape[-1]} codes")
    ids[slots] = vocab.code_to_token(codes).flatten().to(ids.device)
    return {**{k: v for k, v in inputs.items() if k != "pixel_values"}, "input_ids": ids}


def images_as_codes(inputs: dict[str, torch.Tensor], vqrae: VQRAE, processor: LlavaProcessor, vocab: ImageVocab
                    ) -> dict[str, torch.Tensor]:
    """Model inputs with their pixels (if any) turned into code tokens in the image tokens' places
    (`image_codes` then `codes_in_place`)."""
    if "pixel_values" not in inputs:
        return inputs
    codes = image_codes(vqrae, processor, inputs["pixel_values"])
    return codes_in_place(inputs, codes, vocab, processor.image_token_id)


@dataclass
class UnifiedModel:
    """A loaded unified export: the LLaVA model and processor (understanding), the image vocabulary and sequence
    format (drawing), the VQRAE (its decoder draws and reconstructs)."""

    llava: LlavaForConditionalGeneration
    processor: LlavaProcessor
    vocab: ImageVocab
    fmt: SequenceFormat
    vqrae: VQRAE
    recommended: dict = field(default_factory=dict)  # its sampling settings (llm.sampler.load_recommended)

    def inputs_hook(self) -> Callable[[dict], dict] | None:
        """What `llm.understanding.answer` / `reply` apply to the model inputs: None for continuous features; the
        images as codes for a model trained so (its sequence format's image_input)."""
        if self.fmt.image_input == "features":
            return None

        return lambda inputs: images_as_codes(inputs, self.vqrae, self.processor, self.vocab)

    def text_to_image(self):
        """A `llm.pipeline.TextToImage` on the shared language model."""
        from llm.pipeline import TextToImage

        return TextToImage(model=language_model_view(self.llava), tokenizer=self.processor.tokenizer,
                           vocab=self.vocab, vqrae=self.vqrae, fmt=self.fmt, recommended=self.recommended)


def load_unified(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                 ) -> UnifiedModel:
    """A unified export back, each part loaded once (the VQRAE in fp32, as the generator's is)."""
    directory = Path(directory)
    if not is_unified_export(directory):
        raise FileNotFoundError(f"{directory} is not a unified export (a LLaVA export with {VOCAB_FILE}, "
                                f"{FORMAT_FILE} and {VQRAE_DIR}/)")
    llava, processor = load_llava(directory, device, dtype)
    vocab = ImageVocab.load(directory)
    check_tokenizer_side(vocab, processor)
    fmt = SequenceFormat.load(directory)
    vqrae = VQRAE.from_pretrained(directory / VQRAE_DIR, device=device).eval()
    return UnifiedModel(llava, processor, vocab, fmt, vqrae, load_recommended(directory))


def load_answerer(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                  ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, Callable[[dict], dict] | None]:
    """(model, processor, inputs hook) for answering with any understanding export: a unified one brings the hook
    its image input needs (`UnifiedModel.inputs_hook`), a plain LLaVA export none."""
    if is_unified_export(directory):
        unified = load_unified(directory, device, dtype)
        return unified.llava, unified.processor, unified.inputs_hook()
    return (*load_llava(directory, device, dtype), None)
