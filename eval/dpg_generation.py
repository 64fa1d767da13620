"""DPG-Bench's image layout, generated: its prompts read (a folder of {item_id}.txt files, as DPG-Bench ships them,
or a jsonl of {"item_id", "prompt"}), 4 images per prompt of a generator export tiled 2x2 into OUT/{item_id}.png
(crops in upstream order: top-left, top-right, bottom-left, bottom-right), resumably (`generate`); run by
eval/dpg_bench.py and the CPU default's report. Image k of prompt i (prompts sorted by item_id) draws from the random
stream (seed, 4 i + k), so a resumed or re-batched run writes the same files; settings in OUT/generation.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from common.files import atomic_write, ensure_settings, json_digest
from data.transforms import to_pil
from llm.sampler import SamplingConfig

TILES = 4  # images per prompt, tiled 2x2
SETTINGS_FILE = "generation.json"


def read_prompts(path: Path) -> list[tuple[str, str]]:
    """(item_id, prompt) pairs sorted by item_id, from a folder of {item_id}.txt files or a jsonl."""
    if path.is_dir():
        rows = [(p.stem, p.read_text(encoding="utf-8").strip()) for p in path.glob("*.txt")]
    elif path.is_file():
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                row = json.loads(line)
                if "item_id" not in row or "prompt" not in row:
                    raise ValueError(f"{path}: line {i + 1} lacks 'item_id' or 'prompt'")
                rows.append((str(row["item_id"]), row["prompt"]))
    else:
        raise FileNotFoundError(f"prompts {path} not found (a folder of .txt files or a jsonl)")
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    if len({item for item, _ in rows}) != len(rows):
        raise ValueError(f"{path}: item ids are not unique")
    return sorted(rows)


def tile(images: list[Image.Image]) -> Image.Image:
    """Four equal images as one 2x2 tile (top-left, top-right, bottom-left, bottom-right)."""
    w, h = images[0].size
    out = Image.new("RGB", (2 * w, 2 * h))
    for k, image in enumerate(images):
        out.paste(image, ((k % 2) * w, (k // 2) * h))
    return out


def crops(image: Image.Image) -> list[Image.Image]:
    """The four crops of a 2x2 tile, in upstream order."""
    if image.width != image.height or image.width % 2:
        raise ValueError(f"a DPG-Bench tile is square with an even side, got {image.width}x{image.height}")
    r = image.width // 2
    return [image.crop(box) for box in ((0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r))]


def generate(t2i, prompts: list[tuple[str, str]], out: Path, sampling: SamplingConfig, prompts_per_batch: int,
             model_name: str) -> None:
    """Write each prompt's 2x2 tile (skipping finished ones); a folder started with other settings is refused."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": model_name, "images_per_prompt": TILES, "sampling": sampling.to_dict(),
              "image_streams": "image k of prompt i (sorted by item_id): (seed, 4 i + k)",
              "dtype": str(next(t2i.model.parameters()).dtype), "prompts": json_digest(prompts)}
    todo = [i for i, (item, _) in enumerate(prompts) if not (out / f"{item}.png").is_file()]
    if len(todo) == len(prompts):  # nothing generated yet: the settings may be new
        (out / SETTINGS_FILE).unlink(missing_ok=True)
    ensure_settings(out / SETTINGS_FILE, record)
    for start in tqdm(range(0, len(todo), prompts_per_batch), desc="generate", unit="batch"):
        batch = todo[start : start + prompts_per_batch]
        texts = [prompts[i][1] for i in batch for _ in range(TILES)]
        images, _ = t2i.generate(texts, sampling, image_ids=[i * TILES + k for i in batch for k in range(TILES)])
        pictures = to_pil(images.float().cpu())
        for b, i in enumerate(batch):
            with atomic_write(out / f"{prompts[i][0]}.png", "wb") as f:
                tile(pictures[b * TILES : (b + 1) * TILES]).save(f, format="PNG")
