"""Writing the shapes world (data/shapes.py) to disk, in the formats the real loaders read, resumably:

    out_dir/images/{index:08d}.png + out_dir/captions.jsonl     image folder + jsonl
    out_dir/shards/{shard:06d}.tar                              webdataset tar shards
    out_dir/world.json                                          the settings; a rerun with others is refused

    python scripts/make_shapes.py --out runs/shapes --num 100000 --format both
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.files import ensure_settings, write_atomic
from data.shapes import check_image_size, render, sample_metadata
from data.tar_files import write_tar_shard

WORLD_FILE = "world.json"
QA_ORDER_STREAM = 0x0DE5  # SeedSequence namespace of the question order of a conversation


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


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
    bar = tqdm(range(num_samples), desc="shapes world", unit="img", disable=not progress)
    for i in bar:
        meta, nominal = sample_metadata(seed, i, image_size)
        png_path = out / "images" / f"{i:08d}.png"
        shard_path = out / "shards" / f"{i // shard_size:06d}.tar"
        need_png = folder and not png_path.exists()
        need_shard = shards and not shard_path.exists()
        png = _png_bytes(render(meta["objects"], nominal, image_size)) if need_png or need_shard else b""
        if need_png:
            write_atomic(png_path, png)
        if folder:
            lines.append(json.dumps({"image": f"images/{i:08d}.png", "caption": meta["prompt"], **meta}) + "\n")
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




def export_llava(out_dir: str | Path, num_samples: int, image_size: int = 32, seed: int = 0,
                 progress: bool = True) -> None:
    """The world as understanding data in LLaVA's formats, resumably (images written once, settings recorded):

    out_dir/images/{index:08d}.png
    out_dir/captions.json        stage 1: one {"id", "image", "conversations": [<image>, caption]} per image
    out_dir/conversations.json   stage 2: every question of an image as one multi-turn conversation
    out_dir/questions.jsonl      one {"question_id", "image", "text", "answer", "type"} per question (evaluation)

    The evaluation questions carry LLaVA-1.5's short-answer instruction, as its evaluation prompt does; of the
    training conversations, half (drawn per image) carry it on every question and half ask plainly, as a chat does,
    with the same one-word answers (LLaVA-1.5's mix likewise holds both forms). A conversation asks its questions in
    an order drawn per image (QA_ORDER_STREAM), so every question type is sometimes the first turn, the one an
    evaluation question is asked in.
    """
    from llm.understanding import SHORT_ANSWER

    check_image_size(image_size)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ensure_settings(out / WORLD_FILE, {"version": 3, "kind": "llava", "seed": seed, "image_size": image_size,
                                       "num_samples": num_samples})
    captions, conversations, questions = [], [], []
    for i in tqdm(range(num_samples), desc="shapes world (llava)", unit="img", disable=not progress):
        meta, nominal = sample_metadata(seed, i, image_size)
        image = f"images/{i:08d}.png"
        if not (out / image).exists():
            write_atomic(out / image, _png_bytes(render(meta["objects"], nominal, image_size)))
        captions.append({"id": f"{i:08d}", "image": image, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": meta["prompt"]}]})
        turns = []
        rng = np.random.default_rng(np.random.SeedSequence((QA_ORDER_STREAM, seed, i)))
        order, suffix = rng.permutation(len(meta["qa"])), SHORT_ANSWER if rng.random() < 0.5 else ""
        for k, qa in enumerate(meta["qa"][j] for j in order):
            turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + qa["question"] + suffix},
                      {"from": "gpt", "value": qa["answer"]}]
            questions.append({"question_id": f"{i:08d}-{k}", "image": image, "text": qa["question"] + SHORT_ANSWER,
                              "answer": qa["answer"], "type": qa["type"]})
        conversations.append({"id": f"{i:08d}", "image": image, "conversations": turns})
    write_atomic(out / "captions.json", json.dumps(captions))
    write_atomic(out / "conversations.json", json.dumps(conversations))
    write_atomic(out / "questions.jsonl", "".join(json.dumps(q) + "\n" for q in questions))
