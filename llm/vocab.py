"""Image-code vocabulary for a causal LM, and the one place that defines the generation sequence format.

Vocabulary expansion (Tar / BLIP3o style): the tokenizer gains "<|image_start|>", "<|image_end|>", a pad token when it
has none, and one token per code "<|img_00042|>"; the codes occupy the CONTIGUOUS id range
[code_offset, code_offset + K), so code <-> token is an offset. The model's embeddings are resized and the new rows
initialised; text token ids and their embeddings are unchanged.

Sequence format (trainer and sampler both use these functions):

    prompt_ids = build_prompt_ids(tokenizer, caption, template)       # caption tokens ("plain") or a chat turn
    input_ids  = prompt_ids + [<|image_start|>] + H*W code tokens + [<|image_end|>]
    labels     = -100 everywhere except on the code tokens and <|image_end|>

Classifier-free guidance: the unconditional prompt follows Janus by default (mode "pad"): the same prompt with every
token replaced by the pad token except the tokenizer's special tokens (BOS, chat markers), so the unconditional row
has the conditional row's length and template. Caption dropout in training replaces `prompt_ids` with
`unconditional_prompt_ids(tokenizer, prompt_ids, vocab, mode)`, exactly what the sampler feeds as the unconditional
row. Mode "empty" (the prompt of an empty caption) is the alternative; the two must not be mixed between training and
sampling. The pad tokens of an unconditional prompt are real, attended tokens: attention masks come from lengths,
never from comparing ids with the pad id.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from common.files import atomic_write

IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
PAD_FALLBACK = "<|pad|>"
IGNORE_INDEX = -100
VOCAB_FILE = "image_vocab.json"
TEMPLATES = ("plain", "chat")
UNCOND_MODES = ("pad", "empty")
INITS = ("mean", "codebook")
# The chat template of template "chat" for a tokenizer that has none (jinja, as any chat template).
FALLBACK_CHAT = "User: {{ messages[0]['content'] }}\nAssistant:"
IMAGE_TOKEN_PATTERN = re.compile(r"<\|(?:image_start|image_end|img_\d+)\|>")  # what a caption must never contain


def code_token(index: int, codebook_size: int) -> str:
    """The token string of code `index`, zero-padded to a fixed width (at least 5 digits)."""
    return f"<|img_{index:0{max(5, len(str(codebook_size - 1)))}d}|>"


@dataclass(frozen=True)
class ImageVocab:
    """Where the image tokens live in an expanded vocabulary.

    Args:
        codebook_size: number of codes K.
        code_offset: token id of code 0; code i is token code_offset + i.
        image_start_id, image_end_id, pad_id: special token ids.
        text_vocab_size: len(tokenizer) before expansion (ids below it are unchanged text tokens).
        embedding_rows: rows of the resized embedding matrix (>= code_offset + K, padded).
        init: how the new embedding rows were initialised ("mean" or "codebook").
    """

    codebook_size: int
    code_offset: int
    image_start_id: int
    image_end_id: int
    pad_id: int
    text_vocab_size: int
    embedding_rows: int
    init: str = "mean"

    def __post_init__(self):
        if self.codebook_size <= 0 or self.code_offset < 0:
            raise ValueError(f"invalid ImageVocab: codebook_size {self.codebook_size}, code_offset {self.code_offset}")
        if self.code_end > self.embedding_rows:
            raise ValueError(f"code ids end at {self.code_end} but the embedding has {self.embedding_rows} rows")
        for name in ("image_start_id", "image_end_id", "pad_id"):
            if self.code_offset <= getattr(self, name) < self.code_end:
                raise ValueError(f"{name} {getattr(self, name)} lies inside the code id range {self.code_range}")

    @property
    def code_end(self) -> int:
        return self.code_offset + self.codebook_size

    @property
    def code_range(self) -> tuple[int, int]:
        """[start, stop) of the code token ids."""
        return self.code_offset, self.code_end

    def code_to_token(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (any shape, int) -> token ids."""
        indices = torch.as_tensor(indices)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"code indices must lie in [0, {self.codebook_size}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        return indices.long() + self.code_offset

    def token_to_code(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (any shape, int) -> code indices; every id must be a code token."""
        ids = torch.as_tensor(ids).long()
        bad = ~self.is_code(ids)
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} token id(s) are not image codes (code ids are [{self.code_offset}, "
                f"{self.code_end})), e.g. {ids[bad].flatten()[:5].tolist()}"
            )
        return ids - self.code_offset

    def is_code(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor: which token ids are code tokens."""
        ids = torch.as_tensor(ids)
        return (ids >= self.code_offset) & (ids < self.code_end)

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Raise if `tokenizer` does not hold this vocabulary's tokens at these ids."""
        expected = {IMAGE_START: self.image_start_id, IMAGE_END: self.image_end_id}
        for i in (0, self.codebook_size - 1):
            expected[code_token(i, self.codebook_size)] = self.code_offset + i
        got = {t: tokenizer.convert_tokens_to_ids(t) for t in expected}
        if got != expected or tokenizer.pad_token_id != self.pad_id:
            raise ValueError(
                f"tokenizer does not match the image vocabulary: expected {expected} and pad {self.pad_id}, "
                f"got {got} and pad {tokenizer.pad_token_id}"
            )

    def save(self, directory: str | Path) -> None:
        """Write image_vocab.json into `directory` (atomically)."""
        with atomic_write(Path(directory) / VOCAB_FILE) as f:
            json.dump(asdict(self), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, directory: str | Path) -> ImageVocab:
        """Read image_vocab.json from `directory`."""
        path = Path(directory) / VOCAB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {VOCAB_FILE} in {directory}: was the vocabulary expanded and saved there?")
        return cls(**json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------- expansion


@torch.no_grad()
def expand_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, codebook_size: int, init: str = "mean",
    codebook: torch.Tensor | None = None, pad_to_multiple_of: int | None = 64, seed: int = 0,
) -> ImageVocab:
    """Add image tokens to `tokenizer` (in place) and resize + initialise `model`'s embeddings (in place).

    New rows (every id >= the old len(tokenizer), including rows a checkpoint had as unused padding) are set to the
    mean of the text rows: input embeddings always, output embeddings too when untied. With init="codebook" the input
    rows of the codes are instead the effective codebook (K, D) times a fixed random projection (D, hidden) drawn
    from `seed`, rescaled as a whole so that the mean row norm equals the text rows' mean norm (relative geometry
    kept); untied output rows still start at the mean, so every code starts equally likely.

    Args:
        model: a transformers causal LM (e.g. Qwen3ForCausalLM), not yet wrapped by DeepSpeed.
        tokenizer: its tokenizer, not yet expanded.
        codebook_size: number of codes K.
        init: "mean" or "codebook".
        codebook: the image tokenizer's effective codebook (K, D), required for init="codebook".
        pad_to_multiple_of: pad the embedding rows to a multiple of this (None: no padding).
        seed: seed of the codebook projection.
    """
    if codebook_size <= 0:
        raise ValueError(f"codebook_size must be positive, got {codebook_size}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if (init == "codebook") != (codebook is not None):
        raise ValueError("init='codebook' needs codebook=(K, D) tensor, and only it accepts one")
    if codebook is not None and (codebook.dim() != 2 or codebook.shape[0] != codebook_size):
        raise ValueError(f"codebook must have shape ({codebook_size}, D), got {tuple(codebook.shape)}")
    if IMAGE_START in tokenizer.get_vocab():
        raise ValueError(f"tokenizer already has {IMAGE_START}: it is already expanded (use ImageVocab.load)")

    text_size = len(tokenizer)
    embed_in = model.get_input_embeddings()
    if embed_in.weight.shape[0] < text_size:
        raise ValueError(f"model has {embed_in.weight.shape[0]} embedding rows but the tokenizer {text_size} tokens")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_FALLBACK})
    markers = [AddedToken(t, special=True, normalized=False) for t in (IMAGE_START, IMAGE_END)]
    tokenizer.add_tokens(markers, special_tokens=True)
    code_offset = len(tokenizer)
    codes = [AddedToken(code_token(i, codebook_size), special=True, normalized=False) for i in range(codebook_size)]
    tokenizer.add_tokens(codes, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids([c.content for c in codes])
    if ids != list(range(code_offset, code_offset + codebook_size)):
        raise RuntimeError(f"code tokens did not receive contiguous ids from {code_offset}; tokenizer clash?")

    mean_in = embed_in.weight[:text_size].float().mean(0)
    embed_out = model.get_output_embeddings()
    mean_out = None if embed_out is None else embed_out.weight[:text_size].float().mean(0)
    new_rows = max(len(tokenizer), embed_in.weight.shape[0])
    model.resize_token_embeddings(new_rows, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)

    weight = model.get_input_embeddings().weight  # (V', hidden)
    weight[text_size:] = mean_in.to(weight.dtype)
    if init == "codebook":
        weight[code_offset : code_offset + codebook_size] = codebook_rows(
            codebook, weight[:text_size], seed).to(weight.dtype)
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != weight.data_ptr():  # transformers re-ties per config on resize
        out.weight[text_size:] = mean_out.to(out.weight.dtype)
        if getattr(out, "bias", None) is not None:
            out.bias[text_size:] = out.bias[:text_size].float().mean().to(out.bias.dtype)

    return ImageVocab(
        codebook_size=codebook_size, code_offset=code_offset,
        image_start_id=tokenizer.convert_tokens_to_ids(IMAGE_START),
        image_end_id=tokenizer.convert_tokens_to_ids(IMAGE_END), pad_id=tokenizer.pad_token_id,
        text_vocab_size=text_size, embedding_rows=weight.shape[0], init=init,
    )


def codebook_rows(codebook: torch.Tensor, text_rows: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Code embeddings from the codebook: (K, D) @ fixed Gaussian (D, hidden) / sqrt(D), scaled to the text rows'
    mean norm. Returns (K, hidden) float32.

    Args:
        codebook: (K, D) effective codebook.
        text_rows: (V, hidden) existing embedding rows.
        seed: seed of the projection (CPU generator, so it is the same on every device).
    """
    d, hidden = codebook.shape[1], text_rows.shape[1]
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(d, hidden, generator=gen) / d**0.5  # (D, hidden)
    rows = codebook.detach().float().cpu() @ proj  # (K, hidden)
    target = text_rows.float().norm(dim=1).mean().cpu()
    return (rows * (target / rows.norm(dim=1).mean().clamp_min(1e-12))).to(text_rows.device)


TINY_FAMILIES = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def build_tiny_lm(tokenizer: PreTrainedTokenizerBase, family: str = "qwen3", seed: int = 0, **overrides
                  ) -> PreTrainedModel:
    """A tiny random causal LM of a transformers family ("qwen3", "llama") sized to `tokenizer` (tests, CPU default),
    deterministic for a seed.

    Args:
        tokenizer: the text tokenizer (before expansion); sets vocab_size, pad, bos and eos ids.
        family: the model family.
        seed: torch seed of the initialisation.
        overrides: config fields to change (e.g. num_hidden_layers=4, tie_word_embeddings=False).
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {tuple(TINY_FAMILIES)}, got {family!r}")
    config_class, model_class = TINY_FAMILIES[family]
    fields = {
        "vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "head_dim": 16, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    config = config_class(**{**fields, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


def build_tiny_qwen3(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    """`build_tiny_lm` of the Qwen3 family (the CPU default's LM)."""
    return build_tiny_lm(tokenizer, "qwen3", seed, **overrides)


# ----------------------------------------------------------------------------------------------- sequences


def caption_problem(caption: str, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why `caption` cannot be tokenized as plain text (it holds an image-token or special-token string, which the
    tokenizer would turn into that token), or None."""
    if not isinstance(caption, str):
        return f"captions must be strings, got {type(caption).__name__}"
    found = IMAGE_TOKEN_PATTERN.search(caption)
    if found:
        return f"caption contains the image token string {found.group()!r}"
    for special in tokenizer.all_special_tokens:
        if special and special in caption:
            return f"caption contains the special token string {special!r}"
    return None


def prompt_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> str:
    """The chat template template "chat" renders with: `chat_template` (the one a generator trained with, pinned in
    its sequence format), else the tokenizer's own, else FALLBACK_CHAT."""
    return chat_template or getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT


def build_prompt_ids(tokenizer: PreTrainedTokenizerBase, caption: str, template: str = "plain",
                     chat_template: str | None = None) -> list[int]:
    """Token ids of the text that precedes <|image_start|>.

    Args:
        tokenizer: the (expanded or not) text tokenizer.
        caption: the image caption; one holding an image-token or special-token string is refused (a caption must
            never inject a code token or break the template).
        template: "plain" (the caption, with the tokenizer's own BOS if it adds one) or "chat" (one user turn
            through `prompt_chat_template(tokenizer, chat_template)` with the generation prompt).
        chat_template: see `prompt_chat_template`.
    """
    problem = caption_problem(caption, tokenizer)
    if problem:
        raise ValueError(f"{problem}: remove it from the caption ({caption[:80]!r})")
    if template == "plain":
        return list(tokenizer(caption, add_special_tokens=True)["input_ids"])
    if template == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                             add_generation_prompt=True,
                                             chat_template=prompt_chat_template(tokenizer, chat_template))
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def unconditional_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], vocab: ImageVocab, mode: str = "pad",
    template: str = "plain", chat_template: str | None = None,
) -> list[int]:
    """The prompt of the unconditional (caption-dropped) row for classifier-free guidance.

    Args:
        tokenizer: the text tokenizer (its special ids are kept in mode "pad").
        prompt_ids: the conditional prompt from `build_prompt_ids`.
        vocab: the image vocabulary (pad id).
        mode: "pad" (Janus: every non-special token -> pad, same length) or "empty" (prompt of an empty caption).
        template, chat_template: what `prompt_ids` was built with (used by mode "empty").
    """
    if mode == "pad":
        keep = set(tokenizer.all_special_ids) - {vocab.pad_id}
        return [t if t in keep else vocab.pad_id for t in prompt_ids]
    if mode == "empty":
        return build_prompt_ids(tokenizer, "", template, chat_template)
    raise ValueError(f"unconditional mode must be one of {UNCOND_MODES}, got {mode!r}")


def image_prefix_ids(prompt_ids: list[int], vocab: ImageVocab) -> list[int]:
    """What the sampler feeds before the first code: prompt + <|image_start|>."""
    return [*prompt_ids, vocab.image_start_id]


def build_sequence(prompt_ids: list[int], codes: torch.Tensor, vocab: ImageVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """One training sequence and its labels.

    Args:
        prompt_ids: from `build_prompt_ids` (or `unconditional_prompt_ids` for a dropped caption).
        codes: (N,) or (h, w) code indices of one image, raster order.

    Returns:
        input_ids (L,) and labels (L,) with L = len(prompt_ids) + N + 2; labels are -100 except on the code tokens
        and <|image_end|> (the model's loss shifts labels by one position itself).
    """
    codes = torch.as_tensor(codes).flatten()
    prefix = torch.tensor(image_prefix_ids(prompt_ids, vocab), dtype=torch.long)
    end = torch.tensor([vocab.image_end_id])
    input_ids = torch.cat([prefix, vocab.code_to_token(codes), end])  # (L,)
    labels = input_ids.clone()
    labels[: prefix.numel()] = IGNORE_INDEX
    return input_ids, labels
