"""DPG-Bench's scoring rules (ELLA's `compute_dpg_bench.py`), as the "fixed" variant every summary names:

- every csv row is read (ELLA's script skips the first data row: `if i == 0: continue` after pandas had consumed the
  header; hustvl's copy in VGT reads them all);
- category scores ("l1", "l2") average every crop's question scores after dependency zeroing, as the overall score
  does. Published category tables are not computed so: ELLA's script averages the last crop's scores from before
  the zeroing, hustvl/VGT's copy every crop's, still before the zeroing. The latter are reported beside ours as
  "upstream" (before zeroing, every crop): the numbers to compare with a paper's table. They read higher than ours
  for attribute, relation and other, whose questions depend on an entity.
- Crops: ELLA's script scores `--pic-num` crops of each tile, 1 by default (the top-left image alone); its
  `dist_eval.sh`, which published numbers come from, passes 4. Here every image of the tile is scored (4).

Per prompt: each of the 4 crops of its 2x2 tile answers every question; a question scores 1 when the judge's answer
is "yes" (case, surrounding space and final punctuation ignored; upstream's mPLUG answers in lower case), then, in
proposition order, a question with a parent (dependency ids, 0 = none) that scored 0 is set to 0; the crop's score is
the mean over questions, the prompt's the mean over crops. Overall = mean over prompts x 100. L2 category = the
proposition tuple's function name ("attribute - color"), L1 = its part before "-" ("attribute"); a category's score
is the mean of its question scores over all prompts and crops, x 100.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from common.files import atomic_write, ensure_settings, file_digest, json_digest, resume_jsonl
from eval.dpg_generation import TILES, crops

VARIANT = "fixed"
REQUIRED_COLUMNS = ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")


@dataclasses.dataclass(frozen=True)
class Question:
    """One proposition of a prompt: id, parents (0 = none), DPG tuple, natural-language question."""

    proposition_id: int
    parents: tuple[int, ...]
    tuple: str
    text: str

    @property
    def category(self) -> str:  # L2: the tuple's function name
        return self.tuple.split("(")[0].strip()

    @property
    def broad_category(self) -> str:  # L1
        return self.category.split("-")[0].strip()


def read_question_csv(path: str | Path) -> dict[str, list[Question]]:
    """item_id -> its questions in file order, from DPG-Bench's question csv (every row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question csv {path} not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks DPG-Bench columns {missing}")
        out: dict[str, list[Question]] = defaultdict(list)
        for line, row in enumerate(reader, start=2):
            try:
                parents = tuple(int(d) for d in str(row["dependency"]).split(","))
                question = Question(int(row["proposition_id"]), parents, row["tuple"],
                                    row["question_natural_language"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: line {line}: bad proposition_id or dependency ({e})") from None
            out[row["item_id"]].append(question)
    for item, questions in out.items():
        ids = [q.proposition_id for q in questions]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path}: prompt {item} repeats a proposition_id")
        unknown = {p for q in questions for p in q.parents if p != 0 and p not in ids}
        if unknown:
            raise ValueError(f"{path}: prompt {item} depends on unknown proposition ids {sorted(unknown)}")
    return dict(out)


def is_yes(answer: str) -> bool:
    """The judge said yes (upstream: answer == "yes"; here case, spaces and final punctuation are ignored)."""
    return answer.strip().rstrip(".!").strip().lower() == "yes"


def crop_scores(questions: Sequence[Question], answers: Mapping[int, str]) -> dict[int, float]:
    """One crop: proposition id -> score after dependency zeroing (in proposition order, as upstream)."""
    scores = {q.proposition_id: float(is_yes(answers[q.proposition_id])) for q in questions}
    for q in questions:
        if any(p != 0 and scores[p] == 0 for p in q.parents):
            scores[q.proposition_id] = 0.0
    return scores


def score_prompt(questions: Sequence[Question], answers: Sequence[Mapping[int, str]]) -> dict[str, Any]:
    """A prompt's score from its crops' answers (one mapping proposition id -> answer per crop); per question its
    crops' scores after dependency zeroing ("question_scores") and before it ("raw_question_scores")."""
    if not answers:
        raise ValueError("a prompt needs the answers of at least one crop")
    crops = [crop_scores(questions, a) for a in answers]
    per_crop = [sum(c.values()) / len(c) for c in crops]
    return {"score": sum(per_crop) / len(per_crop), "crop_scores": per_crop,
            "question_scores": [[c[q.proposition_id] for c in crops] for q in questions],
            "raw_question_scores": [[float(is_yes(a[q.proposition_id])) for a in answers] for q in questions]}


def summarize(prompts: Mapping[str, Sequence[Question]], results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Overall and L1 / L2 category scores (x 100) over the scored prompts (`results`: item_id -> score_prompt):
    categories after dependency zeroing ("l1", "l2") and, comparable with published tables, before it ("upstream")."""
    if not results:
        raise ValueError("no scored prompts")

    def mean100(values: Sequence[float]) -> float:
        return 100.0 * sum(values) / len(values)

    def categories(key: str) -> dict[str, dict[str, float]]:
        l1: dict[str, list[float]] = defaultdict(list)
        l2: dict[str, list[float]] = defaultdict(list)
        for item, result in results.items():
            for q, scores in zip(prompts[item], result[key]):
                l2[q.category].extend(scores)
                l1[q.broad_category].extend(scores)
        return {"l1": {k: mean100(v) for k, v in sorted(l1.items())},
                "l2": {k: mean100(v) for k, v in sorted(l2.items())}}

    return {"variant": VARIANT, "prompts": len(results), "overall": mean100([r["score"] for r in results.values()]),
            **categories("question_scores"), "upstream": categories("raw_question_scores")}


def format_summary(summary: Mapping[str, Any]) -> str:
    upstream = summary["upstream"]
    lines = [f"DPG-Bench ({summary['variant']} scoring), {summary['prompts']} prompts: overall "
             f"{summary['overall']:.2f}",
             f"  {'category':<24}{'zeroed':>8}{'upstream':>10}   (upstream: before dependency zeroing, as published)"]
    lines += [f"  {k:<24}{v:>8.2f}{upstream['l1'][k]:>10.2f}" for k, v in summary["l1"].items()]
    lines += ["  L2:"] + [f"    {k:<22}{v:>8.2f}{upstream['l2'][k]:>10.2f}" for k, v in summary["l2"].items()]
    return "\n".join(lines)


def question_digest(questions: list[Question]) -> str:
    """A fingerprint of a prompt's questions (ids, texts, dependencies): what a judge's recorded answers answered."""
    return json_digest([dataclasses.astuple(q) for q in questions])


def score_folder(images: Path, questions: dict[str, list[Question]], judge, out: Path, prompts_per_batch: int = 8
                 ) -> dict[str, Any]:
    """Score every tile of `images` named after a prompt of the question csv; resumable through OUT/answers.jsonl."""
    tiles = sorted(p for p in images.glob("*.png"))
    unknown = [p.name for p in tiles if p.stem not in questions]
    tiles = [p for p in tiles if p.stem in questions]
    if not tiles:
        raise FileNotFoundError(f"{images} holds no PNG named after a prompt of the question csv")
    out.mkdir(parents=True, exist_ok=True)
    ensure_settings(out / "settings.json", {"images": str(images.resolve()), "judge": judge.name})
    path = out / "answers.jsonl"
    made_from = {p.stem: {"tile": file_digest(p), "questions": question_digest(questions[p.stem])} for p in tiles}
    done = {row["item_id"]: [{int(k): v for k, v in crop.items()} for crop in row["answers"]]
            for row in resume_jsonl(path)  # answers to this very tile and these very questions only
            if row["item_id"] in made_from
            and {k: row.get(k) for k in ("tile", "questions")} == made_from[row["item_id"]]}
    todo = [p for p in tiles if p.stem not in done]
    with open(path, "a") as f:
        for start in tqdm(range(0, len(todo), prompts_per_batch), desc="judge", unit="batch"):
            batch = todo[start : start + prompts_per_batch]
            pairs = [(c, k, q) for p in batch for k, c in enumerate(crops(Image.open(p).convert("RGB")))
                     for q in questions[p.stem]]
            answers = judge.answer([c for c, _, _ in pairs], [q for _, _, q in pairs])
            position = 0
            for p in batch:
                per_crop = []
                for _ in range(TILES):
                    qs = questions[p.stem]
                    per_crop.append({q.proposition_id: a for q, a in zip(qs, answers[position : position + len(qs)])})
                    position += len(qs)
                done[p.stem] = per_crop
                f.write(json.dumps({"item_id": p.stem, **made_from[p.stem], "answers": per_crop}) + "\n")
            f.flush()
    results = {p.stem: score_prompt(questions[p.stem], done[p.stem]) for p in tiles}
    with atomic_write(out / "scores.jsonl") as f:
        f.writelines(json.dumps({"item_id": k, "score": r["score"], "crop_scores": r["crop_scores"]}) + "\n"
                     for k, r in results.items())
    summary = {**summarize(questions, results), "judge": judge.name,
               "missing_images": len(questions) - len(tiles), "unknown_images": unknown}
    with atomic_write(out / "summary.json") as f:
        json.dump(summary, f, indent=2)
    return summary
