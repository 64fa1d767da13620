"""Held-out numbers of the CPU default's understanding model (run after the understanding stages):

- exact match per question type (colour, count, existence, position) on 300 shapes-world images of a seed the
  training never saw, for the stage-1 and the stage-2 exports;
- two baselines measured here: the majority answer per type of the training questions, and the stage-2 model
  answering on a blank (mean-coloured) image instead of the real one (what it knows without looking).

    python scripts/understanding_report.py          # prints a markdown table, writes runs/understanding_report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root first

from common.files import atomic_write
from data.shapes_export import export_llava
from eval.understanding import main as evaluate
from eval.understanding_scoring import majority_answers, score_exact_match

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--images", type=int, default=300, help="held-out images")
    args = parser.parse_args()
    runs = args.runs
    world = runs / "world-llava-eval"
    export_llava(world, args.images, image_size=32, seed=1, progress=False)  # training uses seed 0
    questions = world / "questions.jsonl"
    rows = {}
    for name, model, extra in (("stage 1", "tiny-und-stage1", []), ("stage 2", "tiny-und-stage2", []),
                               ("stage 2, blank image", "tiny-und-stage2", ["--blank-images"])):
        out = runs / "understanding_report" / name.replace(" ", "-").replace(",", "")
        evaluate(["--model", str(runs / model / "export"), "--questions", str(questions), "--out", str(out),
                  "--device", "cpu", *extra])
        rows[name] = json.loads((out / "summary.json").read_text())
    train = [json.loads(line) for line in (runs / "world-llava" / "questions.jsonl").read_text().splitlines()]
    majority = majority_answers([{"type": q["type"], "label": q["answer"]} for q in train])
    held_out = [json.loads(line) for line in questions.read_text().splitlines()]
    rows["majority answer per type"] = score_exact_match(
        [{"type": q["type"], "answer": majority[q["type"]], "label": q["answer"]} for q in held_out])
    with atomic_write(runs / "understanding_report.json") as f:
        json.dump({"rows": rows, "majority": majority}, f, indent=2)
    types = list(rows["stage 2"]["types"])
    print("| model | " + " | ".join(types) + " | overall |")
    print("|---" * (len(types) + 2) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r['types'][t]['accuracy']:.3f}" for t in types) +
              f" | {r['overall']:.3f} |")


if __name__ == "__main__":
    main()
