"""GenEval scoring rules on hand-made detections, and on every official prompt with synthetic detections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.detection import GENEVAL_COLORS, Detection
from eval.geneval_scoring import (
    ScoringConfig,
    box_iou,
    evaluate_folder,
    filter_detections,
    format_summary,
    load_results,
    overall_standard_error,
    relative_offset,
    relative_position,
    score_image,
    summarize,
    validate_metadata,
    write_summary,
)

REPO = Path(__file__).resolve().parents[1]


GENEVAL_DIR = REPO / "eval" / "geneval_official"


def det(x1: float, y1: float, x2: float, y2: float, score: float = 0.95) -> Detection:
    return Detection(box=(x1, y1, x2, y2), score=score)


def no_colors(name: str, dets: list[Detection]) -> list[str]:
    raise AssertionError("colour classification must not be called here")


class ColorBook:
    """A colour function reading each detection's colour from a table (keyed by object identity)."""

    def __init__(self) -> None:
        self.colors: dict[int, str] = {}
        self.calls: list[tuple[str, list[Detection]]] = []

    def add(self, d: Detection, color: str) -> Detection:
        self.colors[id(d)] = color
        return d

    def __call__(self, name: str, dets: list[Detection]) -> list[str]:
        self.calls.append((name, list(dets)))
        return [self.colors[id(d)] for d in dets]


# ---------------------------------------------------------------------------------------------------------------
# relative_position


def test_relative_position_cardinal_directions():
    centre = (40, 40, 60, 60)
    assert relative_position((0, 40, 20, 60), centre) == {"left of"}
    assert relative_position((80, 40, 100, 60), centre) == {"right of"}
    assert relative_position((40, 0, 60, 20), centre) == {"above"}  # y grows downward
    assert relative_position((40, 80, 60, 100), centre) == {"below"}


def test_relative_position_several_relations_at_once():
    assert relative_position((0, 0, 20, 20), (60, 60, 80, 80)) == {"left of", "above"}
    assert relative_position((60, 60, 80, 80), (0, 0, 20, 20)) == {"right of", "below"}


def test_relative_position_empty_when_boxes_nearly_coincide():
    assert relative_position((10, 10, 50, 50), (10, 10, 50, 50)) == set()
    # offset 1 px per axis, well inside 0.1 * (40 + 40) = 8 px
    assert relative_position((11, 11, 51, 51), (10, 10, 50, 50)) == set()


def test_relative_position_uses_per_axis_sizes_not_their_norm():
    # Tall boxes side by side: x offset 12, widths 10 + 10 -> revised 12 - 2 = 10, 10 / 12 > 0.5 -> "left of".
    # With the size vector's norm (~100.5 each) the offset would vanish and no relation would hold.
    assert relative_position((0, 0, 10, 100), (12, 0, 22, 100)) == {"left of"}


def test_relative_position_threshold_arithmetic():
    # A centre (5, 5), B centre (14, 8): off (-9, -3); sizes 10 per axis -> 0.1 * 20 = 2 per axis.
    # revised (-7, -1); norm sqrt(90) = 9.487 -> dx = -0.738 (left of), dy = -0.105 (no vertical relation)
    assert relative_position((0, 0, 10, 10), (9, 3, 19, 13)) == {"left of"}
    # A larger threshold eats the whole offset on both axes
    assert relative_position((0, 0, 10, 10), (9, 3, 19, 13), threshold=0.5) == set()


def test_position_threshold_is_geneval_s_0_1_on_both_sides():
    """10 x 10 boxes side by side: "left of" needs (d - 20 t) / d > 0.5, i.e. a centre distance d > 40 t: 4 px at
    GenEval's t = 0.1 (8 px at 0.2). Through relative_position's default and through the scorer's."""
    a = (0, 0, 10, 10)
    assert relative_position(a, (4.1, 0, 14.1, 10)) == {"left of"}
    assert relative_position(a, (3.9, 0, 13.9, 10)) == set()
    assert relative_position(a, (6, 0, 16, 10)) == {"left of"}
    assert relative_position(a, (6, 0, 16, 10), threshold=0.2) == set()
    meta = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    for offset, expected in ((4.1, True), (6, True), (3.9, False)):
        dets = {"cat": [det(offset, 0, offset + 10, 10)], "dog": [det(*a)]}
        assert score_image(meta, dets, no_colors)[0] is expected, offset
        assert score_image(meta, dets, no_colors, ScoringConfig())[0] is expected, offset


# ---------------------------------------------------------------------------------------------------------------
# filter_detections


def test_threshold_is_strict():
    dets = {"cat": [det(0, 0, 1, 1, 0.3), det(0, 0, 1, 1, 0.3001), det(0, 0, 1, 1, 0.29)]}
    kept = filter_detections(dets, "single_object")
    assert [d.score for d in kept["cat"]] == [0.3001]


def test_sorted_by_score_and_empty_classes_dropped():
    dets = {"cat": [det(0, 0, 1, 1, 0.5), det(0, 0, 1, 1, 0.9), det(0, 0, 1, 1, 0.7)], "dog": [det(0, 0, 1, 1, 0.1)]}
    kept = filter_detections(dets, "two_object")
    assert [d.score for d in kept["cat"]] == [0.9, 0.7, 0.5]
    assert "dog" not in kept


def test_counting_threshold_applies_to_every_class():
    dets = {"cat": [det(0, 0, 1, 1, 0.85), det(0, 0, 1, 1, 0.95)], "dog": [det(0, 0, 1, 1, 0.89), det(0, 0, 1, 1, 0.9)]}
    kept = filter_detections(dets, "counting")
    assert [d.score for d in kept["cat"]] == [0.95]
    assert "dog" not in kept  # 0.9 is not strictly above 0.9
    assert len(filter_detections(dets, "colors")["dog"]) == 2


def test_max_objects_keeps_the_best():
    scores = np.linspace(0.31, 0.99, 20)
    dets = {"cat": [det(i, 0, i + 1, 1, float(s)) for i, s in enumerate(scores)]}
    kept = filter_detections(dets, "single_object")["cat"]
    assert len(kept) == 16
    assert [d.score for d in kept] == sorted(scores.tolist(), reverse=True)[:16]
    assert len(filter_detections(dets, "single_object", ScoringConfig(max_objects=3))["cat"]) == 3


def test_optional_nms():
    dets = {"cat": [det(0, 0, 10, 10, 0.9), det(0, 0, 10, 11, 0.8), det(50, 50, 60, 60, 0.7)]}
    assert len(filter_detections(dets, "single_object")["cat"]) == 3  # nms_threshold 1.0: no NMS
    kept = filter_detections(dets, "single_object", ScoringConfig(nms_threshold=0.5))["cat"]
    assert [d.score for d in kept] == [0.9, 0.7]


def test_box_iou_with_inclusive_pixels_equals_counting_pixels():
    """GenEval's IoU counts pixels: a box (x1, y1, x2, y2) covers columns x1..x2 and rows y1..y2 inclusive."""
    rng = np.random.default_rng(0)
    boxes = [(0, 0, 9, 9), (0, 0, 9, 19), (5, 3, 14, 7), (20, 20, 29, 29), (9, 9, 12, 10), (3, 2, 3, 8)]
    for _ in range(30):
        (x1, x2), (y1, y2) = np.sort(rng.integers(0, 30, 2)), np.sort(rng.integers(0, 30, 2))
        boxes.append((int(x1), int(y1), int(x2), int(y2)))

    def mask(box):
        m = np.zeros((32, 32), bool)
        m[box[1] : box[3] + 1, box[0] : box[2] + 1] = True
        return m

    for a in boxes:
        for b in boxes:
            ma, mb = mask(a), mask(b)
            want = (ma & mb).sum() / (ma | mb).sum()
            assert box_iou(a, b) == pytest.approx(want), (a, b)
    assert box_iou((5, 5, 4, 4), (5, 5, 4, 4)) == 0.0  # empty boxes: no union, IoU 0


def test_nms_drops_an_overlap_equal_to_the_threshold():
    # IoU exactly 0.5: 100 shared pixels of a 200-pixel union; a kept box needs IoU strictly below the threshold
    dets = {"cat": [det(0, 0, 9, 9, 0.9), det(0, 0, 9, 19, 0.8)]}
    assert box_iou(dets["cat"][0].box, dets["cat"][1].box) == 0.5
    assert len(filter_detections(dets, "single_object", ScoringConfig(nms_threshold=0.5))["cat"]) == 1
    assert len(filter_detections(dets, "single_object", ScoringConfig(nms_threshold=0.51))["cat"]) == 2


@pytest.mark.parametrize("position", [["left of"], ["left of", 0, 1], "left of", ["near", 0], ["left of", -1],
                                      ["left of", 1], ["left of", 2], ["left of", "0"]])
def test_malformed_positions_are_refused(position):
    meta = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": position}]}
    with pytest.raises(ValueError, match="position"):
        validate_metadata(meta)


def test_a_well_formed_position_is_accepted():
    validate_metadata({"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "cup", "count": 1},
                                                      {"class": "dog", "count": 1, "position": ["below", 1]}]})


@pytest.mark.parametrize("extra", [-1, 1])
def test_a_colour_function_returning_another_number_of_colours_is_an_error(extra):
    meta = {"tag": "colors", "include": [{"class": "cat", "count": 2, "color": "red"}]}
    cats = [det(0, 0, 5, 5), det(10, 0, 15, 5)]
    with pytest.raises(ValueError, match="colours for 2 detections"):
        score_image(meta, {"cat": cats}, lambda name, found: ["red"] * (len(found) + extra))


def test_exclude_counts_every_kept_detection():
    meta = {"tag": "counting", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "cat", "count": 2}]}
    for n, expected in ((1, True), (2, False), (3, False)):
        cats = {"cat": [det(i * 10, 0, i * 10 + 5, 5) for i in range(n)]}
        assert score_image(meta, cats, no_colors)[0] is expected, n


def test_summary_table_lists_every_task():
    summary = {"detectors": ["exact"], "images": 8, "prompts": 2, "correct_images": 0.5, "correct_prompts": 0.5,
               "overall": 0.5, "tasks": {"counting": {"score": 0.25, "correct": 1, "images": 4},
                                         "colors": {"score": 0.75, "correct": 3, "images": 4}}}
    lines = format_summary(summary).splitlines()
    assert any(line.split() == ["counting", "0.2500", "1", "4"] for line in lines)
    assert any(line.split() == ["colors", "0.7500", "3", "4"] for line in lines)


def test_relations_need_more_than_half_the_offset():
    """At a normalised offset of exactly 0.5 no relation holds, in all four directions (d = 40 t = 4 px)."""
    a = (10, 10, 20, 20)
    for b, relation in (((14, 10, 24, 20), "left of"), ((6, 10, 16, 20), "right of"),
                        ((10, 14, 20, 24), "above"), ((10, 6, 20, 16), "below")):
        assert relative_position(a, b) == set(), relation
        shifted = tuple(v + 0.1 * (v2 - v1) for v, v1, v2 in zip(b, a, b))  # a little farther
        assert relative_position(a, shifted) == {relation}, relation


def test_offsets_vanish_only_below_a_thousandth_of_a_pixel():
    assert relative_offset((0, 0, 0.002, 0), (0, 0, 0, 0), 0.0) == (1.0, 0.0)  # revised offset exactly 1e-3
    assert relative_offset((0, 0, 0.0018, 0), (0, 0, 0, 0), 0.0) == (0.0, 0.0)
    # a small but clear offset keeps its relation: centres 1.4 px apart, 0.5 px shrunk, -0.9 / 1.4 < -0.5
    assert relative_position((0, 0, 2, 2), (0.9, 0, 3.9, 2)) == {"left of"}


def test_boxes_may_carry_a_trailing_score():
    assert relative_position((0, 0, 10, 10, 0.9), (20, 0, 30, 10, 0.8)) == {"left of"}


def test_a_zero_count_is_refused():
    with pytest.raises(ValueError, match="count"):
        validate_metadata({"tag": "counting", "include": [{"class": "cat", "count": 0}]})


def test_a_clause_whose_target_failed_is_no_target_either():
    """dog left of cat fails for want of a cat; bird left of dog then has no target, whatever the boxes say."""
    meta = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]},
                                           {"class": "bird", "count": 1, "position": ["left of", 1]}]}
    dets = {"dog": [det(40, 0, 50, 10)], "bird": [det(0, 0, 10, 10)]}
    correct, reason = score_image(meta, dets, no_colors)
    assert not correct and reason.splitlines() == ["expected cat>=1, found 0", "no target for dog to be left of",
                                                   "no target for bird to be left of"]


def test_prompts_are_told_apart_by_their_metadata_as_json_or_dict():
    results = [{"tag": "single_object", "correct": False, "metadata": {"prompt": "a cat"}},
               {"tag": "single_object", "correct": True, "metadata": {"prompt": "a cat"}},
               {"tag": "single_object", "correct": False, "metadata": json.dumps({"prompt": "a dog"})}]
    summary = summarize(results)
    assert summary["prompts"] == 2 and summary["correct_prompts"] == 0.5


def test_scoring_constants_are_frozen():
    with pytest.raises(AttributeError):
        ScoringConfig().position_threshold = 0.2


# ---------------------------------------------------------------------------------------------------------------
# score_image: include, colour, position, exclude


def test_include_count():
    meta = {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]}
    three = {"cat": [det(i * 10, 0, i * 10 + 5, 5) for i in range(3)]}
    assert score_image(meta, three, no_colors) == (True, "")
    two = {"cat": three["cat"][:2] + [det(40, 0, 45, 5, score=0.8)]}  # 0.8 is below the counting threshold
    correct, reason = score_image(meta, two, no_colors)
    assert not correct and reason == "expected cat>=3, found 2"
    correct, reason = score_image({"tag": "single_object", "include": [{"class": "dog", "count": 1}]}, three, no_colors)
    assert not correct and "dog" in reason


def test_exclude_clause():
    meta = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    three = {"cat": [det(i * 10, 0, i * 10 + 5, 5) for i in range(3)]}
    correct, reason = score_image(meta, three, no_colors)
    assert not correct and reason == "expected cat<3, found 3"
    # the third object below 0.9 does not count in a counting prompt
    three["cat"][2] = det(20, 0, 25, 5, score=0.85)
    assert score_image(meta, three, no_colors) == (True, "")


def test_colour_is_judged_on_the_found_objects_only():
    book = ColorBook()
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a red car"}
    best = book.add(det(0, 0, 10, 10, 0.9), "blue")
    second = book.add(det(20, 0, 30, 10, 0.8), "red")
    correct, reason = score_image(meta, {"car": [second, best]}, book)
    assert not correct
    assert reason == "expected red car>=1, found 0 red; and 1 blue"
    assert book.calls == [("car", [best])]  # only the top-`count` detections are classified
    book.colors[id(best)] = "red"
    assert score_image(meta, {"car": [second, best]}, book) == (True, "")


def test_colour_count_and_mixture_reason():
    book = ColorBook()
    meta = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]}
    cars = [book.add(det(0, 0, 1, 1, 0.9), "red"), book.add(det(0, 0, 1, 1, 0.8), "green")]
    correct, reason = score_image(meta, {"car": cars}, book)
    assert not correct and reason == "expected red car>=2, found 1 red; and 1 red, 1 green"


def test_position_pass_and_fail():
    meta = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    cat = det(40, 40, 60, 60)
    assert score_image(meta, {"cat": [cat], "dog": [det(0, 40, 20, 60)]}, no_colors) == (True, "")
    correct, reason = score_image(meta, {"cat": [cat], "dog": [det(80, 40, 100, 60)]}, no_colors)
    assert not correct and reason == "expected dog left of target, found right of target"
    correct, reason = score_image(meta, {"cat": [cat], "dog": [det(41, 41, 61, 61)]}, no_colors)
    assert not correct and reason == "expected dog left of target, found no clear relation to target"


def test_position_every_pair_must_hold():
    meta = {"tag": "position", "include": [{"class": "cat", "count": 2},
                                           {"class": "dog", "count": 1, "position": ["above", 0]}]}
    cats = [det(0, 50, 10, 60), det(20, 50, 30, 60)]
    assert score_image(meta, {"cat": cats, "dog": [det(10, 0, 20, 10)]}, no_colors)[0]
    cats[1] = det(20, 0, 30, 10)  # level with the dog: "above" fails for this pair
    assert not score_image(meta, {"cat": cats, "dog": [det(10, 0, 20, 10)]}, no_colors)[0]


def test_position_with_failed_target_group():
    book = ColorBook()
    meta = {"tag": "position", "include": [{"class": "cat", "count": 1, "color": "black"},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    cat = book.add(det(40, 40, 60, 60), "white")  # wrong colour: group 0 becomes None
    correct, reason = score_image(meta, {"cat": [cat], "dog": [det(0, 40, 20, 60)]}, book)
    assert not correct
    assert reason.splitlines() == [
        "expected black cat>=1, found 0 black; and 1 white", "no target for dog to be left of"]
    correct, reason = score_image(meta, {"dog": [det(0, 40, 20, 60)]}, book)  # no cat at all
    assert reason.splitlines() == ["expected cat>=1, found 0", "no target for dog to be left of"]


def test_bad_metadata_is_named():
    with pytest.raises(ValueError, match="position"):
        score_image({"tag": "position", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]},
                    {}, no_colors)
    with pytest.raises(ValueError, match="colour"):
        score_image({"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "teal"}]}, {}, no_colors)
    with pytest.raises(ValueError, match="count"):
        score_image({"tag": "colors", "include": [{"class": "cat"}]}, {}, no_colors)


# ---------------------------------------------------------------------------------------------------------------
# Every official prompt: synthetic detections that satisfy it, and versions that violate it

OFFSETS = {"left of": (-40, 0), "right of": (40, 0), "above": (0, -40), "below": (0, 40)}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def build_scene(meta: dict, violate: str | None = None):
    """Detections (and a colour book) satisfying `meta`, or breaking it in the way `violate` names."""
    book = ColorBook()
    dets: dict[str, list[Detection]] = {}
    score = 0.95 if violate != "at_threshold" else (0.9 if meta["tag"] == "counting" else 0.3)
    groups: list[tuple[float, float]] = []
    for index, req in enumerate(meta["include"]):
        count = req["count"] - (violate == "missing" and index == 0)
        cx, cy = 200.0, 200.0 + 300 * index  # groups far apart so only clauses with a position relate
        if "position" in req:
            relation, group = req["position"]
            dx, dy = OFFSETS[OPPOSITE[relation] if violate == "position" else relation]
            cx, cy = groups[group][0] + dx, groups[group][1] + dy
        groups.append((cx, cy))
        for k in range(count):
            d = det(cx - 10 + 2 * k, cy - 10, cx + 10 + 2 * k, cy + 10, score)  # same group: 2 px apart
            color = req.get("color", "white")
            if violate == "color" and "color" in req and k == 0:
                color = GENEVAL_COLORS[(GENEVAL_COLORS.index(color) + 1) % len(GENEVAL_COLORS)]
            dets.setdefault(req["class"], []).append(book.add(d, color))
    if violate == "exclude":
        req = meta["exclude"][0]
        extra = req["count"] - len(dets.get(req["class"], []))
        dets.setdefault(req["class"], []).extend(det(900 + 30 * i, 900, 920 + 30 * i, 920) for i in range(extra))
    dets["person"] = dets.get("person", []) + [det(0, 0, 5, 5, 0.2)]  # a sub-threshold distractor
    return dets, book


def official_prompts() -> list[dict]:
    lines = (GENEVAL_DIR / "evaluation_metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def test_every_official_prompt_satisfied_and_violated():
    prompts = official_prompts()
    assert len(prompts) == 553
    checked = {"missing": 0, "at_threshold": 0, "color": 0, "position": 0, "exclude": 0}
    for meta in prompts:
        dets, book = build_scene(meta)
        correct, reason = score_image(meta, dets, book)
        assert correct, (meta["prompt"], reason)
        violations = ["missing", "at_threshold"]
        violations += ["color"] * any("color" in r for r in meta["include"])
        violations += ["position"] * any("position" in r for r in meta["include"])
        violations += ["exclude"] * bool(meta.get("exclude"))
        for violate in violations:
            dets, book = build_scene(meta, violate)
            correct, reason = score_image(meta, dets, book)
            assert not correct and reason, (meta["prompt"], violate)
            checked[violate] += 1
    # each family of rules was exercised on the prompts that carry it
    assert checked == {"missing": 553, "at_threshold": 553, "color": 194, "position": 100, "exclude": 80}


# ---------------------------------------------------------------------------------------------------------------
# Summary arithmetic and folder evaluation


def test_summary_arithmetic():
    def row(tag: str, prompt: str, correct: bool) -> dict:
        return {"tag": tag, "correct": correct, "metadata": json.dumps({"tag": tag, "prompt": prompt}),
                "detector": "d"}

    results = [
        row("single_object", "a", True), row("single_object", "a", False),   # prompt a: 1/2
        row("single_object", "b", False), row("single_object", "b", False),  # prompt b: 0/2
        row("counting", "c", True), row("counting", "c", True),
        row("counting", "c", True), row("counting", "c", False),             # prompt c: 3/4
    ]
    s = summarize(results)
    assert s["tasks"]["single_object"] == {"score": 0.25, "correct": 1, "images": 4}
    assert s["tasks"]["counting"] == {"score": 0.75, "correct": 3, "images": 4}
    assert list(s["tasks"]) == ["single_object", "counting"]
    assert s["overall"] == pytest.approx(0.5)  # mean of task scores (0.25 + 0.75) / 2
    assert s["correct_images"] == pytest.approx(4 / 8)
    assert s["prompts"] == 3 and s["correct_prompts"] == pytest.approx(2 / 3)
    assert s["detectors"] == ["d"]
    # task means, not the image mean: unbalanced tasks weigh equally
    s2 = summarize(results[:1] + results[4:])
    assert s2["overall"] == pytest.approx((1.0 + 0.75) / 2) and s2["correct_images"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError):
        summarize([])


class BrightnessDetector:
    """A detector for the folder test: a bright image holds one cat at the top-left, a dark one nothing."""

    name = "brightness-test"

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        bright = np.asarray(image).mean() > 127
        return {"cat": [det(0, 0, 8, 8, 0.99)] if bright else [], "dog": []}

    def classify_colors(self, image: Image.Image, class_name: str, detections: list[Detection]) -> list[str]:
        return ["white"] * len(detections)


def test_evaluate_folder_layout_results_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture):
    prompts = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
        {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "white"}], "prompt": "a white cat"},
    ]
    for index, meta in enumerate(prompts):
        samples = tmp_path / f"{index:05d}" / "samples"
        samples.mkdir(parents=True)
        (samples.parent / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for k, value in enumerate([255, 0, 255]):
            Image.new("RGB", (16, 16), (value,) * 3).save(samples / f"{k:04d}.png")
        Image.new("RGB", (16, 16)).save(samples / "grid.png")  # not \d+\.png: ignored
    (tmp_path / "notes").mkdir()  # not digit-only: ignored

    results = evaluate_folder(tmp_path, BrightnessDetector(), progress=False)
    assert capsys.readouterr().err == ""  # no progress bar when asked for none
    evaluate_folder(tmp_path, BrightnessDetector())
    bar = capsys.readouterr().err.split("\r")[-1]  # the progress bar's final state: every image counted once
    assert "GenEval" in bar and "6/6" in bar
    assert len(results) == 6
    assert [r["correct"] for r in results] == [True, False, True] * 2
    on_disk = load_results(tmp_path / "results.jsonl")
    assert on_disk == results
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    first = results[0]
    assert set(first) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details", "detector"}
    assert first["filename"].endswith("00000/samples/0000.png") and first["detector"] == "brightness-test"
    assert json.loads(first["metadata"]) == prompts[0] and json.loads(first["details"]) == {"cat": [[0, 0, 8, 8, 0.99]]}
    assert results[1]["reason"] == "expected cat>=1, found 0"

    summary = summarize(results)
    assert summary["overall"] == pytest.approx(2 / 3) and summary["correct_prompts"] == 1.0
    write_summary(summary, tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert capsys.readouterr().out.strip() == format_summary(summary)


def test_evaluate_folder_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate_folder(tmp_path / "missing", BrightnessDetector(), progress=False)
    (tmp_path / "00000" / "samples").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        evaluate_folder(tmp_path, BrightnessDetector(), progress=False)
    (tmp_path / "00000" / "metadata.jsonl").write_text(json.dumps({"tag": "x", "include": []}))
    with pytest.raises(FileNotFoundError, match="no GenEval images"):
        evaluate_folder(tmp_path, BrightnessDetector(), progress=False)


def test_overall_standard_error_takes_prompts_as_the_unit():
    """Against numpy: per task the sample standard deviation of prompt means over sqrt(prompts), combined as the
    root sum of squares over the number of tasks; images of one prompt are averaged first, a task of one prompt adds
    nothing, and a score equal for every prompt has no error."""
    correct = {("counting", "a"): [1, 1, 0, 0], ("counting", "b"): [1, 1, 1, 1], ("counting", "c"): [0, 0, 0, 1],
               ("colors", "d"): [1, 0, 1, 0], ("colors", "e"): [0, 0, 0, 0], ("position", "f"): [1, 1, 0, 1]}
    results = [{"tag": tag, "metadata": {"prompt": prompt}, "correct": bool(c)}
               for (tag, prompt), values in correct.items() for c in values]
    expected = 0.0
    for tag in ("counting", "colors"):
        means = np.array([np.mean(v) for (t, _), v in correct.items() if t == tag])
        expected += means.var(ddof=1) / len(means)
    assert overall_standard_error(results) == pytest.approx(np.sqrt(expected) / 3)
    assert summarize(results)["overall"] == pytest.approx((np.mean([0.5, 1, 0.25]) + np.mean([0.5, 0]) + 0.75) / 3)
    same = [{"tag": "colors", "metadata": f"p{i}", "correct": c} for i in range(5) for c in (True, False)]
    assert overall_standard_error(same) == 0.0
    with pytest.raises(ValueError, match="empty"):
        overall_standard_error([])
