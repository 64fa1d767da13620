"""GenEval's image layout, generated: its prompt file read, n images per prompt of a generator export written as
OUT/NNNNN/metadata.jsonl (the prompt's line) and OUT/NNNNN/samples/NNNN.png, resumably (`generate`); run by
eval/geneval.py and the CPU default's report.

Generation resumes: prompt folders that already hold their prompt's metadata and exactly its images are kept (a
folder started with other settings or another prompt file, recorded in OUT/generation.json, is refused, not mixed;
images a scorer would count beside a prompt's own are removed when it is written). Image k of prompt i draws from
its own random stream (seed, i * images_per_prompt + k), so a resumed or re-batched run writes the very images an
uninterrupted one does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from common.files import atomic_write, ensure_settings, json_digest
from data.transforms import to_pil
from eval.geneval_scoring import sample_images
from llm.sampler import SamplingConfig

SETTINGS_FILE = "generation.json"

OFFICIAL_PROMPTS = Path(__file__).resolve().parent / "geneval_official" / "evaluation_metadata.jsonl"


def prompt_classes(rows: list[dict]) -> set[str]:
    """The object classes prompt rows name (their "include" and "exclude" entries)."""
    return {item["class"] for r in rows for key in ("include", "exclude") for item in r.get(key, [])}


def read_prompts(path: Path) -> list[dict]:
    """The rows of a GenEval prompt file (one JSON object a line with at least 'tag' and 'prompt')."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows or any("prompt" not in r or "tag" not in r for r in rows):
        raise ValueError(f"{path} is not a GenEval prompt file (one JSON object a line with 'tag' and 'prompt')")
    return rows


def sample_names(n: int) -> set[str]:
    """The names of a prompt's n images in samples/."""
    return {f"{k:04d}.png" for k in range(n)}


def prompt_done(folder: Path, n: int, row: dict) -> bool:
    """True when a prompt's folder holds this prompt's metadata and exactly its n images (resume skips it); a folder
    of another prompt, or with images the scorer would count beside them (`sample_images`), is written again."""
    metadata = folder / "metadata.jsonl"
    return (metadata.is_file() and metadata.read_text() == json.dumps(row) + "\n"
            and {p.name for p in sample_images(folder)} == sample_names(n))


def generate(t2i, prompts: list[dict], out: Path, n: int, sampling: SamplingConfig, prompts_per_batch: int,
             model_name: str) -> dict[str, float]:
    """Write n images per prompt of `t2i` (an llm.pipeline.TextToImage) in GenEval's layout, skipping finished
    prompts; image k of prompt i is sampled from stream i * n + k. A folder started with other settings is refused
    rather than mixed. Returns what this call drew: images, batches, forwards (the model forwards of all batches, each
    batch's images drawn together) and seconds (in `t2i.generate`, decoding included)."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": model_name, "images_per_prompt": n, "sampling": sampling.to_dict(),
              "image_streams": "image k of prompt i: (seed, i * images_per_prompt + k)",
              "dtype": str(next(t2i.model.parameters()).dtype), "prompts": json_digest(prompts)}
    todo = [i for i in range(len(prompts)) if not prompt_done(out / f"{i:05d}", n, prompts[i])]
    if len(todo) == len(prompts):  # nothing generated yet: the settings may be new
        (out / SETTINGS_FILE).unlink(missing_ok=True)
    ensure_settings(out / SETTINGS_FILE, record)
    stats = {"images": 0, "batches": 0, "forwards": 0, "seconds": 0.0}
    for start in tqdm(range(0, len(todo), prompts_per_batch), desc="generate", unit="batch"):
        batch = todo[start : start + prompts_per_batch]
        texts = [prompts[i]["prompt"] for i in batch for _ in range(n)]
        began = time.perf_counter()
        images, _ = t2i.generate(texts, sampling, image_ids=[i * n + k for i in batch for k in range(n)])
        stats["seconds"] += time.perf_counter() - began
        stats["images"] += len(texts)
        stats["batches"] += 1
        stats["forwards"] += t2i.sampler.forwards
        for b, i in enumerate(batch):
            folder = out / f"{i:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            for stale in (p for p in sample_images(folder) if p.name not in sample_names(n)):
                stale.unlink()
            for k in range(n):
                with atomic_write(folder / "samples" / f"{k:04d}.png", "wb") as f:
                    to_pil(images[b * n + k].float().cpu()).save(f, format="PNG")
            with atomic_write(folder / "metadata.jsonl") as f:
                f.write(json.dumps(prompts[i]) + "\n")
    return stats
