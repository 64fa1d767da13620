"""Trained vs untrained numbers of the CPU default (run after scripts/cpu_demo.sh), on held-out data:

- reconstruction of the held-out split of the world (runs/world/heldout, scripts/prepare_world.py): PSNR, SSIM, whole-pass codebook utilisation and perplexity, and
  "GenEval of reconstructions" (each reconstruction scored against its own caption by the exact detector, the
  ceiling for generated images) for an untrained tokenizer, the stage-1 export and the stage-2 export;
- how far stage 2 moved the encoder from its stage-1 teacher: ||E(X) - T(X)||^2 on held-out images, relative to
  the teacher features' variance;
- GenEval (the world's held-out prompts, 4 images each, the exact detector) of an untrained generator (same
  architecture, random weights, same tokenizer) and of the trained one;
- DPG-Bench (the shapes world's DPG-style set, the exact judge, eval/dpg_bench.py) of the same two generators, of
  real rendered images (the ceiling) and of blank images.

    python scripts/cpu_report.py            # prints a markdown table, writes runs/cpu_report.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.files import atomic_write
from data.images import build_image_dataset, collate_images
from data.transforms import ImageTransform, to_pil
from eval.geneval_scoring import ScoringConfig, score_image, summarize
from eval.reconstruction_scoring import evaluate as evaluate_reconstruction
from llm.pipeline import TextToImage
from llm.sampler import SamplingConfig
from tokenizer import VQRAE
from world.detector import ShapesDetector
from world.report import geneval_rows, report_arguments

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def reconstruction_geneval(model: VQRAE, dataset) -> float:
    """Overall GenEval score of reconstructions judged against their own captions (mean of the six task means), on
    a split of the world read as a jsonl dataset (its metadata holds each image's GenEval record)."""
    detector, results = ShapesDetector(), []
    for i in range(len(dataset)):
        sample = dataset[i]
        rec = model(sample["pixel_values"][None]).reconstruction[0].clamp(-1, 1)
        image = to_pil(rec)
        correct, _ = score_image(sample["meta"], detector.detect(image),
                                 lambda cls, dets, image=image: detector.classify_colors(image, cls, dets),
                                 ScoringConfig())
        results.append({"tag": sample["meta"]["tag"], "correct": correct, "metadata": sample["meta"]})
    return summarize(results)["overall"]


@torch.no_grad()
def distillation_gap(student: VQRAE, teacher: VQRAE, images: torch.Tensor) -> dict[str, float]:
    target = teacher.encode_features(images)
    mse = (student.encode_features(images) - target).pow(2).mean().item()
    return {"distill_mse": mse, "teacher_feature_var": target.var().item(), "relative": mse / target.var().item()}


def tokenizer_rows(stage1: Path, stage2: Path, split: Path) -> dict[str, dict]:
    """Reconstruction of the held-out split (`split`/captions.jsonl) by an untrained tokenizer (same config, random
    weights, the pretrained encoder included), the stage-1 and the stage-2 exports."""
    trained = VQRAE.from_pretrained(stage1)
    torch.manual_seed(0)
    models = {"untrained": VQRAE(trained.config), "stage 1": trained, "stage 2": VQRAE.from_pretrained(stage2)}
    dataset = build_image_dataset(str(split / "captions.jsonl"),
                                  ImageTransform(trained.config.encoder.image_size, "center"))
    rows = {}
    for name, model in models.items():
        model.eval()
        summary, _ = evaluate_reconstruction(model, dataset, batch_size=64, progress=False)
        rows[name] = {k: summary[k] for k in ("psnr", "ssim", "utilisation", "perplexity")}
        rows[name]["recon_geneval"] = reconstruction_geneval(model, dataset)
    images = collate_images([dataset[i] for i in range(min(256, len(dataset)))])["pixel_values"]
    rows["stage 2"]["distillation"] = distillation_gap(models["stage 2"], models["stage 1"], images)
    return rows


def generators(ar_dir: Path) -> dict[str, TextToImage]:
    """The trained generator export and an untrained one (same architecture, tokenizer and vocabulary, random
    weights: neither the pretraining nor the generator training)."""
    from transformers import AutoModelForCausalLM

    trained = TextToImage.from_pretrained(ar_dir / "export")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(trained.model.config).eval()
    return {"untrained": TextToImage(model, trained.tokenizer, trained.vocab, trained.vqrae, trained.fmt),
            "trained": trained}


def dpg_rows(models: dict[str, TextToImage], prompt_set: Path, out: Path, sampling: SamplingConfig
             ) -> dict[str, dict]:
    """DPG-Bench (the shapes world's set in `prompt_set`, written by scripts/prepare_world.py; the exact judge) of the
    generators, of real rendered images (4 renders of each prompt's scene: the ceiling) and of blank images (the
    floor)."""
    from PIL import Image

    from eval.dpg_generation import generate as generate_dpg
    from eval.dpg_generation import read_prompts as dpg_prompts
    from eval.dpg_generation import tile
    from eval.dpg_scoring import read_question_csv, score_folder
    from world.dpg import PROMPTS_DIR, QUESTIONS_CSV, render_dpg_scene
    from world.judge import ShapesJudge
    from world.shapes import BACKGROUND

    questions = read_question_csv(prompt_set / QUESTIONS_CSV)
    prompts = dpg_prompts(prompt_set / PROMPTS_DIR)
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


@torch.no_grad()
def main() -> None:
    args = report_arguments(__doc__)
    runs = args.runs
    tokenizers = tokenizer_rows(runs / "tiny-stage1" / "export", runs / "tiny-stage2" / "export",
                                runs / "world" / "heldout")
    sampling = args.sampling
    models = generators(runs / "tiny-ar")
    geneval = geneval_rows(models, args.prompts, runs / "cpu_report_geneval", args.n, sampling)
    dpg = dpg_rows(models, runs / "world" / "dpg", runs / "cpu_report_dpg", sampling)
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
