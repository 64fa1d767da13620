"""The unified model against the two specialists on the CPU default's world, and understanding from continuous
features against understanding from the discrete codes (run after scripts/cpu_demo.sh, which trains the tokenizer,
the codes, the generator and the understanding model):

- GenEval (the shapes world's held-out prompts, 4 images each, the exact detector, the CPU report's sampling) of the
  generator specialist (runs/tiny-ar) and of the unified model (runs/tiny-unified);
- exact match per question type on the held-out questions (300 images of a seed training never saw) of the
  understanding specialist (stage 2, runs/tiny-und-stage2), of the unified model, and of the same stage 2 with the
  images given as their VQRAE codes (runs/tiny-und-codes).

The unified model trains for the specialists' steps together with their batch (train/configs/unified/tiny.yaml:
2600 x 32 samples, 2000 / 2600 of them caption -> codes sequences, from the understanding stage-1 export), so each
task sees about as many samples as its specialist; the codes run is understanding stage 2 step for step
(train/configs/unified/tiny-und-codes.yaml). The runs it lacks are trained first (about 30 minutes on 2 cores).

    python scripts/unified_report.py           # markdown tables, runs/unified_report.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common.cli import reported_errors
from common.files import atomic_write
from llm.pipeline import TextToImage
from world.report import CONFIGS, exact_match, geneval_rows, held_out_questions, report_arguments, table, train

REPO = Path(__file__).resolve().parents[1]
NEEDED = {"tiny-ar": "the generator", "tiny-und-stage1": "understanding stage 1",
          "tiny-und-stage2": "understanding stage 2", "codes-tiny": "the extracted codes"}


def ensure_run(runs: Path, name: str, config: str) -> float | None:
    """Train runs/<name> with `config` unless its export exists; the seconds it took (None: it was there)."""
    if (runs / name / "export" / "config.json").is_file():
        return None
    start = time.time()
    train("unified", "--config", str(CONFIGS / "unified" / config), f"run.output_dir={runs / name}",
          f"model.init_from={runs / 'tiny-und-stage1'}", f"model.vqrae={runs / 'tiny-stage2' / 'export'}",
          f"data.conversations={runs / 'world' / 'train' / 'llava_conversations.json'}",
          f"data.image_root={runs / 'world' / 'train'}", *([f"generation.codes={runs / 'codes-tiny'}"]
                                                      if config == "tiny.yaml" else []))
    return time.time() - start


@torch.no_grad()
def main() -> None:
    args = report_arguments(__doc__)
    runs = args.runs
    missing = [f"{what} ({runs / name})" for name, what in NEEDED.items() if not (runs / name).exists()]
    if missing:
        raise FileNotFoundError(f"run scripts/cpu_demo.sh first: missing {', '.join(missing)}")
    seconds = {"unified": ensure_run(runs, "tiny-unified", "tiny.yaml"),
               "understanding from codes": ensure_run(runs, "tiny-und-codes", "tiny-und-codes.yaml")}
    sampling = args.sampling
    drawers = {"generator (specialist)": TextToImage.from_pretrained(runs / "tiny-ar" / "export"),
               "unified": TextToImage.from_pretrained(runs / "tiny-unified" / "export")}
    geneval = geneval_rows(drawers, args.prompts, runs / "unified_report_geneval", args.n, sampling)
    questions = held_out_questions(runs)
    answering = {"understanding (specialist, features)": runs / "tiny-und-stage2" / "export",
                 "unified (features)": runs / "tiny-unified" / "export",
                 "understanding from codes": runs / "tiny-und-codes" / "export"}
    understanding = {name: exact_match(export, questions, runs / "unified_report_und" / export.parent.name)
                     for name, export in answering.items()}
    report = {"geneval": geneval, "understanding": understanding, "sampling": sampling.to_dict(),
              "images_per_prompt": args.n, "training_seconds": seconds}
    with atomic_write(runs / "unified_report.json") as f:
        json.dump(report, f, indent=2)
    columns = [t for t in geneval["unified"] if t != "overall"]
    print("| drawing (GenEval) | " + " | ".join(columns) + " | overall |")
    print("|---" * (len(columns) + 2) + "|")
    for name, r in geneval.items():
        print(f"| {name} | " + " | ".join(f"{r[t]:.3f}" for t in columns) + f" | {r['overall']:.3f} |")
    print("\n" + table(understanding))


if __name__ == "__main__":
    with reported_errors(FileNotFoundError):
        main()
