"""Does lmms-eval give our numbers? The shapes world's held-out existence questions, written as MME records (each
image's yes / no pair) and POPE records, are answered and scored twice on one understanding export:

- by this repository's evaluator (`eval/understanding.py --variant lmms-eval`, one question a batch, lmms-eval's
  answer lengths: MME 16 new tokens, POPE 128);
- by lmms-eval's own code (eval/lmms_eval.py): its `llava_hf` model class loading the export as any transformers
  LLaVA checkpoint, its MME and POPE prompts, `process_results` and aggregation functions.

Every prediction and every aggregated number must be equal; the table and OUT/lmms_eval_check.json say which are,
and the exit status is 1 when one is not.

    pip install -e ".[lmms]"
    python scripts/lmms_eval_check.py                                  # the CPU default's stage-2 export
    python scripts/lmms_eval_check.py --model EXPORT --questions runs/world/heldout/questions.jsonl --limit 40
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from PIL import Image

from common.cli import reported_errors
from common.files import atomic_write, write_atomic
from eval.lmms_eval import run_lmms_eval
from world.export import mme_pope_questions

REPO = Path(__file__).resolve().parents[1]
# our summary's number -> lmms-eval's metric
COMPARED = {"mme": {"perception": "mme_perception_score"},
            "pope": {"accuracy": "pope_accuracy", "precision": "pope_precision", "recall": "pope_recall",
                     "f1": "pope_f1_score", "yes_ratio": "pope_yes_ratio"}}


def ours(args: argparse.Namespace, task: str, records: list[dict], max_new_tokens: int) -> dict:
    """This repository's evaluator on `records`, as a user runs it: (summary, predictions in order)."""
    folder = args.out / task
    questions = folder / "questions.jsonl"
    write_atomic(questions, "".join(json.dumps({k: v for k, v in r.items() if k != "question"}) + "\n"
                                    for r in records))
    subprocess.run([sys.executable, str(REPO / "eval" / "understanding.py"), "--model", str(args.model),
                    "--questions", str(questions), "--images", str(args.questions.parent), "--benchmark", task,
                    "--variant", "lmms-eval", "--batch-size", "1", "--max-new-tokens", str(max_new_tokens),
                    "--out", str(folder / "ours")], check=True)
    summary = json.loads((folder / "ours" / "summary.json").read_text())
    answers = {}
    for line in (folder / "ours" / "answers.jsonl").read_text().splitlines():
        row = json.loads(line)
        answers[row["question_id"]] = row["prediction"]
    return {"summary": summary, "predictions": [answers[r["question_id"]] for r in records]}


def lmms_docs(task: str, records: list[dict], root: Path) -> list[dict]:
    """The documents lmms-eval's task reads (its dataset's fields), from our records."""
    docs = []
    for r in records:
        image = Image.open(root / r["image"]).convert("RGB")
        if task == "mme":  # MME's question id names the image (a pair shares it); its questions end so
            docs.append({"question_id": r["image"], "question": r["question"] + " Please answer yes or no.",
                         "answer": r["label"], "category": r["subtask"], "image": image})
        else:
            docs.append({"question_id": r["question_id"], "question": r["question"], "answer": r["label"],
                         "category": r["category"], "image": image})
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "runs" / "tiny-und-stage2" / "export",
                        help="an understanding export (a transformers LLaVA folder)")
    parser.add_argument("--questions", type=Path, default=REPO / "runs" / "world" / "heldout" / "questions.jsonl",
                        help="the shapes world's questions.jsonl (images relative to its folder)")
    parser.add_argument("--limit", type=int, default=100, help="images whose questions are used (0: all)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "lmms_eval_check")
    args = parser.parse_args(argv)
    with reported_errors():
        for path, what in ((args.model / "config.json", "an understanding export"), (args.questions, "a question file")):
            if not path.is_file():
                raise FileNotFoundError(f"{path.parent if what.startswith('an') else path} is not {what}")
        questions = [json.loads(line) for line in args.questions.read_text().splitlines() if line.strip()]
        if args.limit:
            kept = sorted({q["image"] for q in questions})[: args.limit]
            questions = [q for q in questions if q["image"] in kept]
        records = dict(zip(("mme", "pope"), mme_pope_questions(questions)))
        args.out.mkdir(parents=True, exist_ok=True)
        theirs = run_lmms_eval(args.model, {t: lmms_docs(t, r, args.questions.parent) for t, r in records.items()})
        report, same = {"model": str(args.model.resolve()), "tasks": {}}, True
        print(f"{'task':<6}{'number':<12}{'ours':>10}{'lmms-eval':>12}  equal")
        for task, rows in records.items():
            mine = ours(args, task, rows, theirs[task]["max_new_tokens"])
            summary = mine["summary"] if task == "mme" else mine["summary"]["all"]
            numbers = {k: (summary[k], theirs[task]["metrics"][m]) for k, m in COMPARED[task].items()}
            differing = [i for i, (a, b) in enumerate(zip(mine["predictions"], theirs[task]["predictions"]))
                         if a.strip() != b.strip()]
            for k, (a, b) in numbers.items():
                print(f"{task:<6}{k:<12}{a:>10.4f}{b:>12.4f}  {math.isclose(a, b, abs_tol=1e-9)}")
            print(f"{task:<6}{'predictions':<12}{len(rows) - len(differing):>10}{len(rows):>12}  {not differing}")
            same &= not differing and all(math.isclose(a, b, abs_tol=1e-9) for a, b in numbers.values())
            report["tasks"][task] = {"questions": len(rows), "numbers": numbers, "differing_predictions": [
                {"question_id": rows[i]["question_id"], "ours": mine["predictions"][i],
                 "lmms_eval": theirs[task]["predictions"][i]} for i in differing],
                "lmms_eval_prompt": theirs[task]["prompt"], "max_new_tokens": theirs[task]["max_new_tokens"]}
        report["equal"] = bool(same)
        with atomic_write(args.out / "lmms_eval_check.json") as f:
            json.dump(report, f, indent=2)
        print(f"{'equal' if same else 'NOT equal'}: {args.out / 'lmms_eval_check.json'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
