"""DPG-Bench: generate in its layout, score by its rules (eval/dpg_scoring.py, the fixed variant) through a judge.

    # the CPU default: the shapes world's DPG-style set (written by scripts/prepare_world.py), its exact judge
    python eval/dpg_bench.py --model runs/tiny-ar/export --prompts runs/world/dpg/prompts \
        --questions runs/world/dpg/dpg_bench.csv --judge shapes --out runs/tiny-ar/dpg
    # the real benchmark: ELLA's prompt folder and question csv, any LLaVA-format judge from a local path
    python eval/dpg_bench.py --model runs/qwen3-0.6b-ar/export --prompts /data/dpg_bench/prompts \\
        --questions /data/dpg_bench/dpg_bench.csv --judge llava --judge-model /ckpt/llava-1.5-7b-hf \\
        --out outputs/dpg --device cuda --dtype bf16
    # score a folder of 2x2 tiles made by any model
    python eval/dpg_bench.py --score-only outputs/other-model --questions dpg_bench.csv --judge llava --judge-model J

Generation: for every prompt (a folder of {item_id}.txt files, as DPG-Bench ships them, or a jsonl of
{"item_id", "prompt"}), 4 images tiled 2x2 into OUT/images/{item_id}.png (crops in upstream order: top-left,
top-right, bottom-left, bottom-right); image k of prompt i (prompts sorted by item_id) draws from the random stream
(seed, 4 i + k), so a resumed or re-batched run writes the same files; settings in OUT/images/generation.json.
Scoring: every crop answers every question of its prompt; OUT/answers.jsonl (one line per prompt, all crops; an
interrupted scoring resumes), OUT/scores.jsonl (per prompt), OUT/summary.json (overall, L1, L2), a printed table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from common.cli import add_device_arguments, dtype_of, reported_errors
from common.files import atomic_write, ensure_settings, resume_jsonl
from common.plugins import load_plugin, plugin_names
from data.transforms import to_pil
from eval.dpg_judges import JUDGE_PLUGINS
from eval.dpg_scoring import Question, format_summary, read_question_csv, score_prompt, summarize
from llm.sampler import SamplingConfig, add_sampling_arguments, sampling_from_arguments

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
              "dtype": str(next(t2i.model.parameters()).dtype)}
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


def score_folder(images: Path, questions: dict[str, list[Question]], judge, out: Path, prompts_per_batch: int = 8
                 ) -> dict[str, Any]:
    """Score every tile of `images` named after a prompt of the question csv; resumable through OUT/answers.jsonl."""
    tiles = sorted(p for p in images.glob("*.png"))
    unknown = [p.name for p in tiles if p.stem not in questions]
    tiles = [p for p in tiles if p.stem in questions]
    if not tiles:
        raise FileNotFoundError(f"{images} holds no PNG named after a prompt of the question csv")
    out.mkdir(parents=True, exist_ok=True)
    ensure_settings(out / "settings.json", {"images": str(images.resolve()), "judge": judge.name})
    path = out / "answers.jsonl"
    done = {row["item_id"]: [{int(k): v for k, v in crop.items()} for crop in row["answers"]]
            for row in resume_jsonl(path)}
    todo = [p for p in tiles if p.stem not in done]
    with open(path, "a") as f:
        for start in tqdm(range(0, len(todo), prompts_per_batch), desc="judge", unit="batch"):
            batch = todo[start : start + prompts_per_batch]
            pairs = [(c, k, q) for p in batch for k, c in enumerate(crops(Image.open(p).convert("RGB")))
                     for q in questions[p.stem]]
            answers = judge.answer([c for c, _, _ in pairs], [q for _, _, q in pairs])
            position = 0
            for p in batch:
                per_crop = []
                for _ in range(TILES):
                    qs = questions[p.stem]
                    per_crop.append({q.proposition_id: a for q, a in zip(qs, answers[position : position + len(qs)])})
                    position += len(qs)
                done[p.stem] = per_crop
                f.write(json.dumps({"item_id": p.stem, "answers": per_crop}) + "\n")
            f.flush()
    results = {p.stem: score_prompt(questions[p.stem], done[p.stem]) for p in tiles}
    with atomic_write(out / "scores.jsonl") as f:
        f.writelines(json.dumps({"item_id": k, "score": r["score"], "crop_scores": r["crop_scores"]}) + "\n"
                     for k, r in results.items())
    summary = {**summarize(questions, results), "judge": judge.name,
               "missing_images": len(questions) - len(tiles), "unknown_images": unknown}
    with atomic_write(out / "summary.json") as f:
        json.dump(summary, f, indent=2)
    return summary


def build_judge(args: argparse.Namespace):
    """A LLaVA-format judge from a local path, or a judge a package declares (eval.dpg_judges.JUDGE_PLUGINS)."""
    from eval.dpg_judges import LlavaJudge

    if args.judge != "llava":
        return load_plugin(JUDGE_PLUGINS, args.judge)()
    if args.judge_model is None:
        raise FileNotFoundError("--judge llava needs --judge-model DIR (a LLaVA-format export)")
    return LlavaJudge(args.judge_model, args.device, dtype_of(args.dtype))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="generator export (not needed with --score-only)")
    parser.add_argument("--prompts", type=Path, default=None, help="prompt folder or jsonl")
    parser.add_argument("--questions", type=Path, required=True, help="question csv")
    parser.add_argument("--out", type=Path, default=None, help="tiles in OUT/images, scores in OUT (default with "
                        "--score-only DIR: DIR/dpg_scores)")
    parser.add_argument("--score-only", type=Path, default=None, metavar="DIR", help="score this folder of tiles")
    parser.add_argument("--judge", default="llava", help="llava (with --judge-model), or a declared judge: "
                        + ", ".join(plugin_names(JUDGE_PLUGINS)))
    parser.add_argument("--judge-model", type=Path, default=None, help="LLaVA-format export (--judge llava)")
    parser.add_argument("--prompts-per-batch", type=int, default=8)
    add_sampling_arguments(parser, cfg_scale=3.0, seed=42)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.score_only is None and (args.model is None or args.prompts is None or args.out is None):
        parser.error("--model, --prompts and --out are required unless --score-only")
    with reported_errors():
        questions = read_question_csv(args.questions)
        judge = build_judge(args)
        out = args.out or args.score_only / "dpg_scores"
        images = args.score_only or out / "images"
        if args.score_only is None:
            from llm.pipeline import TextToImage

            t2i = TextToImage.from_pretrained(args.model, device=args.device, dtype=dtype_of(args.dtype))
            sampling = sampling_from_arguments(args, t2i.recommended)
            generate(t2i, read_prompts(args.prompts), images, sampling, args.prompts_per_batch,
                     str(args.model.resolve()))
        summary = score_folder(images, questions, judge, out)
    print(format_summary(summary))


if __name__ == "__main__":
    main()
