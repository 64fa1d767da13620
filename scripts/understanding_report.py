"""Held-out numbers of the CPU default's understanding model (run after the understanding stages), on the world's
held-out split (runs/world/heldout, world seed 1, which no training saw):

- stage 1 (the projector alone, the pretrained LM frozen, trained on descriptions): its greedy caption of each image,
  parsed with the world's caption grammar (world/captions.py) and scored true or false against the image's objects;
- stage 2: exact match per question type (colour, count, existence, position), against two baselines measured here:
  the majority answer per type of the training questions, and the stage-2 model answering on a blank (mean-coloured)
  image instead of the real one (what it knows without looking).

With --plug-and-play, the paper's plug-and-play claim on the same questions: an understanding model trained (both
stages, the CPU default's configs) on the stage-1 tokenizer's encoder (frozen in tokenizer stage 1: the pretrained
VFM), then evaluated with its vision tower swapped, without retraining, for the stage-2 encoder (self-distilled to the
VFM) and for a stage-2 encoder trained without self-distillation (loss.distill_weight=0); with the cosine similarity
of each encoder's features to the VFM's on the held-out images. The runs it needs and lacks are trained first.

    python scripts/understanding_report.py                  # markdown table, runs/understanding_report.json
    python scripts/understanding_report.py --plug-and-play  # and the swap table, runs/plug_and_play_report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from common.cli import reported_errors
from common.files import atomic_write
from data.transforms import open_rgb
from eval.understanding_scoring import majority_answers, score_exact_match
from world.captions import caption_facts, caption_is_true
from world.probes import read_split
from world.report import CONFIGS, exact_match, held_out_questions, table, train

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def caption_truth(export: Path, split: Path, batch_size: int = 64) -> dict[str, Any]:
    """Stage-1 captions of every image of a split: the share in the world's caption grammar and the share true of
    their image, with a few examples."""
    from llm.understanding import caption, load_llava

    model, processor = load_llava(export)
    metas = read_split(split)
    captions = []
    for start in range(0, len(metas), batch_size):
        images = [open_rgb(split / m["image"]) for m in metas[start : start + batch_size]]
        captions += caption(model, processor, images)
    parsed = [caption_facts(c) is not None for c in captions]
    true = [caption_is_true(c, m["objects"]) for c, m in zip(captions, metas)]
    return {"images": len(metas), "in_grammar": sum(parsed) / len(metas), "true": sum(true) / len(metas),
            "examples": [{"image": m["image"], "caption": c, "true": t}
                         for c, m, t in list(zip(captions, metas, true))[:8]]}


def stage_report(runs: Path, questions: Path) -> None:
    stage1 = caption_truth(runs / "tiny-und-stage1" / "export", questions.parent)
    rows = {}
    for name, extra in (("stage 2", []), ("stage 2, blank image", ["--blank-images"])):
        out = runs / "understanding_report" / name.replace(" ", "-").replace(",", "")
        rows[name] = exact_match(runs / "tiny-und-stage2" / "export", questions, out, *extra)
    train = [json.loads(line) for line in (runs / "world" / "train" / "questions.jsonl").read_text().splitlines()]
    majority = majority_answers([{"type": q["type"], "label": q["answer"]} for q in train])
    held_out = [json.loads(line) for line in questions.read_text().splitlines()]
    rows["majority answer per type"] = score_exact_match(
        [{"type": q["type"], "answer": majority[q["type"]], "label": q["answer"]} for q in held_out])
    with atomic_write(runs / "understanding_report.json") as f:
        json.dump({"stage 1 captions": stage1, "rows": rows, "majority": majority}, f, indent=2)
    print(f"stage 1: {stage1['true']:.3f} of {stage1['images']} held-out captions true of their image "
          f"({stage1['in_grammar']:.3f} in the world's caption grammar)")
    print(table(rows))


# ------------------------------------------------------------------------------------------------ plug-and-play


@torch.no_grad()
def feature_cosine(reference: Path, other: Path, images: list[Path]) -> float:
    """Mean cosine similarity, per feature token, of two tokenizers' encoder features on the images."""
    from data.transforms import pil_to_tensor
    from tokenizer.model import VQRAE

    a, b = VQRAE.from_pretrained(reference).eval(), VQRAE.from_pretrained(other).eval()
    total = 0.0
    for start in range(0, len(images), 64):
        x = torch.stack([pil_to_tensor(open_rgb(p)) for p in images[start : start + 64]])
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
        train("understanding", f"model.vqrae={vfm}", f"run.output_dir={stage1}")
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
    parser.add_argument("--plug-and-play", action="store_true", help="also the swap experiment (trains what it lacks)")
    args = parser.parse_args()
    with reported_errors():
        questions = held_out_questions(args.runs)
        stage_report(args.runs, questions)
        if args.plug_and_play:
            plug_and_play_report(args.runs, questions)


if __name__ == "__main__":
    main()
