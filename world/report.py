"""What the CPU default's reports share (scripts/cpu_report.py, understanding_report.py, unified_report.py, cpu_grid.py,
cpu_chat.py): where the prepared data and the runs are, how the CPU default draws, how a training run or an evaluation
is started from a report, and the markdown table of exact-match scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from common.config import from_dict
from eval.geneval_generation import generate, read_prompts
from eval.geneval_scoring import ScoringConfig, evaluate_folder, summarize
from llm.pipeline import TextToImage
from llm.sampler import SamplingConfig
from world.detector import ShapesDetector

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs"
CONFIGS = REPO / "train" / "configs"


def held_out_questions(runs: Path) -> Path:
    """The held-out question file (scripts/prepare_world.py wrote it)."""
    path = runs / "world" / "heldout" / "questions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: python scripts/prepare_world.py writes it")
    return path


def exact_match(export: Path, questions: Path, out: Path, *extra: str) -> dict[str, Any]:
    """eval/understanding.py's summary of an export on the question file (resumes in `out`), run as a user runs it."""
    subprocess.run([sys.executable, str(REPO / "eval" / "understanding.py"), "--model", str(export), "--questions",
                    str(questions), "--out", str(out), "--device", "cpu", *extra], check=True)
    return json.loads((out / "summary.json").read_text())


def table(rows: dict[str, dict[str, Any]], extra: dict[str, str] | None = None) -> str:
    """Exact match per question type and overall, a row per model (`extra`: a last column per model)."""
    types = list(next(iter(rows.values()))["types"])
    head = "| model | " + " | ".join(types) + " | overall |" + (" feature cosine to the VFM |" if extra else "")
    lines = [head, "|---" * (len(types) + 2 + bool(extra)) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['types'][t]['accuracy']:.3f}" for t in types) +
                     f" | {r['overall']:.3f} |" + (f" {extra.get(name, '')} |" if extra else ""))
    return "\n".join(lines)


def train(script: str, *argv: str) -> None:
    """One CPU-default training run through the DeepSpeed launcher (a finished run only re-exports)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    subprocess.run([str(launcher), f"train/{script}.py", *argv], cwd=REPO, check=True,
                   env={**os.environ, "DS_ACCELERATOR": "cpu"})


def geneval_rows(models: dict[str, TextToImage], prompts: Path, out: Path, n: int, sampling: SamplingConfig
                 ) -> dict[str, dict]:
    """GenEval (the world's prompts, its exact detector) of each model: overall and per task."""
    rows, detector = {}, ShapesDetector()
    for name, t2i in models.items():
        folder = out / name.replace(" ", "-")
        generate(t2i, read_prompts(prompts), folder, n, sampling, prompts_per_batch=8, model_name=name)
        summary = summarize(evaluate_folder(folder, detector, ScoringConfig(), progress=False))
        rows[name] = {"overall": summary["overall"], **{t: v["score"] for t, v in summary["tasks"].items()}}
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
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--prompts", type=Path, default=None, help="GenEval prompts (default: "
                        "RUNS/world/geneval_prompts.jsonl, the held-out set)")
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the generator run's")
    args = parser.parse_args()
    args.prompts = args.prompts or args.runs / "world" / "geneval_prompts.jsonl"
    args.sampling = generator_sampling(args.runs, args.cfg_scale)
    return args
