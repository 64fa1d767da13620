"""What the world's foundation models know, measured on a split they never saw (the held-out one for the report, the
validation one for choosing settings):

- `siglip_retrieval`: zero-shot caption retrieval of the SigLIP: for each image, the caption of a candidate set with
  the highest image-text score, right when it is true of the image (world/captions.py). Candidates: every GenEval
  prompt of the world (612), and the split's own image descriptions.
- `attribute_probes`: linear probes (ridge regression from standardised features to one-hot labels, argmax; the
  same for every feature) per attribute: which shapes are present, each shape's count, the colour of a shape present
  once, and a pair's relative position (the strongest of GenEval's four relations, for pairs present once each
  whose relation holds), each against its majority answer.
- `lm_reading`: the LM reads an image's description and answers its questions (greedy, exact match per type).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from llm.understanding import SHORT_ANSWER
from world.captions import caption_is_true, description
from world.export import conversation_order
from world.lm import conversation, scene_text
from world.shapes import COLOR_NAMES, RELATIONS, SHAPE_NAMES, TAGS, relation_strength, task_records

ATTRIBUTES = ("presence", "count", "color", "position")
PROBE_L2 = 1.0  # the ridge penalty per sample


def read_split(split: Path) -> list[dict]:
    """The metadata of every image of a split on disk (its captions.jsonl)."""
    with open(Path(split) / "captions.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------- SigLIP


@torch.no_grad()
def siglip_retrieval(model, tokenizer, pixels: torch.Tensor, metas: Sequence[dict], max_length: int) -> dict:
    """Top-1 zero-shot retrieval accuracy (caption true of the image) over the world's GenEval prompts and over the
    images' own descriptions.

    Args:
        model: a SiglipModel. tokenizer: its tokenizer. pixels: (N, 3, H, W) in [-1, 1]. metas: the images'
        metadata. max_length: the caption length the model was trained with (padding "max_length").
    """
    model.eval()
    image = torch.nn.functional.normalize(_pooled(model.get_image_features(pixel_values=pixels)), dim=-1)
    out = {}
    prompts = sorted({r["prompt"] for tag in TAGS for r in task_records(tag)})
    for name, captions in (("geneval_prompts", prompts), ("descriptions", [description(m["objects"]) for m in metas])):
        ids = torch.tensor(tokenizer(captions, padding="max_length", max_length=max_length,
                                     truncation=True)["input_ids"])
        text = torch.nn.functional.normalize(_pooled(model.get_text_features(input_ids=ids)), dim=-1)
        best = (image @ text.T).argmax(-1).tolist()
        out[name] = float(np.mean([caption_is_true(captions[b], m["objects"]) for b, m in zip(best, metas)]))
        out[f"{name}_candidates"] = len(captions)
    return out


def _pooled(features) -> torch.Tensor:
    """transformers 5's get_*_features return an output object; the embedding is its pooler_output."""
    return features.pooler_output if hasattr(features, "pooler_output") else features


# ----------------------------------------------------------------------------------------------- linear probes


def attribute_targets(metas: Sequence[dict]) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, int]]:
    """(attribute, subject) -> (labels (N,), mask (N,) of the images it applies to, number of classes)."""
    counts = [Counter(o["shape"] for o in m["objects"]) for m in metas]
    every = torch.ones(len(metas), dtype=torch.bool)
    out = {}
    for s in SHAPE_NAMES:
        out["presence", s] = (torch.tensor([c[s] > 0 for c in counts]).long(), every, 2)
        out["count", s] = (torch.tensor([c[s] for c in counts]), every, 5)
        colors = [next((COLOR_NAMES.index(o["color"]) for o in m["objects"] if o["shape"] == s), 0) for m in metas]
        out["color", s] = (torch.tensor(colors), torch.tensor([c[s] == 1 for c in counts]), len(COLOR_NAMES))
    for i, a in enumerate(SHAPE_NAMES):
        for b in SHAPE_NAMES[i + 1:]:
            labels, mask = [], []
            for m, c in zip(metas, counts):
                strength = [0.0] * len(RELATIONS)
                if c[a] == 1 and c[b] == 1:
                    oa, ob = (next(o for o in m["objects"] if o["shape"] == s) for s in (a, b))
                    strength = [relation_strength(oa["box"], ob["box"], r) for r in RELATIONS]
                labels.append(int(np.argmax(strength)))
                mask.append(max(strength) > 0.5)
            out["position", f"{a}-{b}"] = (torch.tensor(labels), torch.tensor(mask), len(RELATIONS))
    return out


def attribute_probes(train_features: torch.Tensor, train_metas: Sequence[dict], test_features: torch.Tensor,
                     test_metas: Sequence[dict], l2: float = PROBE_L2) -> dict[str, float]:
    """Held-out accuracy of a linear probe per attribute (mean over its subjects), with each attribute's majority
    baseline ("majority <attribute>": the training labels' most frequent class, scored the same way).

    The probe of a subject is ridge regression from the features to its one-hot labels (penalty `l2` per training
    image), predicting the argmax; subjects that apply to the same images are solved together.

    Args:
        train_features, test_features: (N, D) features (flattened token features, or pixels), standardised here
            with the training features' statistics.
        train_metas, test_metas: the images' metadata.
        l2: the ridge penalty per training image.
    """
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    train_targets, test_targets = attribute_targets(train_metas), attribute_targets(test_metas)
    by_mask: dict[bytes, list[tuple[str, str]]] = {}
    for key, (_, mask, _) in train_targets.items():
        by_mask.setdefault(mask.numpy().tobytes(), []).append(key)
    scores: dict[str, list[float]] = {}
    for keys in by_mask.values():
        mask = train_targets[keys[0]][1]
        x = x_train[mask]
        onehot = torch.cat([torch.nn.functional.one_hot(train_targets[k][0][mask], train_targets[k][2]).float()
                            for k in keys], dim=1)
        bias = onehot.mean(0)
        gram = x.T @ x
        gram.diagonal().add_(l2 * len(x))
        weight = torch.linalg.solve(gram, x.T @ (onehot - bias))
        column = 0
        for key in keys:
            y, _, classes = train_targets[key]
            y_test, mask_test, _ = test_targets[key]
            scores_k = x_test[mask_test] @ weight[:, column : column + classes] + bias[column : column + classes]
            column += classes
            majority = torch.bincount(y[mask], minlength=classes).argmax()
            scores.setdefault(key[0], []).append((scores_k.argmax(-1) == y_test[mask_test]).float().mean().item())
            scores.setdefault(f"majority {key[0]}", []).append((y_test[mask_test] == majority).float().mean().item())
    return {k: float(np.mean(v)) for k, v in scores.items()}


# ----------------------------------------------------------------------------------------------- the LM


@torch.no_grad()
def lm_reading(model, tokenizer, metas: Sequence[dict], seed: int, batch_size: int = 64, questions: str = "first"
               ) -> dict[str, float]:
    """Exact match, per question type and overall, of the LM answering questions after reading an image's
    description (greedy, left-padded batches).

    Args:
        model, tokenizer: the causal LM and its tokenizer (ChatML template).
        metas: the images' metadata. seed: their world seed (it draws the question order).
        questions: "first": each image's first question, the first turn of `world.lm.conversation`; "all": every
            question of every image, each asked as the first turn after the description with LLaVA's short-answer
            instruction (as the understanding model is evaluated).
    """
    if questions not in ("first", "all"):
        raise ValueError(f"questions must be 'first' or 'all', got {questions!r}")
    model.eval()
    turns = []  # (first user turn, answer, type)
    for i, meta in enumerate(metas):
        if questions == "first":
            messages = conversation(meta, seed, i)
            first = meta["qa"][conversation_order(len(meta["qa"]), seed, i)[0][0]]
            turns.append((messages[0]["content"], messages[1]["content"], first["type"]))
        else:
            scene = scene_text(meta)
            turns += [(scene + "\n" + qa["question"] + SHORT_ANSWER, qa["answer"], qa["type"]) for qa in meta["qa"]]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True) for text, _, _ in turns]
    answers, types = [a for _, a, _ in turns], [t for _, _, t in turns]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    right: dict[str, list[bool]] = {}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=end,
                             pad_token_id=tokenizer.pad_token_id)
        for k, row in enumerate(out[:, batch["input_ids"].shape[1]:]):
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            right.setdefault(types[start + k], []).append(text == answers[start + k])
    tokenizer.padding_side = side
    result = {t: float(np.mean(v)) for t, v in sorted(right.items())}
    result["overall"] = float(np.mean([x for v in right.values() for x in v]))
    return result
