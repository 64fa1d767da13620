"""GenEval: generate images for every prompt of a GenEval prompt file with an exported generator, then score them.

    # the official benchmark (553 prompts, 4 images each), Mask2Former + CLIP from local directories
    python eval/geneval.py --model runs/qwen3-0.6b-ar/export --out outputs/geneval \
        --mask2former /ckpt/mask2former-swin-s-coco-instance --clip /ckpt/clip-vit-large-patch14
    # the CPU default: held-out prompts of the shapes world, scored by its exact detector (world/detector.py,
    # picked by --detector auto since it knows every class the prompts name)
    python eval/geneval.py --model runs/tiny-ar/export --prompts runs/world/geneval_prompts.jsonl \
        --out runs/tiny-ar/geneval
    # score an existing folder only (any generator that wrote GenEval's layout)
    python eval/geneval.py --score-only --out outputs/geneval --mask2former ... --clip ...

Layout (GenEval's): OUT/NNNNN/metadata.jsonl (the prompt's line), OUT/NNNNN/samples/NNNN.png; OUT/generation.json
records the model and every sampling setting; OUT/results.jsonl and OUT/summary.json hold the scores. Generation
resumes: prompt folders that already hold their images are kept (a folder started with other settings is refused,
not mixed). Image k of prompt i draws from its own random stream (--seed, i * images_per_prompt + k), so a resumed
or re-batched run writes the very images an uninterrupted one does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from common.cli import add_device_arguments, dtype_of, reported_errors
from common.files import atomic_write, ensure_settings
from common.plugins import load_plugin, plugin_names
from data.transforms import to_pil
from eval.geneval_scoring import ScoringConfig, evaluate_folder, summarize, write_summary
from llm.sampler import SamplingConfig, add_sampling_arguments, sampling_from_arguments

SETTINGS_FILE = "generation.json"
DETECTOR_PLUGINS = "vqrae.geneval_detectors"  # entry-point group: name -> a Detector class built without arguments

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


def prompt_done(folder: Path, n: int) -> bool:
    """True when a prompt's folder holds its metadata and all n images (resume skips it)."""
    return (folder / "metadata.jsonl").is_file() and all((folder / "samples" / f"{j:04d}.png").is_file()
                                                         for j in range(n))


def generate(t2i, prompts: list[dict], out: Path, n: int, sampling: SamplingConfig, prompts_per_batch: int,
             model_name: str) -> None:
    """Write n images per prompt of `t2i` (an llm.pipeline.TextToImage) in GenEval's layout, skipping finished
    prompts; image k of prompt i is sampled from stream i * n + k. A folder started with other settings is refused
    rather than mixed."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": model_name, "images_per_prompt": n, "sampling": sampling.to_dict(),
              "image_streams": "image k of prompt i: (seed, i * images_per_prompt + k)",
              "dtype": str(next(t2i.model.parameters()).dtype)}
    todo = [i for i in range(len(prompts)) if not prompt_done(out / f"{i:05d}", n)]
    if len(todo) == len(prompts):  # nothing generated yet: the settings may be new
        (out / SETTINGS_FILE).unlink(missing_ok=True)
    ensure_settings(out / SETTINGS_FILE, record)
    for start in tqdm(range(0, len(todo), prompts_per_batch), desc="generate", unit="batch"):
        batch = todo[start : start + prompts_per_batch]
        texts = [prompts[i]["prompt"] for i in batch for _ in range(n)]
        images, _ = t2i.generate(texts, sampling, image_ids=[i * n + k for i in batch for k in range(n)])
        for b, i in enumerate(batch):
            folder = out / f"{i:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            for k in range(n):
                with atomic_write(folder / "samples" / f"{k:04d}.png", "wb") as f:
                    to_pil(images[b * n + k].float().cpu()).save(f, format="PNG")
            with atomic_write(folder / "metadata.jsonl") as f:
                f.write(json.dumps(prompts[i]) + "\n")


def build_detector(args: argparse.Namespace, classes: set[str]):
    """Mask2Former + CLIP from local checkpoints, or a detector a package declares (DETECTOR_PLUGINS); "auto": the
    first declared detector whose `classes` hold every class of the prompts (`classes`), else Mask2Former."""
    name = args.detector
    if name == "auto":
        known = {n: set(getattr(load_plugin(DETECTOR_PLUGINS, n), "classes", ())) for n in plugin_names(DETECTOR_PLUGINS)}
        name = next((n for n, c in known.items() if classes and classes <= c), "mask2former")
    if name != "mask2former":
        return load_plugin(DETECTOR_PLUGINS, name)()
    from eval.mask2former_clip import Mask2FormerClipDetector

    if not args.mask2former or not args.clip:
        raise FileNotFoundError("--detector mask2former needs --mask2former DIR and --clip DIR (local checkpoints)")
    return Mask2FormerClipDetector.from_pretrained(args.mask2former, args.clip, device=args.device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="generator export (train/ar_gen.py); not needed with --score-only")
    parser.add_argument("--prompts", type=Path, default=OFFICIAL_PROMPTS)
    parser.add_argument("--out", type=Path, default=None, help="output folder (required)")
    parser.add_argument("-n", "--images-per-prompt", type=int, default=4)
    parser.add_argument("--prompts-per-batch", type=int, default=4)
    add_sampling_arguments(parser, seed=42)
    add_device_arguments(parser)
    parser.add_argument("--detector", default="auto", help="auto (a declared detector that knows every class of the "
                        "prompts, else mask2former), mask2former, or a declared detector: "
                        + ", ".join(plugin_names(DETECTOR_PLUGINS)))
    parser.add_argument("--mask2former", default="", help="local Mask2Former COCO instance checkpoint directory")
    parser.add_argument("--clip", default="", help="local CLIP ViT-L/14 directory")
    parser.add_argument("--score-only", action="store_true")
    args = parser.parse_args(argv)
    with reported_errors():  # what is wrong, in the order a user fixes it: the model, the output, the detector
        from llm.pipeline import TextToImage

        if not args.score_only:
            if args.model is None:
                raise ValueError("--model is required (a generator export) unless --score-only")
            TextToImage.check(args.model)
        if args.out is None:
            raise ValueError("--out is required (where the images and scores go)")
        if args.score_only:
            rows = [json.loads(p.read_text().splitlines()[0]) for p in sorted(args.out.glob("*/metadata.jsonl"))]
        else:
            rows = read_prompts(args.prompts)
        detector = build_detector(args, prompt_classes(rows))
        if not args.score_only:
            t2i = TextToImage.from_pretrained(args.model, device=args.device, dtype=dtype_of(args.dtype))
            sampling = sampling_from_arguments(args, t2i.recommended)
            generate(t2i, rows, args.out, args.images_per_prompt, sampling, args.prompts_per_batch,
                     str(args.model.resolve()))
        results = evaluate_folder(args.out, detector, ScoringConfig())
    summary = summarize(results)
    summary["detector"] = detector.name
    write_summary(summary, args.out / "summary.json")


if __name__ == "__main__":
    main()
