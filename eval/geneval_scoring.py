"""GenEval scoring: the per-image rules, the folder evaluation and the summary, for any detector.

The rules follow the public GenEval benchmark (djghosh13/geneval, `evaluation/evaluate_images.py` and
`evaluation/summary_scores.py`); the facts are restated in the project's GenEval spec. A detector (see
`eval/detection.py`) supplies raw detections and colour names; everything that decides "correct" lives here,
so every detector is scored by the very same code.

Layout read by `evaluate_folder` (what generation writes):

    outdir/00000/metadata.jsonl        the prompt's JSON line
    outdir/00000/samples/0000.png      images; any digit-only folder and any `\\d+\\.png` file is read

Usage:

    results = evaluate_folder(outdir, detector)                     # writes outdir/results.jsonl
    write_summary(summarize(results), outdir / "summary.json")      # prints the task table
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from tqdm import tqdm

from common.files import write_atomic
from eval.detection import GENEVAL_COLORS, Detection, Detector

GENEVAL_TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
POSITION_RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
IMAGE_NAME = re.compile(r"\d+\.png")

Box = Sequence[float]  # (x1, y1, x2, y2)
ColorFn = Callable[[str, list[Detection]], list[str]]  # (class name, detections) -> one colour per detection


@dataclass(frozen=True)
class ScoringConfig:
    """GenEval's scoring constants (upstream defaults).

    Args:
        threshold: keep detections with score strictly above this.
        counting_threshold: the threshold for every class when the prompt's tag is "counting".
        max_objects: keep at most this many detections per class (the highest-scoring ones).
        nms_threshold: drop a detection whose IoU with a higher-scoring one of its class reaches this;
            1.0 disables the extra NMS (upstream default).
        position_threshold: the share of the two boxes' sizes an offset must exceed per axis.
    """

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    nms_threshold: float = 1.0
    position_threshold: float = 0.1


# ---------------------------------------------------------------------------------------------------------------
# Geometry


def box_iou(box_a: Box, box_b: Box) -> float:
    """IoU of two boxes with GenEval's inclusive-pixel convention (width = x2 - x1 + 1)."""

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def relative_offset(box_a: Box, box_b: Box, threshold: float) -> tuple[float, float]:
    """GenEval's normalised offset (dx, dy) of box A from box B; (0, 0) when no relation can hold.

    Per axis the centre offset is shrunk by `threshold` times the sum of the two boxes' extents on that axis, then
    divided by the length of the raw offset. "left of" holds when dx < -0.5, "right of" when dx > 0.5, "above" when
    dy < -0.5, "below" when dy > 0.5 (y grows downward).

    Args:
        box_a: (x1, y1, x2, y2) of the object whose position is asked.
        box_b: (x1, y1, x2, y2) of the reference object.
        threshold: GenEval's POSITION_THRESHOLD (ScoringConfig.position_threshold).
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a[:4])
    bx1, by1, bx2, by2 = (float(v) for v in box_b[:4])
    offset = ((ax1 + ax2) / 2 - (bx1 + bx2) / 2, (ay1 + ay2) / 2 - (by1 + by2) / 2)
    extent = (abs(ax2 - ax1) + abs(bx2 - bx1), abs(ay2 - ay1) + abs(by2 - by1))
    revised = [math.copysign(max(abs(off) - threshold * ext, 0.0), off) for off, ext in zip(offset, extent)]
    if all(abs(r) < 1e-3 for r in revised):
        return 0.0, 0.0
    norm = math.hypot(*offset)
    return revised[0] / norm, revised[1] / norm


def relative_position(box_a: Box, box_b: Box, threshold: float = ScoringConfig.position_threshold) -> set[str]:
    """The relations of box A to box B ("left of", "right of", "above", "below"), by `relative_offset`: several
    can hold at once; boxes whose shrunk offset vanishes have none.

    Args:
        box_a: (x1, y1, x2, y2) of the object whose position is asked.
        box_b: (x1, y1, x2, y2) of the reference object.
        threshold: GenEval's POSITION_THRESHOLD.
    """
    dx, dy = relative_offset(box_a, box_b, threshold)
    holds = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {r for r in POSITION_RELATIONS if holds[r]}


# ---------------------------------------------------------------------------------------------------------------
# Per-image rules


def filter_detections(
    detections: Mapping[str, Sequence[Detection]], tag: str, cfg: ScoringConfig = ScoringConfig()
) -> dict[str, list[Detection]]:
    """Per class: sort by score (descending), keep scores strictly above the threshold, keep the first max_objects.

    Args:
        detections: class name -> raw detections from a detector, in any order.
        tag: the prompt's task tag; "counting" uses cfg.counting_threshold for every class.
        cfg: the scoring constants.

    Returns:
        class name -> kept detections, best first; classes with none kept are left out.
    """
    threshold = cfg.counting_threshold if tag == "counting" else cfg.threshold
    kept: dict[str, list[Detection]] = {}
    for name, dets in detections.items():
        ranked = sorted(dets, key=lambda d: d.score, reverse=True)  # stable: ties keep the detector's order
        ranked = [d for d in ranked if d.score > threshold][: cfg.max_objects]
        chosen: list[Detection] = []
        while ranked:
            best = ranked.pop(0)
            chosen.append(best)
            if cfg.nms_threshold < 1:
                ranked = [d for d in ranked if box_iou(best.box, d.box) < cfg.nms_threshold]
        if chosen:
            kept[name] = chosen
    return kept


def validate_metadata(metadata: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first thing wrong with a GenEval prompt record."""
    if not isinstance(metadata.get("tag"), str):
        raise ValueError(f"GenEval metadata needs a string 'tag': {metadata}")
    for key in ("include", "exclude"):
        clauses = metadata.get(key, [])
        if not isinstance(clauses, list):
            raise ValueError(f"GenEval metadata '{key}' must be a list: {metadata}")
        for index, clause in enumerate(clauses):
            count = clause.get("count")
            if not isinstance(clause.get("class"), str) or not isinstance(count, int) or count < 1:
                raise ValueError(f"GenEval {key} clause {index} needs 'class' (str) and 'count' (int >= 1): {clause}")
            if "color" in clause and clause["color"] not in GENEVAL_COLORS:
                raise ValueError(f"GenEval {key} clause {index} has unknown colour {clause['color']!r}: {clause}")
            if "position" in clause:
                position = clause["position"]
                well_formed = isinstance(position, list | tuple) and len(position) == 2
                relation, group = position if well_formed else (None, None)
                if relation not in POSITION_RELATIONS or not isinstance(group, int) or not 0 <= group < index:
                    raise ValueError(
                        f"GenEval include clause {index} needs position [relation, earlier clause index], "
                        f"relation one of {POSITION_RELATIONS}: {clause}"
                    )


def score_filtered(
    metadata: Mapping[str, Any], kept: Mapping[str, list[Detection]], color_fn: ColorFn,
    cfg: ScoringConfig = ScoringConfig(),
) -> tuple[bool, str]:
    """Apply the include and exclude clauses to already filtered detections (see `score_image`)."""
    validate_metadata(metadata)
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = kept.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if matched and "color" in req:
            colors = list(color_fn(name, found))
            if len(colors) != len(found):
                raise ValueError(f"color_fn returned {len(colors)} colours for {len(found)} detections of {name}")
            color = req["color"]
            if colors.count(color) < count:
                matched = False
                seen = ", ".join(f"{colors.count(c)} {c}" for c in GENEVAL_COLORS if c in colors)
                reasons.append(f"expected {color} {name}>={count}, found {colors.count(color)} {color}; and {seen}")
        if matched and "position" in req:
            relation, group = req["position"]
            targets = matched_groups[group]
            if targets is None:
                matched = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                matched, reason = _check_position(name, relation, found, targets, cfg.position_threshold)
                if not matched:
                    reasons.append(reason)
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], req["count"]
        if len(kept.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(kept[name])}")
    return correct, "\n".join(reasons)


def _check_position(
    name: str, relation: str, found: list[Detection], targets: list[Detection], threshold: float
) -> tuple[bool, str]:
    """Every (found object, target object) pair must have `relation`; report the first pair that does not."""
    for obj in found:
        for target in targets:
            relations = relative_position(obj.box, target.box, threshold)
            if relation not in relations:
                seen = " and ".join(r for r in POSITION_RELATIONS if r in relations) or "no clear relation to"
                return False, f"expected {name} {relation} target, found {seen} target"
    return True, ""


def score_image(
    metadata: Mapping[str, Any], detections: Mapping[str, Sequence[Detection]], color_fn: ColorFn,
    cfg: ScoringConfig = ScoringConfig(),
) -> tuple[bool, str]:
    """Score one image against one GenEval prompt, exactly as GenEval's per-image evaluation does.

    Include clauses must all pass: the first `count` detections of the class must exist; with a colour, at least
    `count` of them must have it; with a position [relation, group], every one of them must stand in that
    relation to every object matched by include clause `group` (which must itself have passed). Any exclude
    clause fails the image when the class has `count` or more kept detections.

    Args:
        metadata: the prompt's record (`tag`, `include`, optional `exclude`, `prompt`).
        detections: class name -> raw detections (filtered here with `filter_detections`).
        color_fn: (class name, detections) -> one colour name per detection; called only for colour clauses.
        cfg: the scoring constants.

    Returns:
        (correct, reason): reason lists the failed clauses, one a line ("" when correct).
    """
    return score_filtered(metadata, filter_detections(detections, metadata["tag"], cfg), color_fn, cfg)


# ---------------------------------------------------------------------------------------------------------------
# Folder evaluation


def sample_images(folder: Path) -> list[Path]:
    """The images GenEval scores in a prompt folder: every file of samples/ named NNNN.png, sorted by number."""
    samples = folder / "samples"
    files = samples.iterdir() if samples.is_dir() else []
    return sorted((p for p in files if p.is_file() and IMAGE_NAME.fullmatch(p.name)), key=lambda p: (int(p.stem), p.name))


def find_prompt_folders(outdir: str | Path) -> list[tuple[Path, dict[str, Any], list[Path]]]:
    """The prompt folders of a GenEval generation run.

    Args:
        outdir: the run folder (digit-only sub-folders holding metadata.jsonl and samples/).

    Returns:
        (folder, metadata, image paths) per prompt, both sorted by their number.
    """
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise FileNotFoundError(f"GenEval output folder not found: {outdir}")
    prompts = []
    for folder in sorted((p for p in outdir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        meta_path = folder / "metadata.jsonl"
        if not meta_path.is_file():
            raise FileNotFoundError(f"GenEval prompt folder without metadata.jsonl: {folder}")
        metadata = json.loads(meta_path.read_text())
        validate_metadata(metadata)
        prompts.append((folder, metadata, sample_images(folder)))
    if not any(images for _, _, images in prompts):
        raise FileNotFoundError(f"no GenEval images (NNNNN/samples/NNNN.png) found under {outdir}")
    return prompts


def evaluate_folder(
    outdir: str | Path, detector: Detector, cfg: ScoringConfig = ScoringConfig(), results_name: str = "results.jsonl",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every image of a GenEval run with one detector and write `outdir/results_name` (JSON lines).

    Args:
        outdir: the run folder (see the module docstring for its layout).
        detector: any object following the `eval.detection.Detector` protocol.
        cfg: the scoring constants.
        results_name: file name of the per-image results, written atomically inside outdir.
        progress: show a tqdm bar.

    Returns:
        one dict per image: filename, tag, prompt, correct, reason, metadata (the prompt's JSON string, as
        upstream), details (JSON string: class -> kept [x1, y1, x2, y2, score]) and detector (its name).
    """
    prompts = find_prompt_folders(outdir)
    results = []
    with tqdm(total=sum(len(images) for _, _, images in prompts), desc="GenEval", disable=not progress) as bar:
        for _, metadata, images in prompts:
            for path in images:
                with Image.open(path) as raw:
                    image = ImageOps.exif_transpose(raw).convert("RGB")
                kept = filter_detections(detector.detect(image), metadata["tag"], cfg)
                correct, reason = score_filtered(
                    metadata, kept, lambda name, dets, image=image: detector.classify_colors(image, name, dets), cfg
                )
                details = {name: [[*map(float, d.box), float(d.score)] for d in dets] for name, dets in kept.items()}
                results.append({
                    "filename": str(path),
                    "tag": metadata["tag"],
                    "prompt": metadata.get("prompt", ""),
                    "correct": bool(correct),
                    "reason": reason,
                    "metadata": json.dumps(metadata),
                    "details": json.dumps(details),
                    "detector": detector.name,
                })
                bar.update(1)
    write_atomic(Path(outdir) / results_name, "".join(json.dumps(r) + "\n" for r in results))
    return results


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Read a results.jsonl written by `evaluate_folder` (or by upstream GenEval)."""
    with open(path) as fp:
        return [json.loads(line) for line in fp if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Summary


def overall_standard_error(results: Sequence[Mapping[str, Any]]) -> float:
    """Standard error of `summarize`'s overall score, the images of one prompt taken as one draw (they share the
    prompt, so they are not independent): per task, the standard deviation of its prompts' mean correctness over the
    square root of their number (0 for a task of one prompt); overall, the root sum of their squares over the number
    of tasks."""
    if not results:
        raise ValueError("cannot summarise an empty GenEval result list")
    per_prompt: dict[str, dict[str, list[bool]]] = {}
    for r in results:
        key = r["metadata"] if isinstance(r["metadata"], str) else json.dumps(r["metadata"])
        per_prompt.setdefault(r["tag"], {}).setdefault(key, []).append(bool(r["correct"]))
    variance = 0.0
    for prompts in per_prompt.values():
        means = [sum(c) / len(c) for c in prompts.values()]
        if len(means) > 1:
            mean = sum(means) / len(means)
            variance += sum((m - mean) ** 2 for m in means) / (len(means) - 1) / len(means)
    return variance**0.5 / len(per_prompt)


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """GenEval's summary: per-task accuracy over images, overall = mean of the task scores.

    Args:
        results: per-image results (`correct`, `tag`, `metadata` and optionally `detector` keys).

    Returns:
        overall, tasks (tag -> score, correct, images; GenEval's task order first, then others as they come),
        images, prompts, correct_images (fraction of all images), correct_prompts (fraction of prompts, keyed by
        their metadata as upstream, with at least one correct image; not part of overall) and detectors.
    """
    if not results:
        raise ValueError("cannot summarise an empty GenEval result list")
    tally: dict[str, list[int]] = {}
    prompt_ok: dict[str, bool] = {}
    for r in results:
        counts = tally.setdefault(r["tag"], [0, 0])
        counts[0] += bool(r["correct"])
        counts[1] += 1
        key = r["metadata"] if isinstance(r["metadata"], str) else json.dumps(r["metadata"])
        prompt_ok[key] = prompt_ok.get(key, False) or bool(r["correct"])
    order = [t for t in GENEVAL_TASKS if t in tally] + [t for t in tally if t not in GENEVAL_TASKS]
    tasks = {t: {"score": tally[t][0] / tally[t][1], "correct": tally[t][0], "images": tally[t][1]} for t in order}
    return {
        "overall": sum(t["score"] for t in tasks.values()) / len(tasks),
        "tasks": tasks,
        "images": len(results),
        "prompts": len(prompt_ok),
        "correct_images": sum(bool(r["correct"]) for r in results) / len(results),
        "correct_prompts": sum(prompt_ok.values()) / len(prompt_ok),
        "detectors": sorted({str(r.get("detector", "unknown")) for r in results}),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """A plain-text table of a `summarize` result."""
    lines = [
        f"GenEval ({', '.join(summary['detectors'])})",
        f"images {summary['images']}, prompts {summary['prompts']}, correct images {summary['correct_images']:.2%}, "
        f"prompts with a correct image {summary['correct_prompts']:.2%}",
        f"{'task':<16}{'score':>8}{'correct':>10}{'images':>8}",
    ]
    for tag, task in summary["tasks"].items():
        lines.append(f"{tag:<16}{task['score']:>8.4f}{task['correct']:>10}{task['images']:>8}")
    lines.append(f"{'overall':<16}{summary['overall']:>8.4f}")
    return "\n".join(lines)


def write_summary(summary: Mapping[str, Any], path: str | Path, show: bool = True) -> None:
    """Write a `summarize` result as JSON (atomically) and print its table.

    Args:
        summary: the dict from `summarize`.
        path: destination JSON file.
        show: print the table to stdout.
    """
    write_atomic(path, json.dumps(summary, indent=2) + "\n")
    if show:
        print(format_summary(summary))
