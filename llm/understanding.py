"""Understanding on VQRAE's continuous features as a standard transformers LLaVA model: the VQRAE encoder exported
as a transformers vision tower (cut at its feature layer), LLaVA-1.5's `mlp2x_gelu` projector (transformers'
projector with `gelu`) and a causal LM, with `<image>` a real added token that a `LlavaProcessor` expands.

    tower_dir = export_vision_tower("runs/tiny-stage2/export", "runs/tower")       # a transformers vision model
    model, processor = build_llava(VQRAE.from_pretrained(...), lm, tokenizer)        # projector freshly initialised
    save_llava(model, processor, "runs/und/export")   # loads with LlavaForConditionalGeneration + AutoProcessor
    replace_vision_tower("llava-hf/...", "runs/tiny-stage2/export", "runs/llava-vqrae")   # plug-and-play

The tower's features, as LLaVA selects them (hidden_states[-1]; "full" for towers without a CLS token, "default"
drops it), equal `VQRAE.encode_features`: VQRAE's feature_layer reads hidden states the way LLaVA's
vision_feature_layer does, and the exported tower stops at that layer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tokenizers import AddedToken
from transformers import (
    AutoModel,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.image_utils import PILImageResampling

from common.config import ConfigError
from common.files import atomic_directory
from common.weights import load_exactly
from llm.vocab import IGNORE_INDEX
from tokenizer import VQRAE
from tokenizer.encoder import FAMILIES

IMAGE_TOKEN = "<image>"
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's evaluation prompt suffix
# A message's content: a string, or items of which {"type": "image"} renders as LLaVA's "<image>\n".
_CONTENT = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
            "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}")
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class ChatFormat:
    """An understanding model's conversation format.

    Args:
        name: its config name (`model.chat_format`).
        template: the jinja chat template the processor carries; what training supervises (each assistant answer and
            the token ending it) is inside `{% generation %}` blocks, read back through transformers'
            `return_assistant_tokens_mask`.
        end_of_turn: the token that ends an assistant turn (generation stops there); "eos": the tokenizer's own.
        markers: tokens the tokenizer must hold.
    """

    name: str
    template: str
    end_of_turn: str
    markers: tuple[str, ...] = ()


CHAT_FORMATS = {f.name: f for f in (
    # ChatML, Qwen's turn format.
    ChatFormat("chatml",  # the newline after each turn is an expression: one after a block tag would be trimmed
               "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
               "{% if message['role'] == 'assistant' %}{% generation %}" + _CONTENT + "<|im_end|>{% endgeneration %}"
               "{% else %}" + _CONTENT + "<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
               "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    # LLaVA-1.5's conv_vicuna_v1 (Vicuna / LLaMA-family LLMs): "SYSTEM USER: q ASSISTANT: a</s>USER: ...". The BOS
    # is the tokenizer's to add, as in LLaVA and llava-hf's templates (a template writing it gets two from the
    # standard `processor(text=apply_chat_template(...))`). The space after "ASSISTANT:" is inside the supervised
    # block: LLaVA's preprocess_v1 masks up to the colon, so a lone "▁" before an answer ("▁" "2") is trained.
    ChatFormat("vicuna_v1",
               VICUNA_SYSTEM + " {% for message in messages %}"
               "{% if message['role'] == 'assistant' %}ASSISTANT:{% generation %} " + _CONTENT +
               "{{ eos_token }}{% endgeneration %}{% else %}USER: " + _CONTENT + " {% endif %}{% endfor %}"
               "{% if add_generation_prompt %}ASSISTANT:{% endif %}",
               "eos"),
)}


def chat_tokens(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], template: str
                ) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation rendered and tokenised whole by a chat template (a `ChatFormat`'s): the tokens
    inside its `{% generation %}` blocks (each answer and the token ending it) labelled, the rest IGNORE_INDEX; the
    tokens the tokenizer puts before a text (`leading_special_ids`: LLaMA's BOS) first, unless the template wrote a
    BOS itself, as `processor(text=...)` does at evaluation."""
    encoded = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids = list(encoded["input_ids"])
    labels = [i if supervised else IGNORE_INDEX for i, supervised in zip(ids, encoded["assistant_masks"])]
    prefix = [] if tokenizer.bos_token is not None and ids[:1] == [tokenizer.bos_token_id] else \
        leading_special_ids(tokenizer)
    return prefix + ids, [IGNORE_INDEX] * len(prefix) + labels


def leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a tokenizer puts before any text of its own accord (LLaMA's BOS; none for Qwen)."""
    text = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    starts = [i for i in range(len(full) - len(text) + 1) if full[i : i + len(text)] == text]
    if not starts:
        raise ConfigError("the tokenizer changes a text's own tokens when it adds its special tokens")
    return full[: starts[0]]


def chat_format(tokenizer: PreTrainedTokenizerBase, name: str = "auto") -> ChatFormat:
    """The conversation format for an LLM's tokenizer: `name`, or for "auto" ChatML when the tokenizer has its markers
    (Qwen), else LLaVA's vicuna_v1 when it has BOS and EOS tokens (LLaMA / Vicuna); anything else is refused."""
    vocab = tokenizer.get_vocab()
    has_chatml = all(m in vocab for m in CHAT_FORMATS["chatml"].markers)
    if name == "auto":
        name = "chatml" if has_chatml else "vicuna_v1"
    if name not in CHAT_FORMATS:
        raise ConfigError(f"unknown chat format {name!r} (known: auto, {', '.join(CHAT_FORMATS)})")
    if name == "chatml" and not has_chatml:
        raise ConfigError(f"the chatml format needs the tokens {list(CHAT_FORMATS['chatml'].markers)}, which this "
                          "tokenizer lacks")
    if name == "vicuna_v1" and (tokenizer.bos_token is None or tokenizer.eos_token is None):
        raise ConfigError("the vicuna_v1 format needs a tokenizer with BOS and EOS tokens (a LLaMA-family one); this "
                          "one has neither ChatML markers nor both of those")
    return CHAT_FORMATS[name]


# ----------------------------------------------------------------------------------------------- the vision tower


def feature_select_strategy(vqrae: VQRAE) -> str:
    """LLaVA's vision_feature_select_strategy for this encoder: "full" without a CLS token, "default" with one."""
    prefix = vqrae.encoder.family.prefix_tokens if vqrae.encoder.family is not None else None
    if prefix not in (0, 1):
        raise ConfigError(f"a {vqrae.config.encoder.model_type} tower has no LLaVA feature selection this code knows "
                          "(one with 0 or 1 prefix tokens: SigLIP, InternViT, CLIP)")
    return "full" if prefix == 0 else "default"


def vision_tower(vqrae: VQRAE) -> PreTrainedModel:
    """A standalone transformers vision model (a copy, fp32) whose LLaVA features equal `vqrae.encode_features`:
    the encoder's tower with only the layers up to the feature layer. The final norm VQRAE never applies is kept as
    an identity-initialised norm so the standard class loads; LLaVA reads the hidden state before it."""
    cfg = vqrae.config.encoder
    if cfg.model_type == "timm":
        raise ConfigError(f"a timm tower ({cfg.tower.get('model_name')}) has no transformers vision-model class a "
                          "LLaVA checkpoint can hold: train the tokenizer on the same weights in a transformers layout "
                          "(e.g. Dinov2Model, InternVLVisionModel) to export understanding")
    if cfg.model_type == "siglip2_vision_model":
        raise ConfigError("a SigLIP2 NaFlex tower takes patch sequences, LLaVA feeds it images: use the SigLIP "
                          "(FixRes) form of the checkpoint (model_type siglip_vision_model) for understanding")
    feature_select_strategy(vqrae)
    source = vqrae.encoder.tower
    config = copy.deepcopy(source.config)
    family = FAMILIES[cfg.model_type]
    config.num_hidden_layers = len(_get(source, family.layers))
    if hasattr(config, "vision_use_head"):
        config.vision_use_head = False
    tower = AutoModel.from_config(config).float()
    state = {k: v.detach().float().cpu() for k, v in source.state_dict().items()}
    if family.final_norm is not None:
        norm = _get(tower, family.final_norm)
        state |= {f"{family.final_norm}.weight": torch.ones_like(norm.weight),
                  f"{family.final_norm}.bias": torch.zeros_like(norm.bias)}
    load_exactly(tower, state, "the VQRAE encoder")
    return tower.eval()


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def mean_color(processor: LlavaProcessor) -> tuple[int, int, int]:
    """The processor's mean colour as 8-bit RGB, truncated as LLaVA's `expand2square` fill is (0.5 -> 127): the fill
    of the pad to a square and of a blank image."""
    return tuple(int(255 * m) for m in processor.image_processor.image_mean)


def image_processor(vqrae: VQRAE) -> LlavaImageProcessor:
    """LLaVA-1.5's `image_aspect_ratio pad` inside the processor itself, so training, evaluation, the chat and a plain
    transformers user see the same pixels: pad to a square with the mean colour (`mean_color`), resize to the
    encoder's resolution (bicubic), scale to [0, 1], normalise by its mean / std. A square image gets exactly what
    SigLIP's own image processor gives."""
    cfg = vqrae.config.encoder
    side = {"height": cfg.image_size, "width": cfg.image_size}  # crop_size too: tools count image tokens from it
    return LlavaImageProcessor(do_pad=True, do_center_crop=False, resample=PILImageResampling.BICUBIC,
                               size=side, crop_size=side,
                               image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))


def export_vision_tower(vqrae_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the VQRAE encoder of `vqrae_dir` as a transformers vision model folder (config.json, model.safetensors,
    preprocessor_config.json), atomically; returns `out_dir`."""
    vqrae = VQRAE.from_pretrained(vqrae_dir)
    tower = vision_tower(vqrae)
    with atomic_directory(out_dir) as tmp:
        tower.save_pretrained(tmp)
        image_processor(vqrae).save_pretrained(tmp)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------- the LLaVA model


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<image>` as a special token (once) and return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def llava_config(vqrae: VQRAE, text_config: PretrainedConfig, image_token_id: int,
                 tower_config: PretrainedConfig | None = None) -> LlavaConfig:
    """The LlavaConfig of a VQRAE tower + LM: projector gelu (mlp2x_gelu), features hidden_states[-1]."""
    tower_config = tower_config or vision_tower(vqrae).config
    return LlavaConfig(vision_config=tower_config.to_dict(), text_config=text_config.to_dict(),
                       image_token_index=image_token_id, projector_hidden_act="gelu",
                       vision_feature_select_strategy=feature_select_strategy(vqrae), vision_feature_layer=-1,
                       image_seq_length=vqrae.config.num_tokens, multimodal_projector_bias=True)


def build_processor(vqrae: VQRAE, tokenizer: PreTrainedTokenizerBase, chat: str = "auto") -> LlavaProcessor:
    """A LlavaProcessor carrying the encoder's size and mean / std, `<image>` expanded to one token per feature, and
    the chat template of `chat_format(tokenizer, chat)`. A tokenizer without a pad token pads with its unk token, as
    LLaVA does for Vicuna (or a new `<pad>` token when it has none)."""
    template = chat_format(tokenizer, chat).template
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    add_image_token(tokenizer)
    prefix = vqrae.encoder.family.prefix_tokens
    return LlavaProcessor(image_processor=image_processor(vqrae), tokenizer=tokenizer,
                          patch_size=vqrae.config.encoder.patch_size,
                          vision_feature_select_strategy=feature_select_strategy(vqrae), chat_template=template,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=prefix)


def build_llava(vqrae: VQRAE, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, chat: str = "auto"
                ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LlavaForConditionalGeneration from a VQRAE encoder and a causal LM (its weights copied; the tokenizer
    gains `<image>` and the embeddings a row for it), with a freshly initialised projector; and its processor (chat
    format `chat`, see `chat_format`)."""
    processor = build_processor(vqrae, tokenizer, chat)
    if lm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tower = vision_tower(vqrae)
    config = llava_config(vqrae, lm.config, processor.image_token_id, tower.config)
    model = LlavaForConditionalGeneration(config)
    body = lm.get_decoder()
    load_exactly(model.model.vision_tower, tower.state_dict(), "the VQRAE tower")
    load_exactly(model.model.language_model, body.state_dict(), "the language model")
    if not config.tie_word_embeddings:
        load_exactly(model.lm_head, lm.get_output_embeddings().state_dict(), "the language model's head")
    model.tie_weights()
    return model.eval(), processor


def save_llava(model: LlavaForConditionalGeneration, processor: LlavaProcessor, directory: str | Path,
               extra: Callable[[Path], None] | None = None) -> Path:
    """Write an export folder (config, safetensors, processor, tokenizer, chat template) atomically; `extra`: a
    function writing more files into the folder (given its path) before it appears. A plain `generate` on the export
    stops at the chat format's end of turn: its generation config names it (and the LM's own EOS), and, where the two
    differ (ChatML), the saved tokenizer's EOS is the end of turn, as in Qwen's chat checkpoints (lmms-eval's llava_hf
    stops at the tokenizer's EOS)."""
    end, eos = end_of_turn_id(processor), processor.tokenizer.eos_token_id
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = [end] if eos in (None, end) else [end, eos]
    config.pad_token_id = processor.tokenizer.pad_token_id
    if end != eos:
        processor = copy.deepcopy(processor)
        processor.tokenizer.eos_token = processor.tokenizer.convert_ids_to_tokens(end)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return Path(directory)


def is_llava_export(directory: str | Path) -> bool:
    """True for a folder whose config.json is a LLaVA model's."""
    config = Path(directory) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"


def load_llava(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
               ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """An export folder back: (model in eval mode, processor)."""
    directory = Path(directory)
    if not is_llava_export(directory):
        raise FileNotFoundError(f"{directory} is not a LLaVA export (no config.json of model_type 'llava')")
    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(device).eval()
    return model, AutoProcessor.from_pretrained(directory)


def replace_vision_tower(llava_dir: str | Path, vqrae_dir: str | Path, out_dir: str | Path) -> Path:
    """Plug-and-play: an existing transformers LLaVA checkpoint with its vision tower replaced by a VQRAE encoder of
    the same shapes (projector and LLM kept), saved as a new checkpoint. The tower must have the checkpoint's
    width, patch size and resolution, and feed the projector the same number of feature tokens."""
    llava_dir = Path(llava_dir)
    model, processor = load_llava(llava_dir)
    vqrae = VQRAE.from_pretrained(vqrae_dir)
    old, new = model.config.vision_config, vision_tower(vqrae)
    for name, theirs, ours in (("width", old.hidden_size, new.config.hidden_size),
                               ("patch size", old.patch_size, new.config.patch_size),
                               ("resolution", old.image_size, new.config.image_size)):
        if theirs != ours:
            raise ConfigError(f"{llava_dir}'s vision tower has {name} {theirs}, the VQRAE encoder {ours}: the "
                              "projector cannot take its features")
    strategy = feature_select_strategy(vqrae)
    if strategy != model.config.vision_feature_select_strategy:
        raise ConfigError(f"{llava_dir} selects features with {model.config.vision_feature_select_strategy!r}, the "
                          f"VQRAE encoder needs {strategy!r}")
    config = copy.deepcopy(model.config)
    config.vision_config = new.config
    config.vision_feature_layer = -1
    swapped = LlavaForConditionalGeneration(config)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}
    load_exactly(swapped, kept | {f"model.vision_tower.{k}": v for k, v in new.state_dict().items()}, "the swap")
    swapped.tie_weights()
    processor.image_processor = image_processor(vqrae)
    return save_llava(swapped.eval(), processor, out_dir)


def lora_config(r: int, alpha: int, dropout: float, target_modules: Sequence[str],
                trainable_tokens: Sequence[int] | None = None, tied_head: bool = True):
    """peft's LoraConfig for adapters on the language model's linear layers named `target_modules` only (the vision
    tower's attention layers have the same names); `trainable_tokens`: ids whose input-embedding rows train too
    (peft's trainable tokens), and their head rows: through the tie, or (`tied_head` False) their own."""
    from peft import LoraConfig

    tokens = None
    if trainable_tokens:
        tokens = list(trainable_tokens) if tied_head else {"embed_tokens": list(trainable_tokens),
                                                           "lm_head": list(trainable_tokens)}
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=rf".*language_model.*\.({'|'.join(target_modules)})",
                      trainable_token_indices=tokens)


# ----------------------------------------------------------------------------------------------- answering


def user_turn(text: str, with_image: bool = False) -> dict:
    """A user message in the processor's chat format, the image (if any) before the text (LLaVA's `<image>\n`)."""
    return {"role": "user", "content": ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]}


InputsHook = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _model_inputs(model: LlavaForConditionalGeneration, processor: LlavaProcessor, texts: list[str],
                  images: list[Image.Image], hook: InputsHook | None = None) -> dict[str, torch.Tensor]:
    """Left-padded processor outputs on the model's device, pixels in its dtype, then `hook` applied (e.g. a
    unified model's images given as codes: llm.unified.UnifiedModel.inputs_hook)."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = processor(images=images or None, text=texts, return_tensors="pt", padding=True,
                           add_special_tokens=not renders_bos(tokenizer, texts))
    finally:
        tokenizer.padding_side = side
    param = next(model.parameters())
    inputs = {k: v.to(param.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return inputs if hook is None else hook(inputs)


def renders_bos(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> bool:
    """Whether rendered chat texts already begin with the BOS token (vicuna_v1's template writes it): then the
    tokenizer must not add another; a template without it (e.g. a llava-hf checkpoint's) relies on the tokenizer's."""
    bos = tokenizer.bos_token
    starts = {bool(bos) and t.startswith(bos) for t in texts}
    if len(starts) > 1:
        raise ValueError("some prompts of one batch begin with the BOS token and some do not")
    return starts == {True}


def end_of_turn_id(processor: LlavaProcessor) -> int:
    """The token ending an assistant turn: that of the chat format whose markers the processor's template writes
    (ChatML's `<|im_end|>`, whoever wrote the template), else the tokenizer's EOS (vicuna_v1, llava-hf's templates)."""
    tokenizer = processor.tokenizer
    for fmt in CHAT_FORMATS.values():
        if fmt.markers and all(m in (processor.chat_template or "") for m in fmt.markers):
            return tokenizer.convert_tokens_to_ids(fmt.end_of_turn)
    if tokenizer.eos_token_id is None:
        raise ConfigError("the processor's chat template is not one this code knows and its tokenizer has no EOS "
                          "token: nothing says where an answer ends")
    return tokenizer.eos_token_id


@torch.no_grad()
def answer(model: LlavaForConditionalGeneration, processor: LlavaProcessor, images: Sequence[Image.Image | None],
           questions: Sequence[str], max_new_tokens: int = 16, short: bool = True, hook: InputsHook | None = None
           ) -> list[str]:
    """Greedy answers for a batch of (image, question) pairs, left-padded (LLaVA-1.5's evaluation prompt:
    `<image>\n{question}` + SHORT_ANSWER when `short`). An image may be None (a text-only question). `hook`: see
    `_model_inputs`."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    texts = [processor.apply_chat_template([user_turn(question + (SHORT_ANSWER if short else ""), image is not None)],
                                           add_generation_prompt=True, tokenize=False)
             for image, question in zip(images, questions)]
    inputs = _model_inputs(model, processor, texts, [im for im in images if im is not None], hook)
    tokenizer = processor.tokenizer
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=end_of_turn_id(processor),
                         pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True).strip()
            for row in out[:, inputs["input_ids"].shape[1] :]]


@torch.no_grad()
def caption(model: LlavaForConditionalGeneration, processor: LlavaProcessor, images: Sequence[Image.Image],
            max_new_tokens: int = 32) -> list[str]:
    """Greedy captions of a stage-1 model (LLaVA's "plain" template: the image's tokens alone, the caption after
    them, ended by a newline), left-padded; each cut at its first newline."""
    inputs = _model_inputs(model, processor, [IMAGE_TOKEN] * len(images), list(images))
    tokenizer = processor.tokenizer
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, stop_strings=["\n"],
                         tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip()
            for row in out[:, inputs["input_ids"].shape[1] :]]


@torch.no_grad()
def reply(model: LlavaForConditionalGeneration, processor: LlavaProcessor, messages: Sequence[dict],
          image: Image.Image | None = None, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
          streamer=None, hook: InputsHook | None = None) -> str:
    """The assistant's next turn of a conversation: `messages` in the processor's chat format, ending with the user's
    turn; `image` is what their one `{"type": "image"}` item stands for. Greedy at temperature 0, else sampled
    (torch's global generator); `streamer` (a transformers streamer) receives the text as it is generated; `hook`: see
    `_model_inputs`."""
    slots = sum(item.get("type") == "image" for m in messages if not isinstance(m["content"], str)
                for item in m["content"])
    if slots != (image is not None):
        raise ValueError(f"the conversation has {slots} image items for {int(image is not None)} image")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
    text = processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    inputs = _model_inputs(model, processor, [text], [image] if image is not None else [], hook)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=end_of_turn_id(processor),
                         pad_token_id=processor.tokenizer.pad_token_id, streamer=streamer, **sampling)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
