"""Scoring of understanding benchmarks from answers: MME and POPE by LLaVA's rules (LLaVA's MME path is the
official MME calculation; POPE is LLaVA's eval_pope), optionally lmms-eval's variants, and exact match per question
type for the shapes world. Every score names its variant. Question files are read and checked by `read_questions`.

    records = [{"subtask": "existence", "image": "000.png", "answer": "Yes", "label": "yes"}, ...]
    score_mme(records)["perception"]
    score_pope([{"category": "random", "answer": "No, there is not.", "label": "no"}, ...])["mean_f1"]
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

BENCHMARKS = ("shapes", "mme", "pope")
LABELS = {"shapes": ("answer", "type"), "mme": ("label", "subtask"), "pope": ("label", "category")}


def read_questions(path: Path, benchmark: str) -> list[dict[str, Any]]:
    """The question file's rows, each checked for the benchmark's fields."""
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    needed = ("question_id", "text", *LABELS[benchmark])
    for i, row in enumerate(rows):
        missing = [k for k in needed if k not in row]
        if missing:
            raise ValueError(f"{path}: line {i + 1} lacks {missing} (a {benchmark} question needs {list(needed)})")
    if len({r["question_id"] for r in rows}) != len(rows):
        raise ValueError(f"{path}: question ids are not unique")
    return rows


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
VARIANTS = ("llava", "lmms-eval")
POPE_CATEGORIES = ("adversarial", "popular", "random")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


# ----------------------------------------------------------------------------------------------- MME


def parse_mme(answer: str, variant: str = "llava") -> str:
    """An MME answer as "yes", "no" or "other" (counted wrong).

    llava (the official calculation): lower-case; exactly "yes" / "no"; else "yes" when the first 4 characters
    contain "yes", else "no" when they contain "no", else "other". lmms-eval: the same after stripping and removing
    every ".", and a single "y" / "n" also counts.
    """
    _check_variant(variant)
    text = answer.lower()
    if variant == "lmms-eval":
        text = text.strip().replace(".", "")
        if text in ("y", "n"):
            return "yes" if text == "y" else "no"
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def score_mme(records: Iterable[Mapping[str, Any]], variant: str = "llava") -> dict[str, Any]:
    """MME scores: per subtask acc (share of questions right), acc_plus (share of images with every question right)
    and score = 100 acc + 100 acc_plus; perception and cognition = the sums over the subtasks of each present.

    Args:
        records: dicts with "subtask", "image", "answer" (the model's) and "label" ("Yes" / "No").
        variant: "llava" or "lmms-eval" (the answer parser).
    """
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        label = str(r["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"MME labels are yes / no, got {r['label']!r} ({r['subtask']}, {r['image']})")
        by_task[r["subtask"]][r["image"]].append(parse_mme(str(r["answer"]), variant) == label)
    if not by_task:
        raise ValueError("no MME records to score")
    subtasks = {}
    for task, images in by_task.items():
        answers = [ok for oks in images.values() for ok in oks]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(oks) for oks in images.values()) / len(images)
        subtasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus,
                          "questions": len(answers), "images": len(images)}
    return {
        "variant": variant,
        "subtasks": subtasks,
        "perception": sum(subtasks[t]["score"] for t in MME_PERCEPTION if t in subtasks),
        "cognition": sum(subtasks[t]["score"] for t in MME_COGNITION if t in subtasks),
        "missing_subtasks": [t for t in (*MME_PERCEPTION, *MME_COGNITION) if t not in subtasks],
    }


# ----------------------------------------------------------------------------------------------- POPE


def parse_pope(answer: str, variant: str = "llava") -> str:
    """A POPE prediction.

    llava (eval_pope): "yes" or "no": the text before the first "."; commas removed; split on spaces; "no" when a word
    is exactly "No", "not" or "no", else "yes" (an empty answer is "yes"). lmms-eval (its pope task): the answer
    lower-cased and stripped, kept as it is: only an exact "yes" or "no" counts as one, anything else ("yes.",
    "there is") is neither (wrong, and outside precision and recall).
    """
    _check_variant(variant)
    if variant == "lmms-eval":
        return answer.lower().strip()
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def _pope_metrics(c: Mapping[str, int], variant: str) -> dict[str, Any]:
    """accuracy, precision, recall, f1 and yes_ratio of counts tp / fp / tn / fn / other (a prediction neither yes nor
    no) / label_yes."""
    total = c["tp"] + c["fp"] + c["tn"] + c["fn"] + c["other"]
    precision, recall = _ratio(c["tp"], c["tp"] + c["fp"]), _ratio(c["tp"], c["tp"] + c["fn"])
    yes = c["tp"] + c["fp"] if variant == "llava" else c["label_yes"]
    return {"accuracy": _ratio(c["tp"] + c["tn"], total), "precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall), "yes_ratio": _ratio(yes, total),
            "questions": total, **c}


def score_pope(records: Iterable[Mapping[str, Any]], variant: str = "llava") -> dict[str, Any]:
    """POPE scores (positive = "yes"): accuracy, precision, recall, f1, yes_ratio per category and over all
    questions ("all": what lmms-eval's `pope` task reports), and mean_f1 over the categories (the published POPE
    number, LLaVA's). yes_ratio is the share of predictions that are yes (llava), or of labels that are yes
    (lmms-eval). A ratio with an empty denominator is 0.

    Args:
        records: dicts with "category", "answer" and "label" ("yes" / "no").
        variant: "llava" or "lmms-eval" (see `parse_pope`).
    """
    zero = {"tp": 0, "fp": 0, "tn": 0, "fn": 0, "other": 0, "label_yes": 0}
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict(zero))
    for r in records:
        label = str(r["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"POPE labels are yes / no, got {r['label']!r}")
        pred = parse_pope(str(r["answer"]), variant)
        key = "other" if pred not in ("yes", "no") else ("t" if pred == label else "f") + ("p" if pred == "yes" else "n")
        counts[r["category"]][key] += 1
        counts[r["category"]]["label_yes"] += label == "yes"
    if not counts:
        raise ValueError("no POPE records to score")
    categories = {name: _pope_metrics(c, variant) for name, c in counts.items()}
    everything = {k: sum(c[k] for c in counts.values()) for k in zero}
    return {"variant": variant, "categories": categories, "all": _pope_metrics(everything, variant),
            "mean_f1": sum(c["f1"] for c in categories.values()) / len(categories)}


# ----------------------------------------------------------------------------------------------- exact match


def normalize_answer(answer: str) -> str:
    """Lower-case, stripped, without a final period: "Red." -> "red"."""
    return answer.strip().lower().removesuffix(".").strip()


def score_exact_match(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy per question type and overall (mean over questions) of normalised exact match.

    Args:
        records: dicts with "type", "answer" and "label".
    """
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_type[r["type"]].append(normalize_answer(str(r["answer"])) == normalize_answer(str(r["label"])))
    if not by_type:
        raise ValueError("no records to score")
    everything = [ok for oks in by_type.values() for ok in oks]
    return {"types": {t: {"accuracy": sum(oks) / len(oks), "questions": len(oks)} for t, oks in by_type.items()},
            "overall": sum(everything) / len(everything), "questions": len(everything)}


def majority_answers(records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The most frequent normalised label per question type of `records` (ties: the alphabetically first)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        counts[r["type"]][normalize_answer(str(r["label"]))] += 1
    return {t: min(c, key=lambda a: (-c[a], a)) for t, c in counts.items()}
