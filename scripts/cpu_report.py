"""Trained vs untrained numbers of the CPU default (run after scripts/cpu_demo.sh), on held-out data:

- reconstruction of the held-out shapes world: PSNR, SSIM, whole-pass codebook utilisation and perplexity, and
  "GenEval of reconstructions" (each reconstruction scored against its own caption by the exact detector, the
  ceiling for generated images) for an untrained tokenizer, the stage-1 export and the stage-2 export;
- how far stage 2 moved the encoder from its stage-1 teacher: ||E(X) - T(X)||^2 on held-out images, relative to
  the teacher features' variance;
- GenEval (the shapes world's held-out prompts, 4 images each, the exact detector) of an untrained generator (same
  architecture, random weights, same tokenizer) and of the trained one;
- DPG-Bench (the shapes world's DPG-style set, the exact judge, eval/dpg_bench.py) of the same two generators, of
  real rendered images (the ceiling) and of blank images.

    python scripts/cpu_report.py            # prints a markdown table, writes runs/cpu_report.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import yaml

from common.config import from_dict
from common.files import atomic_write
from data.images import build_image_dataset, collate_images
from data.shapes import ShapesWorld, world_texts
from data.transforms import ImageTransform, pil_to_tensor, to_pil
from eval.geneval import generate, read_prompts
from eval.geneval_scoring import ScoringConfig, evaluate_folder, score_image, summarize
from eval.reconstruction import evaluate as evaluate_reconstruction
from eval.shapes_detector import ShapesDetector
from llm.generator import LMConfig, build_lm
from llm.pipeline import TextToImage
from llm.sampler import SamplingConfig
from tokenizer import VQRAE

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def reconstruction_geneval(model: VQRAE, world: ShapesWorld) -> float:
    """Overall GenEval score of reconstructions judged against their own captions (mean of the six task means)."""
    detector, results = ShapesDetector(), []
    for i in range(len(world)):
        sample = world[i]
        rec = model(pil_to_tensor(sample["image"])[None]).reconstruction[0].clamp(-1, 1)
        image = to_pil(rec)
        correct, _ = score_image(sample["metadata"], detector.detect(image),
                                 lambda cls, dets, image=image: detector.classify_colors(image, cls, dets),
                                 ScoringConfig())
        results.append({"tag": sample["metadata"]["tag"], "correct": correct, "metadata": sample["metadata"]})
    return summarize(results)["overall"]


@torch.no_grad()
def distillation_gap(student: VQRAE, teacher: VQRAE, images: torch.Tensor) -> dict[str, float]:
    target = teacher.encode_features(images)
    mse = (student.encode_features(images) - target).pow(2).mean().item()
    return {"distill_mse": mse, "teacher_feature_var": target.var().item(), "relative": mse / target.var().item()}


def tokenizer_rows(stage1: Path, stage2: Path, eval_data: str, world: ShapesWorld) -> dict[str, dict]:
    trained = VQRAE.from_pretrained(stage1)
    torch.manual_seed(0)
    models = {"untrained": VQRAE(trained.config), "stage 1": trained, "stage 2": VQRAE.from_pretrained(stage2)}
    dataset = build_image_dataset(eval_data, ImageTransform(world.image_size, "center"))
    rows = {}
    for name, model in models.items():
        model.eval()
        summary, _ = evaluate_reconstruction(model, dataset, batch_size=64, progress=False)
        rows[name] = {k: summary[k] for k in ("psnr", "ssim", "utilisation", "perplexity")}
        rows[name]["recon_geneval"] = reconstruction_geneval(model, world)
    images = collate_images([dataset[i] for i in range(min(256, len(dataset)))])["pixel_values"]
    rows["stage 2"]["distillation"] = distillation_gap(models["stage 2"], models["stage 1"], images)
    return rows


def generators(ar_dir: Path, out: Path) -> dict[str, TextToImage]:
    """The trained generator export and an untrained one (same architecture and tokenizer, random weights)."""
    trained = TextToImage.from_pretrained(ar_dir / "export")
    run = yaml.safe_load((ar_dir / "config.yaml").read_text())  # the generator run's resolved config
    lm = from_dict(LMConfig, run["lm"], prefix="lm.")
    model, tokenizer, vocab = build_lm(lm, trained.vqrae, out / "untrained-lm", seed=run["run"]["seed"],
                                       texts=None if lm.pretrained else world_texts())
    return {"untrained": TextToImage(model.eval(), tokenizer, vocab, trained.vqrae, lm.sequence_format),
            "trained": trained}


def geneval_rows(models: dict[str, TextToImage], prompts: Path, out: Path, n: int, sampling: SamplingConfig
                 ) -> dict[str, dict]:
    rows, detector = {}, ShapesDetector()
    for name, t2i in models.items():
        folder = out / name.replace(" ", "-")
        generate(t2i, read_prompts(prompts), folder, n, sampling, prompts_per_batch=8, model_name=name)
        summary = summarize(evaluate_folder(folder, detector, ScoringConfig(), progress=False))
        rows[name] = {"overall": summary["overall"], **{t: v["score"] for t, v in summary["tasks"].items()}}
    return rows


def dpg_rows(models: dict[str, TextToImage], prompt_set: Path, out: Path, sampling: SamplingConfig
             ) -> dict[str, dict]:
    """DPG-Bench (the shapes world's set, the exact judge) of the generators, of real rendered images (4 renders of
    each prompt's scene: the ceiling) and of blank images (the floor)."""
    from PIL import Image

    from data.shapes import BACKGROUND
    from data.shapes_dpg import render_dpg_scene, write_dpg_bench
    from eval.dpg_bench import SHAPES_PROMPTS, score_folder, tile
    from eval.dpg_bench import generate as generate_dpg
    from eval.dpg_bench import read_prompts as dpg_prompts
    from eval.dpg_judges import ShapesJudge
    from eval.dpg_scoring import read_question_csv

    questions = read_question_csv(write_dpg_bench(prompt_set, SHAPES_PROMPTS))
    prompts = dpg_prompts(prompt_set / "prompts")
    size = next(iter(models.values())).vqrae.config.encoder.image_size
    fixed = {"real rendered images": lambda i: render_dpg_scene(0, i, size)[0],
             "blank images": lambda i: Image.new("RGB", (size, size), BACKGROUND)}
    rows, judge = {}, ShapesJudge()
    for name in (*models, *fixed):
        folder = out / name.replace(" ", "-")
        if name in models:
            generate_dpg(models[name], prompts, folder / "images", sampling, 8, name)
        else:
            for i, (item, _) in enumerate(prompts):
                if not (folder / "images" / f"{item}.png").is_file():
                    with atomic_write(folder / "images" / f"{item}.png", "wb") as f:
                        tile([fixed[name](i)] * 4).save(f, format="PNG")
        summary = score_folder(folder / "images", questions, judge, folder)
        rows[name] = {"overall": summary["overall"], **summary["l1"]}
    return rows


def generator_sampling(runs: Path, cfg_scale: float | None = None) -> SamplingConfig:
    """How the CPU default draws: the generator run's own sampling settings (`sample.sampling` of
    RUNS/tiny-ar/config.yaml, from train/configs/ar_gen/tiny.yaml) with seed 42, and cfg_scale when given."""
    run = yaml.safe_load((runs / "tiny-ar" / "config.yaml").read_text())  # the generator run's resolved config
    sampling = from_dict(SamplingConfig, run["sample"]["sampling"], prefix="sample.sampling.")
    return dataclasses.replace(sampling, seed=42, cfg_scale=sampling.cfg_scale if cfg_scale is None else cfg_scale)


def report_arguments(description: str) -> argparse.Namespace:
    """The command line of the CPU default's reports: --runs, --prompts (GenEval's), -n images per prompt,
    --cfg-scale; `sampling` is what they draw with (`generator_sampling`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--prompts", type=Path, default=REPO / "data" / "shapes_geneval_prompts.jsonl")
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the generator run's")
    args = parser.parse_args()
    args.sampling = generator_sampling(args.runs, args.cfg_scale)
    return args


@torch.no_grad()
def main() -> None:
    args = report_arguments(__doc__)
    runs = args.runs
    stage1 = VQRAE.from_pretrained(runs / "tiny-stage1" / "export")
    world = ShapesWorld(500, stage1.config.encoder.image_size, seed=1)  # the eval shards: 500 images of seed 1
    tokenizers = tokenizer_rows(runs / "tiny-stage1" / "export", runs / "tiny-stage2" / "export",
                                str(runs / "world-32" / "eval" / "shards"), world)
    sampling = args.sampling
    models = generators(runs / "tiny-ar", runs / "cpu_report_geneval")
    geneval = geneval_rows(models, args.prompts, runs / "cpu_report_geneval", args.n, sampling)
    dpg = dpg_rows(models, runs / "dpg-shapes", runs / "cpu_report_dpg", sampling)
    report = {"tokenizer": tokenizers, "geneval": geneval, "dpg": dpg, "sampling": sampling.to_dict(),
              "images_per_prompt": args.n}
    with atomic_write(runs / "cpu_report.json") as f:
        json.dump(report, f, indent=2)
    print("| tokenizer | PSNR | SSIM | utilisation | perplexity | GenEval of reconstructions |")
    print("|---|---|---|---|---|---|")
    for name, r in tokenizers.items():
        print(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['utilisation']:.3f} | {r['perplexity']:.1f} | "
              f"{r['recon_geneval']:.3f} |")
    d = tokenizers["stage 2"]["distillation"]
    print(f"\nstage 2 ||E(X) - T(X)||^2 = {d['distill_mse']:.2e} ({d['relative']:.2%} of the teacher features' variance)")
    for title, rows, digits in (("generator (GenEval)", geneval, 3), ("images (DPG-Bench, x 100)", dpg, 2)):
        columns = [t for t in rows["trained"] if t != "overall"]
        print(f"\n| {title} | " + " | ".join(columns) + " | overall |")
        print("|---" * (len(columns) + 2) + "|")
        for name, r in rows.items():
            print(f"| {name} | " + " | ".join(f"{r[t]:.{digits}f}" for t in columns) + f" | {r['overall']:.{digits}f} |")


if __name__ == "__main__":
    main()
