"""Held-out numbers of the CPU default's understanding model (run after the understanding stages):

- exact match per question type (colour, count, existence, position) on 300 shapes-world images of a seed the
  training never saw, for the stage-1 and the stage-2 exports;
- two baselines measured here: the majority answer per type of the training questions, and the stage-2 model
  answering on a blank (mean-coloured) image instead of the real one (what it knows without looking);
- a logistic-regression probe for "is there a <shape>" on the tokenizer encoder's features and on raw pixels
  (trained on 5000 training images, scored on the held-out ones): how linearly the features carry shape identity.

With --plug-and-play, the paper's plug-and-play claim on the same questions: an understanding model trained (both
stages, the CPU default's configs) on the stage-1 tokenizer's encoder (frozen in tokenizer stage 1: the
"pretrained VFM"), then evaluated with its vision tower swapped, without retraining, for the stage-2 encoder
(self-distilled to the VFM) and for a stage-2 encoder trained without self-distillation (loss.distill_weight=0);
with the cosine similarity of each encoder's features to the VFM's on the held-out images. The runs it needs and
lacks are trained first (about 10 minutes on 2 cores).

    python scripts/understanding_report.py                  # markdown table, runs/understanding_report.json
    python scripts/understanding_report.py --plug-and-play  # and the swap table, runs/plug_and_play_report.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root first

import torch
from PIL import Image

from common.cli import reported_errors
from common.files import atomic_write
from data.shapes_export import export_llava
from eval.understanding import main as evaluate
from eval.understanding_scoring import majority_answers, score_exact_match

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train" / "configs"
HELD_OUT_SEED = 1  # the training conversations use seed 0


def held_out_questions(runs: Path, images: int) -> Path:
    """The held-out question file (exported once)."""
    world = runs / "world-llava-eval"
    export_llava(world, images, image_size=32, seed=HELD_OUT_SEED, progress=False)
    return world / "questions.jsonl"


def exact_match(export: Path, questions: Path, out: Path, *extra: str) -> dict[str, Any]:
    """eval/understanding.py's summary of an export on the question file (resumes in `out`)."""
    evaluate(["--model", str(export), "--questions", str(questions), "--out", str(out), "--device", "cpu", *extra])
    return json.loads((out / "summary.json").read_text())


def table(rows: dict[str, dict[str, Any]], extra: dict[str, str] | None = None) -> str:
    types = list(next(iter(rows.values()))["types"])
    head = "| model | " + " | ".join(types) + " | overall |" + (" feature cosine to the VFM |" if extra else "")
    lines = [head, "|---" * (len(types) + 2 + bool(extra)) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['types'][t]['accuracy']:.3f}" for t in types) +
                     f" | {r['overall']:.3f} |" + (f" {extra.get(name, '')} |" if extra else ""))
    return "\n".join(lines)


@torch.no_grad()
def _inputs(tokenizer: Path, world: Path, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels, encoder features, shape-presence labels) of the first `count` images of a LLaVA world export."""
    from data.shapes import SHAPE_NAMES, sample_metadata
    from data.transforms import pil_to_tensor
    from tokenizer.model import VQRAE

    vqrae = VQRAE.from_pretrained(tokenizer).eval()
    pixels = torch.stack([pil_to_tensor(Image.open(world / "images" / f"{i:08d}.png").convert("RGB"))
                          for i in range(count)])
    features = torch.cat([vqrae.encode_features(pixels[s : s + 256]) for s in range(0, count, 256)])
    labels = torch.tensor([[any(o["shape"] == c for o in sample_metadata(seed, i, 32)[0]["objects"])
                            for c in SHAPE_NAMES] for i in range(count)], dtype=torch.float32)
    return pixels, features, labels


def shape_probe(runs: Path, images: int, train_images: int = 5000, steps: int = 300) -> dict[str, list[float]]:
    """Held-out accuracy of a logistic-regression probe for "is there a <shape>" (one per shape), on the tokenizer
    encoder's flattened features and on raw pixels: how linearly the features carry shape identity."""
    from data.shapes import SHAPE_NAMES

    tokenizer = runs / "tiny-stage2" / "export"
    train = _inputs(tokenizer, runs / "world-llava", 0, train_images)
    test = _inputs(tokenizer, runs / "world-llava-eval", HELD_OUT_SEED, images)
    out = {"shapes": list(SHAPE_NAMES), "held_out_base_rate": test[2].mean(0).tolist()}
    torch.manual_seed(0)
    for name, k in (("features", 1), ("pixels", 0)):
        x, x_test = train[k].flatten(1), test[k].flatten(1)
        mean, std = x.mean(0), x.std(0) + 1e-6
        x, x_test = (x - mean) / std, (x_test - mean) / std
        weight = torch.zeros(x.shape[1], len(SHAPE_NAMES), requires_grad=True)
        bias = torch.zeros(len(SHAPE_NAMES), requires_grad=True)
        opt = torch.optim.Adam([weight, bias], lr=1e-3)
        for _ in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, train[2])
            opt.zero_grad()
            (loss + 1e-4 * weight.square().sum()).backward()
            opt.step()
        with torch.no_grad():
            out[name] = (((x_test @ weight + bias) > 0).float() == test[2]).float().mean(0).tolist()
    return out


def stage_report(runs: Path, questions: Path) -> None:
    rows = {}
    for name, model, extra in (("stage 1", "tiny-und-stage1", []), ("stage 2", "tiny-und-stage2", []),
                               ("stage 2, blank image", "tiny-und-stage2", ["--blank-images"])):
        out = runs / "understanding_report" / name.replace(" ", "-").replace(",", "")
        rows[name] = exact_match(runs / model / "export", questions, out, *extra)
    train = [json.loads(line) for line in (runs / "world-llava" / "questions.jsonl").read_text().splitlines()]
    majority = majority_answers([{"type": q["type"], "label": q["answer"]} for q in train])
    held_out = [json.loads(line) for line in questions.read_text().splitlines()]
    rows["majority answer per type"] = score_exact_match(
        [{"type": q["type"], "answer": majority[q["type"]], "label": q["answer"]} for q in held_out])
    probe = shape_probe(runs, len({q["image"] for q in held_out}))
    with atomic_write(runs / "understanding_report.json") as f:
        json.dump({"rows": rows, "majority": majority, "shape_probe": probe}, f, indent=2)
    print(table(rows))
    print("linear probe, held-out accuracy of 'is there a <shape>' (" + ", ".join(probe["shapes"]) + "): features " +
          " ".join(f"{a:.3f}" for a in probe["features"]) + ", pixels " + " ".join(f"{a:.3f}" for a in probe["pixels"])
          + ", base rate " + " ".join(f"{a:.3f}" for a in probe["held_out_base_rate"]))


# ------------------------------------------------------------------------------------------------ plug-and-play


def train(script: str, *argv: str) -> None:
    """One CPU-default training run through the DeepSpeed launcher (a finished run only re-exports)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    subprocess.run([str(launcher), f"train/{script}.py", *argv], cwd=REPO, check=True,
                   env={**os.environ, "DS_ACCELERATOR": "cpu"})


@torch.no_grad()
def feature_cosine(reference: Path, other: Path, images: list[Path]) -> float:
    """Mean cosine similarity, per feature token, of two tokenizers' encoder features on the images."""
    from data.transforms import pil_to_tensor
    from tokenizer.model import VQRAE

    a, b = VQRAE.from_pretrained(reference).eval(), VQRAE.from_pretrained(other).eval()
    total = 0.0
    for start in range(0, len(images), 64):
        x = torch.stack([pil_to_tensor(Image.open(p).convert("RGB")) for p in images[start : start + 64]])
        total += torch.cosine_similarity(a.encode_features(x), b.encode_features(x), dim=-1).mean(-1).sum().item()
    return total / len(images)


def plug_and_play_report(runs: Path, questions: Path) -> None:
    from llm.understanding import replace_vision_tower
    from tokenizer.model import is_vqrae_export

    vfm, distilled, plain = runs / "tiny-stage1" / "export", runs / "tiny-stage2" / "export", \
        runs / "tiny-stage2-nodistill" / "export"
    for tokenizer in (vfm, distilled):
        if not is_vqrae_export(tokenizer):
            raise FileNotFoundError(f"{tokenizer} missing: run the CPU default's tokenizer stages first (deepspeed "
                                    "train/tokenizer.py, then --config train/configs/tokenizer/tiny-stage2.yaml)")
    if not is_vqrae_export(plain):
        train("tokenizer", "--config", str(CONFIGS / "tokenizer" / "tiny-stage2.yaml"), "loss.distill_weight=0",
              f"run.output_dir={plain.parent}")
    stage1, stage2 = runs / "tiny-und-vfm-stage1", runs / "tiny-und-vfm-stage2"
    if not (stage1 / "export" / "config.json").is_file():
        train("understanding", f"model.tokenizer={vfm}", f"run.output_dir={stage1}")
    if not (stage2 / "export" / "config.json").is_file():
        train("understanding", "--config", str(CONFIGS / "understanding" / "tiny-stage2.yaml"),
              f"model.init_from={stage1}", f"run.output_dir={stage2}")
    out = runs / "plug_and_play"
    models = {"trained on the VFM (stage-1 encoder)": (stage2 / "export", vfm)}
    for name, tokenizer in (("-> stage-2 encoder, self-distilled", distilled),
                            ("-> stage-2 encoder, no self-distillation", plain)):
        swapped = out / tokenizer.parent.name
        if not (swapped / "config.json").is_file():
            replace_vision_tower(stage2 / "export", tokenizer, swapped)
        models[name] = (swapped, tokenizer)
    images = sorted({questions.parent / json.loads(line)["image"] for line in questions.read_text().splitlines()})
    rows, cosine = {}, {}
    for name, (export, tokenizer) in models.items():
        rows[name] = exact_match(export, questions, out / "eval" / export.name)
        cosine[name] = f"{feature_cosine(vfm, tokenizer, images):.3f}"
    with atomic_write(runs / "plug_and_play_report.json") as f:
        json.dump({"rows": rows, "feature_cosine_to_vfm": cosine}, f, indent=2)
    print(table(rows, cosine))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--images", type=int, default=300, help="held-out images")
    parser.add_argument("--plug-and-play", action="store_true", help="also the swap experiment (trains what it lacks)")
    args = parser.parse_args()
    with reported_errors():
        questions = held_out_questions(args.runs, args.images)
        stage_report(args.runs, questions)
        if args.plug_and_play:
            plug_and_play_report(args.runs, questions)


if __name__ == "__main__":
    main()
