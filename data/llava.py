"""LLaVA-format conversations for the understanding model: reading LLaVA's json, the two training templates, and
the collate function.

File format (LLaVA-1.5's): a json list of {"id", "image": path relative to the image root (optional: text-only),
"conversations": [{"from": "human" | "gpt", "value": str}, ...]}; `<image>` stands for the image in a human turn and
is moved to the start of the first one, as LLaVA does.

Templates:
- "plain" (stage 1), LLaVA's `preprocess_plain`: exactly one human turn holding the image and one gpt turn (the
  caption); the human turn's text is dropped, input = [BOS where the tokenizer adds one] + the image tokens + caption +
  "\\n"; only the caption and its "\\n" are supervised.
- "chat" (stage 2): multi-turn, rendered and tokenised whole by the processor's chat template (a format of
  llm/understanding.py's CHAT_FORMATS: ChatML, or LLaVA's vicuna_v1); only the assistant answers and their end-of-turn
  token are supervised, as the template's `{% generation %}` blocks mark them.

The image becomes `num_image_tokens` copies of the `<image>` token id (what LlavaForConditionalGeneration fills with
the projected features); pixels are the processor's own (its image processor pads to a square with the mean colour,
LLaVA's `image_aspect_ratio pad`: llm/understanding.py's `image_processor`), so training sees exactly what evaluation
does. A sample whose truncation would cut image tokens, whose image is missing or unreadable, or that
does not fit the plain template (one human turn holding the image, then one gpt turn) is skipped and counted by reason in
`collate_llava`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from common.files import ensure_settings
from data.images import DECODE_ERRORS, SHARD_INDEX, TAR_IMAGE_EXTS
from data.keys import epoch_and_index
from data.shards import ShardDataset, write_index
from data.tar_files import write_tar_shard
from data.transforms import open_rgb
from llm.understanding import chat_tokens, leading_special_ids
from llm.vocab import IGNORE_INDEX

log = logging.getLogger(__name__)
IMAGE_PLACEHOLDER = "<image>"
TEMPLATES = ("plain", "chat")
SKIP_REASONS = ("missing_image", "unreadable_image", "truncated_image", "template_mismatch", "no_answer",
                "bad_sample")


def is_llava_sample(sample: Any) -> bool:
    """{"id", "image"?: str, "conversations": [{"from": "human" | "gpt", "value": str}, ...]} (non-empty)."""
    turns = sample.get("conversations") if isinstance(sample, dict) else None
    ok = isinstance(turns, list) and turns and all(
        isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str) for t in turns)
    return bool(ok) and not ("image" in sample and not isinstance(sample["image"], str))


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    """A LLaVA json file (a list of samples), validated: one clear error naming the first bad sample."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file {path} not found")
    try:
        samples = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid json ({err.msg} at line {err.lineno})") from None
    if not isinstance(samples, list):
        raise ValueError(f"{path} must hold a json list of LLaVA samples")
    for i, sample in enumerate(samples):
        if not is_llava_sample(sample):
            raise ValueError(f"{path}: sample {i} is not a LLaVA sample ({{'id', 'image'?, 'conversations': "
                             "[{'from': 'human' | 'gpt', 'value': str}, ...]}})")
    return samples


def normalize_turns(sample: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(role, text) turns with roles user / assistant, as LLaVA's preprocessing makes them: a conversation that opens
    with an assistant turn loses that turn; with an image, each turn holding `<image>` has it moved to its start as
    "<image>\\n" and is stripped (a turn of the placeholder alone is "<image>"), the other turns left as written; a
    sample with an image whose turns never name it gets it at the start of its first user turn."""
    turns = [("user" if t["from"] == "human" else "assistant", t["value"]) for t in sample["conversations"]]
    if turns and turns[0][0] == "assistant":
        turns = turns[1:]
    if sample.get("image") is None:
        return turns

    def placed(text: str) -> str:
        return f"{IMAGE_PLACEHOLDER}\n{text.replace(IMAGE_PLACEHOLDER, '').strip()}".strip()

    if any(IMAGE_PLACEHOLDER in text for _, text in turns):
        return [(role, placed(text) if IMAGE_PLACEHOLDER in text else text) for role, text in turns]
    first = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
    if first is not None:
        turns[first] = ("user", placed(turns[first][1]))
    return turns


class ConversationDataset(torch.utils.data.Dataset):
    """Tokenised LLaVA samples: item -> {"input_ids", "labels", "pixel_values" (3, H, W) or None, "id"}, or
    {"skipped": reason} for a sample that cannot be trained on exactly.

    Args:
        samples: from `read_conversations`.
        image_root: folder the "image" paths are relative to.
        processor: the understanding model's LlavaProcessor (tokenizer with `<image>`, chat template, image
            processor).
        num_image_tokens: image tokens per image (the model's image_seq_length).
        template: "plain" or "chat".
        max_length: longest sequence kept (LLaVA: 2048); longer ones are cut at the end.
    """

    def __init__(self, samples: Sequence[Mapping[str, Any]], image_root: str | Path, processor: Any,
                 num_image_tokens: int, template: str = "chat", max_length: int = 2048):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        self.samples, self.root, self.processor = list(samples), Path(image_root), processor
        self.tokenizer = processor.tokenizer
        self.image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        self.num_image_tokens, self.template, self.max_length = num_image_tokens, template, max_length

    def __len__(self) -> int:
        return len(self.samples)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokens(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]] | str:
        """input ids and labels of the turns, or the reason they cannot be trained on."""
        if self.template == "plain":
            if (len(turns) != 2 or turns[0][0] != "user" or turns[1][0] != "assistant"
                    or IMAGE_PLACEHOLDER not in turns[0][1]):
                return "template_mismatch"
            prompt = leading_special_ids(self.tokenizer) + [self.image_id]  # the image alone, after a BOS if any
            answer = self.encode(turns[1][1] + "\n")
            return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
        return chat_tokens(self.tokenizer, [{"role": role, "content": text} for role, text in turns],
                           self.processor.chat_template)

    def image(self, relative: str) -> torch.Tensor | str:
        path = self.root / relative
        if not path.is_file():
            return "missing_image"
        try:
            image = open_rgb(path)
        except DECODE_ERRORS:
            return "unreadable_image"
        return self.pixels(image)

    def pixels(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        """The processor's pixels of an RGB image (3, H, W), padded to a square by its image processor. `seed` is
        unused: the signature of an image dataset's transform."""
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        _, i = epoch_and_index(key)
        sample = self.samples[i]
        pixels = None
        if sample.get("image") is not None:
            pixels = self.image(sample["image"])
        return self.encode_sample(sample, pixels)

    def encode_sample(self, sample: Mapping[str, Any], pixels: torch.Tensor | str | None) -> dict[str, Any]:
        """The training item of a LLaVA sample and its pixels (None: text only; a str: why it has none)."""
        if isinstance(pixels, str):
            return {"skipped": pixels, "id": sample.get("id")}
        encoded = self.tokens(normalize_turns(sample))
        if isinstance(encoded, str):
            return {"skipped": encoded, "id": sample.get("id")}
        ids, labels = encoded
        if ids.count(self.image_id) != (pixels is not None):  # an image named twice, or text naming none it has
            return {"skipped": "bad_sample", "id": sample.get("id")}
        if pixels is not None:
            at = ids.index(self.image_id)
            ids = ids[:at] + [self.image_id] * self.num_image_tokens + ids[at + 1 :]
            labels = labels[:at] + [IGNORE_INDEX] * self.num_image_tokens + labels[at + 1 :]
            if at + self.num_image_tokens > self.max_length:
                return {"skipped": "truncated_image", "id": sample.get("id")}
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return {"skipped": "no_answer", "id": sample.get("id")}
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels,
                "id": sample.get("id")}


class ShardConversationDataset(ConversationDataset):
    """LLaVA samples stored as indexed webdataset shards (local, HTTP(S) or any fsspec store; see data/shards.py),
    as `scripts/llava_to_shards.py` writes them: per sample a "json" member holding the LLaVA sample ({"id",
    "image"?, "conversations"}) and, unless it is text-only, an image member. Items are those of
    `ConversationDataset` for the same samples (a json naming an image its sample lacks: "missing_image"); it exposes
    the shard layout, so the trainers' data order reads it shard-locally and resumes exactly.

    Args:
        spec: the shard index, a folder holding it, or a shard URL / brace pattern (`data.shards.read_index`).
        processor, num_image_tokens, template, max_length: see `ConversationDataset`.
        options: `data.shard_cache.ShardOptions` (None: the defaults).
    """

    def __init__(self, spec: str | Path, processor: Any, num_image_tokens: int, template: str = "chat",
                 max_length: int = 2048, options: Any = None):
        super().__init__([], "", processor, num_image_tokens, template, max_length)
        self.shards = ShardDataset(spec, transform=self.pixels, options=options, image_optional=True)
        self.shard_lengths, self.window, self.options = self.shards.shard_lengths, self.shards.window, self.shards.options

    def __len__(self) -> int:
        return len(self.shards)

    def read_ahead(self, shards: list[int]) -> None:
        self.shards.read_ahead(shards)

    def _item(self, read: dict[str, Any] | None) -> dict[str, Any]:
        if read is None:  # an unreadable image or shard, already reported by the shard reader
            return {"skipped": "unreadable_image", "id": None}
        meta = read["meta"]
        sample = {k: v for k, v in meta.items() if k not in ("__key__", "__shard__")}
        if not is_llava_sample(sample):
            log.warning("skipping %s:%s: its json member is not a LLaVA sample", meta["__shard__"], meta["__key__"])
            return {"skipped": "bad_sample", "id": meta["__key__"]}
        sample.setdefault("id", meta["__key__"])
        pixels = read["pixel_values"]
        if pixels is None:  # text-only, unless its json names an image
            return self.encode_sample(sample, "missing_image" if "image" in sample else None)
        sample.setdefault("image", meta["__key__"])  # it has one: the image member
        return self.encode_sample(sample, pixels)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        return self._item(self.shards[key])

    def __getitems__(self, keys: list[Any]) -> list[dict[str, Any]]:
        """A micro-batch, its remote shards fetched in parallel (`ShardDataset.__getitems__`)."""
        return [self._item(read) for read in self.shards.__getitems__(keys)]


def write_llava_shards(samples: Sequence[Mapping[str, Any]], image_root: str | Path, out_dir: str | Path,
                       shard_size: int = 1000, progress: bool = True) -> dict[str, int]:
    """Write LLaVA samples as webdataset shards OUT/{shard:06d}.tar + OUT/shardindex.json, resumably (complete
    shards are kept; OUT/llava_shards.json records which samples, and another list is refused). Member names are the
    sample's position ({i:09d}.{png|jpg|...}, {i:09d}.json); the json member is the LLaVA sample as given, and a
    text-only sample is its json member alone, in its place among the others. Returns counts: shards, samples (those
    written, text-only included), text_only, missing (image files not found, left out and named in a warning).

    Args:
        samples: from `read_conversations`.
        image_root: the folder the samples' image paths are relative to.
        out_dir: output folder (created).
        shard_size: samples per shard.
        progress: show a tqdm bar.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out, root = Path(out_dir), Path(image_root)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(json.dumps(list(samples), sort_keys=True).encode()).hexdigest()
    ensure_settings(out / "llava_shards.json", {"kind": "llava-shards", "samples": digest, "shard_size": shard_size,
                                                "image_root": str(root.resolve()), "text_only": "in shards"})
    present, missing = [], []  # (position, sample) text-only or with an image file; image paths not found
    for i, s in enumerate(samples):
        if s.get("image") is None or (root / s["image"]).is_file():
            present.append((i, s))
        else:
            missing.append(s["image"])
    if missing:
        log.warning("%d image(s) not found under %s, their samples left out (first: %s)", len(missing), root, missing[0])
    urls = []
    for first in tqdm(range(0, len(present), shard_size), desc="llava shards", unit="shard", disable=not progress):
        path = out / f"{first // shard_size:06d}.tar"
        urls.append(str(path))
        if path.exists():
            continue
        members = []
        for i, sample in present[first:first + shard_size]:
            if sample.get("image") is not None:
                ext = Path(sample["image"]).suffix.lower().lstrip(".")
                if ext not in TAR_IMAGE_EXTS:
                    raise ValueError(f"sample {i}: image {sample['image']} is not one of {', '.join(TAR_IMAGE_EXTS)}")
                members.append((f"{i:09d}.{ext}", (root / sample["image"]).read_bytes()))
            members.append((f"{i:09d}.json", json.dumps(sample).encode()))
        write_tar_shard(path, members)
    write_index(urls, out / SHARD_INDEX)
    text_only = sum(s.get("image") is None for _, s in present)
    return {"shards": len(urls), "samples": len(present), "text_only": text_only, "missing": len(missing)}


def collate_llava(samples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded batch (pad id, attention 0, label IGNORE_INDEX); pixel_values of the samples with an image, in
    order (None when there is none); `tasks`: each row's "task" (data.mix; "und" when a sample has none); `skipped`:
    how many samples were dropped for their image (missing or unreadable: the trainers' skipped_images),
    `skip_reasons`: every dropped sample's reason -> count. With nothing kept, input_ids is None."""
    kept = [s for s in samples if "skipped" not in s]
    reasons = {r: sum(s.get("skipped") == r for s in samples) for r in SKIP_REASONS}
    skipped = {"skipped": reasons["missing_image"] + reasons["unreadable_image"], "skip_reasons": reasons}
    if not kept:
        return {"input_ids": None, "pixel_values": None, "examples": 0, "tasks": [], **skipped}
    length = max(s["input_ids"].numel() for s in kept)
    ids = torch.full((len(kept), length), pad_id, dtype=torch.long)
    labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(kept), length, dtype=torch.long)
    for row, s in enumerate(kept):
        n = s["input_ids"].numel()
        ids[row, :n], labels[row, :n], mask[row, :n] = s["input_ids"], s["labels"], 1
    images = [s["pixel_values"] for s in kept if s.get("pixel_values") is not None]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.stack(images) if images else None, "examples": len(kept),
            "tasks": [s.get("task", "und") for s in kept], **skipped}
