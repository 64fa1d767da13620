"""Understanding evaluation: batched greedy answers of an exported LLaVA model to a question file, then scores.

    # the CPU default: held-out questions of the shapes world, exact match per question type
    python eval/understanding.py --model runs/tiny-und-stage2/export --questions runs/world/heldout/questions.jsonl \\
        --out runs/tiny-und-stage2/eval
    # MME / POPE (LLaVA's rules; --variant lmms-eval for lmms-eval's), question files with labels
    python eval/understanding.py --model EXPORT --questions mme.jsonl --images /data/MME --benchmark mme --out OUT

Question file: one JSON object a line with "question_id", "image" (relative to --images, default: the file's folder;
absent for a text-only question), "text" (the prompt, as LLaVA's question files hold it) and the label fields of the
benchmark: shapes "answer" + "type"; MME "label" + "subtask"; POPE "label" + "category". Greedy answers, left-padded
batches; OUT/answers.jsonl grows batch by batch, so an interrupted run resumes with the questions it has not answered
(settings in OUT/settings.json must match); OUT/summary.json holds the scores. --blank-images answers every question
on a mean-coloured image instead (the baseline that shows whether the answers use the image).
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
from data.transforms import open_rgb
from eval.understanding_scoring import (
    BENCHMARKS,
    LABELS,
    VARIANTS,
    read_questions,
    score_exact_match,
    score_mme,
    score_pope,
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from llm.understanding import answer, mean_color
    from llm.unified import load_answerer

    questions = read_questions(args.questions, args.benchmark)
    images_root = args.images or args.questions.parent
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"model": str(args.model.resolve()), "questions": str(args.questions.resolve()),
                "benchmark": args.benchmark, "max_new_tokens": args.max_new_tokens, "decoding": "greedy",
                "blank_images": args.blank_images, "dtype": args.dtype}
    ensure_settings(args.out / "settings.json", settings)
    model, processor, hook = load_answerer(args.model, args.device, dtype_of(args.dtype))
    size = processor.image_processor.size["height"]
    blank = Image.new("RGB", (size, size), mean_color(processor))
    path = args.out / "answers.jsonl"
    done = {r["question_id"]: r for r in resume_jsonl(path)}  # then the file grows batch by batch
    todo = [q for q in questions if q["question_id"] not in done]
    with open(path, "a") as out:
        for start in tqdm(range(0, len(todo), args.batch_size), desc="answer", unit="batch"):
            batch = todo[start : start + args.batch_size]
            images = [None if "image" not in q else blank if args.blank_images else
                      open_rgb(images_root / q["image"]) for q in batch]
            texts = [q["text"].replace("<image>", "").strip() for q in batch]
            answers = answer(model, processor, images, texts, args.max_new_tokens, short=False, hook=hook)
            for q, text in zip(batch, answers):
                row = {**q, "prediction": text}
                done[q["question_id"]] = row
                out.write(json.dumps(row) + "\n")
            out.flush()
    rows = [done[q["question_id"]] for q in questions]
    summary = {"settings": settings, **score(rows, args.benchmark, args.variant)}
    with atomic_write(args.out / "summary.json") as f:
        json.dump(summary, f, indent=2)
    print(format_summary(summary, args.benchmark))
    return summary


def score(rows: list[dict[str, Any]], benchmark: str, variant: str = "llava") -> dict[str, Any]:
    """The benchmark's scores of answered rows (each with "prediction" and the label fields)."""
    label, group = LABELS[benchmark]
    records = [{**r, "answer": r["prediction"], "label": r[label]} for r in rows]
    if benchmark == "shapes":
        return score_exact_match([{**r, "type": r[group]} for r in records])
    if benchmark == "mme":
        return score_mme(records, variant)
    return score_pope(records, variant)


def format_summary(summary: dict[str, Any], benchmark: str) -> str:
    if benchmark == "shapes":
        lines = [f"{t:<12}{v['accuracy']:>8.3f}{v['questions']:>8}" for t, v in summary["types"].items()]
        return "\n".join([*lines, f"{'overall':<12}{summary['overall']:>8.3f}{summary['questions']:>8}"])
    if benchmark == "mme":
        return f"MME ({summary['variant']}): perception {summary['perception']:.1f}, cognition {summary['cognition']:.1f}"
    if summary["variant"] == "lmms-eval":  # its pope task: one F1 over every question
        return f"POPE (lmms-eval): F1 {summary['all']['f1']:.4f} over {summary['all']['questions']} questions"
    return f"POPE (llava): mean F1 over the categories {summary['mean_f1']:.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an understanding export (train/understanding.py)")
    parser.add_argument("--questions", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=None, help="image root (default: the question file's folder)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="shapes")
    parser.add_argument("--variant", choices=VARIANTS, default="llava", help="MME / POPE answer parsing")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="longest answer (LLaVA's 128; an answer ends at the end of its turn)")
    parser.add_argument("--blank-images", action="store_true", help="answer on mean-coloured images (a baseline)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    with reported_errors():
        run(args)


if __name__ == "__main__":
    main()
