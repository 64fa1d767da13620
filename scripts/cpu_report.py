"""Trained vs untrained numbers of the CPU default (run after scripts/cpu_demo.sh), on held-out data:

- reconstruction of the held-out shapes world: PSNR, SSIM, whole-pass codebook utilisation and perplexity, and
  "GenEval of reconstructions" (each reconstruction scored against its own caption by the exact detector, the
  ceiling for generated images) for an untrained tokenizer, the stage-1 export and the stage-2 export;
- how far stage 2 moved the encoder from its stage-1 teacher: ||E(X) - T(X)||^2 on held-out images, relative to
  the teacher features' variance;
- GenEval (the shapes world's held-out prompts, 4 images each, the exact detector) of an untrained generator (same
  architecture, random weights, same tokenizer) and of the trained one.

    python scripts/cpu_report.py            # prints a markdown table, writes runs/cpu_report.json
"""

from __future__ import annotations

import argparse
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


def geneval_rows(ar_dir: Path, prompts: Path, out: Path, n: int, sampling: SamplingConfig) -> dict[str, dict]:
    trained = TextToImage.from_pretrained(ar_dir / "export")
    run = yaml.safe_load((ar_dir / "config.yaml").read_text())  # the generator run's resolved config
    lm = from_dict(LMConfig, run["lm"], prefix="lm.")
    model, tokenizer, vocab = build_lm(lm, trained.vqrae, out / "untrained-lm", seed=run["run"]["seed"],
                                       texts=None if lm.pretrained else world_texts())
    untrained = TextToImage(model.eval(), tokenizer, vocab, trained.vqrae, lm.sequence_format)
    rows, detector = {}, ShapesDetector()
    for name, t2i in (("untrained", untrained), ("trained", trained)):
        folder = out / name.replace(" ", "-")
        generate(t2i, read_prompts(prompts), folder, n, sampling, prompts_per_batch=8, model_name=name)
        summary = summarize(evaluate_folder(folder, detector, ScoringConfig(), progress=False))
        rows[name] = {"overall": summary["overall"], **{t: v["score"] for t, v in summary["tasks"].items()}}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--prompts", type=Path, default=REPO / "data" / "shapes_geneval_prompts.jsonl")
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    args = parser.parse_args()
    runs = args.runs
    stage1 = VQRAE.from_pretrained(runs / "tiny-stage1" / "export")
    world = ShapesWorld(300, stage1.config.encoder.image_size, seed=1)  # the eval seed of the CPU default
    tokenizers = tokenizer_rows(runs / "tiny-stage1" / "export", runs / "tiny-stage2" / "export",
                                str(runs / "world-32" / "eval" / "shards"), world)
    sampling = SamplingConfig(cfg_scale=args.cfg_scale, temperature=1.0, seed=42)
    generators = geneval_rows(runs / "tiny-ar", args.prompts, runs / "cpu_report_geneval", args.n, sampling)
    report = {"tokenizer": tokenizers, "geneval": generators, "sampling": sampling.to_dict(), "images_per_prompt": args.n}
    with atomic_write(runs / "cpu_report.json") as f:
        json.dump(report, f, indent=2)
    print("| tokenizer | PSNR | SSIM | utilisation | perplexity | GenEval of reconstructions |")
    print("|---|---|---|---|---|---|")
    for name, r in tokenizers.items():
        print(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['utilisation']:.3f} | {r['perplexity']:.1f} | "
              f"{r['recon_geneval']:.3f} |")
    d = tokenizers["stage 2"]["distillation"]
    print(f"\nstage 2 ||E(X) - T(X)||^2 = {d['distill_mse']:.2e} ({d['relative']:.2%} of the teacher features' variance)")
    tasks = [t for t in generators["trained"] if t != "overall"]
    print("\n| generator | " + " | ".join(tasks) + " | overall |")
    print("|---" * (len(tasks) + 2) + "|")
    for name, r in generators.items():
        print(f"| {name} | " + " | ".join(f"{r[t]:.3f}" for t in tasks) + f" | {r['overall']:.3f} |")


if __name__ == "__main__":
    main()
