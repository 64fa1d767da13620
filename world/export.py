"""Writing the shapes world (world/shapes.py) to disk, in the formats the real loaders read, resumably:

    out_dir/images/{index:08d}.png + out_dir/captions.jsonl     image folder + jsonl (data/images.py)
    out_dir/shards/{shard:06d}.tar                              webdataset tar shards (data/images.py, data/shards.py)
    out_dir/llava_captions.json, llava_conversations.json       LLaVA's json (data/llava.py), stages 1 and 2
    out_dir/questions.jsonl                                     evaluation questions (eval/understanding.py)
    out_dir/world.json, out_dir/llava.json                      the settings; a rerun with others is refused

    export_world("runs/world/train", 20000, image_size=32, seed=0, fmt="both")
    export_llava("runs/world/train", 20000, image_size=32, seed=0)   # reuses the images written above
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.files import ensure_settings, write_atomic
from data.tar_files import write_tar_shard
from llm.understanding import SHORT_ANSWER
from world.captions import description
from world.shapes import check_image_size, render, sample_metadata

WORLD_FILE = "world.json"
LLAVA_FILE = "llava.json"
LLAVA_CAPTIONS = "llava_captions.json"
LLAVA_CONVERSATIONS = "llava_conversations.json"
QUESTIONS = "questions.jsonl"
QA_ORDER_STREAM = 0x0DE5  # SeedSequence namespace of the question order of a conversation


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_name(index: int) -> str:
    """Sample `index`'s image path, relative to the split folder."""
    return f"images/{index:08d}.png"


def export_world(out_dir: str | Path, num_samples: int, image_size: int = 64, seed: int = 0, fmt: str = "folder",
                 shard_size: int = 1000, progress: bool = True) -> None:
    """Write samples 0 .. num_samples - 1 of the world (seed, image_size) to disk, resumably.

    folder: out_dir/images/{index:08d}.png and out_dir/captions.jsonl, a line per sample: {"image": relative path,
    "caption", "tag", "include", ["exclude"], "prompt", "objects", "qa"}.
    shards: out_dir/shards/{shard:06d}.tar (webdataset): "{index:08d}.png", ".txt" (caption), ".json" (the jsonl
    line without "image"), in index order. Every file is written atomically; complete files are kept on re-runs.
    out_dir/world.json records the settings, and a re-run with other settings is refused (ConfigError).

    Args:
        out_dir: output folder (created).
        num_samples: number of samples.
        image_size: multiple of 8 in [32, 256].
        seed: world seed.
        fmt: "folder", "shards" or "both".
        shard_size: samples per tar shard.
        progress: show a tqdm bar.
    """
    check_image_size(image_size)
    if fmt not in ("folder", "shards", "both"):
        raise ValueError(f"format must be 'folder', 'shards' or 'both', got {fmt!r}")
    if num_samples < 0 or shard_size < 1:
        raise ValueError(f"need num_samples >= 0 and shard_size >= 1, got {num_samples}, {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ensure_settings(out / WORLD_FILE, {"version": 1, "seed": seed, "image_size": image_size,
                                       "num_samples": num_samples, "shard_size": shard_size})
    folder, shards = fmt in ("folder", "both"), fmt in ("shards", "both")
    if folder:
        (out / "images").mkdir(exist_ok=True)
    if shards:
        (out / "shards").mkdir(exist_ok=True)
    lines: list[str] = []
    members: list[tuple[str, bytes]] = []
    for i in tqdm(range(num_samples), desc="shapes world", unit="img", disable=not progress):
        meta, nominal = sample_metadata(seed, i, image_size)
        png_path = out / image_name(i)
        shard_path = out / "shards" / f"{i // shard_size:06d}.tar"
        need_png = folder and not png_path.exists()
        need_shard = shards and not shard_path.exists()
        png = _png_bytes(render(meta["objects"], nominal, image_size)) if need_png or need_shard else b""
        if need_png:
            write_atomic(png_path, png)
        if folder:
            lines.append(json.dumps({"image": image_name(i), "caption": meta["prompt"], **meta}) + "\n")
        if need_shard:
            members += [(f"{i:08d}.png", png), (f"{i:08d}.txt", meta["prompt"].encode()),
                        (f"{i:08d}.json", json.dumps({"caption": meta["prompt"], **meta}).encode())]
            if (i + 1) % shard_size == 0 or i + 1 == num_samples:
                write_tar_shard(shard_path, members)
                members = []
    if folder:
        data = "".join(lines).encode()
        path = out / "captions.jsonl"
        if not path.exists() or path.read_bytes() != data:
            write_atomic(path, data)


def conversation_order(questions: int, seed: int, index: int) -> tuple[list[int], bool]:
    """The order in which sample `index`'s conversation asks its questions, and whether it adds LLaVA-1.5's
    short-answer instruction to every one (half of the images, drawn per image)."""
    rng = np.random.default_rng(np.random.SeedSequence((QA_ORDER_STREAM, seed, index)))
    return rng.permutation(questions).tolist(), bool(rng.random() < 0.5)


def export_llava(out_dir: str | Path, num_samples: int, image_size: int = 32, seed: int = 0,
                 progress: bool = True) -> None:
    """The world as understanding data in LLaVA's formats, resumably (images written once, settings recorded):

    out_dir/images/{index:08d}.png
    out_dir/llava_captions.json        stage 1: one {"id", "image", "conversations": [<image>, description]} per image
    out_dir/llava_conversations.json   stage 2: every question of an image as one multi-turn conversation
    out_dir/questions.jsonl            one {"question_id", "image", "text", "answer", "type"} per question

    Stage 1's caption is the image's full description (`world.captions.description`: every object with its colour,
    and a clear relation when there is one). The evaluation questions carry LLaVA-1.5's short-answer instruction, as
    its evaluation prompt does; of the training conversations, half (drawn per image) carry it on every question and
    half ask plainly, as a chat does, with the same one-word answers (LLaVA-1.5's mix likewise holds both forms). A
    conversation asks its questions in an order drawn per image (`conversation_order`), so every question type is
    sometimes the first turn, the one an evaluation question is asked in.
    """
    check_image_size(image_size)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ensure_settings(out / LLAVA_FILE, {"version": 4, "seed": seed, "image_size": image_size,
                                       "num_samples": num_samples})
    captions, conversations, questions = [], [], []
    for i in tqdm(range(num_samples), desc="shapes world (llava)", unit="img", disable=not progress):
        meta, nominal = sample_metadata(seed, i, image_size)
        image = image_name(i)
        if not (out / image).exists():
            write_atomic(out / image, _png_bytes(render(meta["objects"], nominal, image_size)))
        captions.append({"id": f"{i:08d}", "image": image, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": description(meta["objects"])}]})
        turns = []
        order, short = conversation_order(len(meta["qa"]), seed, i)
        for k, qa in enumerate(meta["qa"][j] for j in order):
            turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + qa["question"] +
                       (SHORT_ANSWER if short else "")},
                      {"from": "gpt", "value": qa["answer"]}]
            questions.append({"question_id": f"{i:08d}-{k}", "image": image, "text": qa["question"] + SHORT_ANSWER,
                              "answer": qa["answer"], "type": qa["type"]})
        conversations.append({"id": f"{i:08d}", "image": image, "conversations": turns})
    write_atomic(out / LLAVA_CAPTIONS, json.dumps(captions))
    write_atomic(out / LLAVA_CONVERSATIONS, json.dumps(conversations))
    write_atomic(out / QUESTIONS, "".join(json.dumps(q) + "\n" for q in questions))


def mme_pope_questions(questions: list[dict]) -> tuple[list[dict], list[dict]]:
    """The world's existence questions (from `export_llava`'s questions.jsonl) as eval/understanding.py question
    records of the two yes / no benchmarks: MME (each image's pair, one yes and one no, subtask "existence", labels
    "Yes" / "No" as MME writes them) and POPE (every existence question, category "random": the absent class is
    drawn at random). "text" keeps the short-answer prompt; "question" is the bare question."""
    by_image: dict[str, list[dict]] = {}
    for q in questions:
        if q["type"] == "existence":
            by_image.setdefault(q["image"], []).append(q)
    mme, pope = [], []
    for image, pair in by_image.items():
        for q in pair:
            base = {"question_id": q["question_id"], "image": image, "text": q["text"],
                    "question": q["text"].removesuffix(SHORT_ANSWER)}
            pope.append({**base, "label": q["answer"], "category": "random"})
            if sorted(p["answer"] for p in pair) == ["no", "yes"]:
                mme.append({**base, "label": q["answer"].capitalize(), "subtask": "existence"})
    return mme, pope
