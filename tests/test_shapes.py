"""The shapes world: determinism, captions faithful under GenEval's rules, QA, export formats, held-out prompts."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.detection import GENEVAL_COLORS
from world import shapes
from world.export import export_world
from world.shapes import ShapesWorld, render_sample

GENEVAL_TAG_ORDER = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
N = 600  # samples checked per property


@pytest.fixture(scope="module")
def samples() -> list[tuple[Image.Image, dict]]:
    return [render_sample(0, i) for i in range(N)]


# ------------------------------------------------------------------ an independent reference of GenEval's rules


def reference_relations(box_a, box_b) -> set[str]:
    """GenEval's relative_position(A, B), written from the protocol text."""
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    off = (ca[0] - cb[0], ca[1] - cb[1])
    size_a = (abs(box_a[2] - box_a[0]), abs(box_a[3] - box_a[1]))
    size_b = (abs(box_b[2] - box_b[0]), abs(box_b[3] - box_b[1]))
    rev = [max(abs(off[i]) - 0.1 * (size_a[i] + size_b[i]), 0) * math.copysign(1, off[i]) if off[i] else 0.0
           for i in range(2)]
    if all(abs(r) < 1e-3 for r in rev):
        return set()
    norm = math.hypot(*off)
    dx, dy = rev[0] / norm, rev[1] / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def reference_correct(record: dict, dets: dict[str, list[tuple[list, float, str]]]) -> bool:
    """GenEval's verdict for one image given detections class -> [(box, score, colour)]."""
    threshold = 0.9 if record["tag"] == "counting" else 0.3
    kept = {c: sorted((d for d in ds if d[1] > threshold), key=lambda d: -d[1])[:16] for c, ds in dets.items()}
    groups = []
    for clause in record["include"]:
        found = kept.get(clause["class"], [])[: clause["count"]]
        if len(found) < clause["count"]:
            return False
        if "color" in clause and sum(d[2] == clause["color"] for d in found) < clause["count"]:
            return False
        if "position" in clause:
            rel, idx = clause["position"]
            if groups[idx] is None or any(rel not in reference_relations(f[0], t[0]) for f in found
                                          for t in groups[idx]):
                return False
        groups.append(found)
    return all(len(kept.get(c["class"], [])) < c["count"] for c in record.get("exclude", []))


def oracle_detections(meta: dict) -> dict[str, list[tuple[list, float, str]]]:
    out: dict[str, list] = {}
    for o in meta["objects"]:
        out.setdefault(o["shape"], []).append((o["box"], 1.0, o["color"]))
    return out


def reference_prompt(record: dict) -> str:
    def a(word):
        return ("an " if word[0] in "aeiou" else "a ") + word

    inc = record["include"]
    tag = record["tag"]
    if tag == "single_object":
        body = a(inc[0]["class"])
    elif tag == "two_object":
        body = f"{a(inc[0]['class'])} and {a(inc[1]['class'])}"
    elif tag == "counting":
        body = f"{ {2: 'two', 3: 'three', 4: 'four'}[inc[0]['count']]} {inc[0]['class']}s"
    elif tag == "colors":
        body = a(f"{inc[0]['color']} {inc[0]['class']}")
    elif tag == "position":
        body = f"{a(inc[1]['class'])} {inc[1]['position'][0]} {a(inc[0]['class'])}"
    else:
        body = f"{a(inc[0]['color'] + ' ' + inc[0]['class'])} and {a(inc[1]['color'] + ' ' + inc[1]['class'])}"
    return "a photo of " + body


# ------------------------------------------------------------------ tests


def test_vocabulary_matches_geneval():
    assert shapes.COLOR_NAMES == GENEVAL_COLORS
    assert list(shapes.TAGS) == GENEVAL_TAG_ORDER
    palette = np.array([shapes.PALETTE[c] for c in shapes.COLOR_NAMES] + [shapes.BACKGROUND], float)
    dist = np.sqrt(((palette[:, None] - palette[None]) ** 2).sum(-1)) + np.eye(len(palette)) * 1e9
    assert dist.min() > 60  # every pair of the ten colours and the background is well separated


def test_deterministic_and_random_access():
    a = [render_sample(5, i)[0].tobytes() for i in (3, 1, 2)]
    b = [render_sample(5, i)[0].tobytes() for i in (1, 2, 3)]
    assert a == [b[2], b[0], b[1]]
    world = ShapesWorld(10, seed=5)
    assert world[3]["image"].tobytes() == a[0] and world[-7]["image"].tobytes() == a[0]
    assert world[3]["metadata"] == render_sample(5, 3)[1]
    images = {render_sample(0, i)[0].tobytes() for i in range(50)}
    assert len(images) == 50
    assert render_sample(1, 0)[0].tobytes() != render_sample(0, 0)[0].tobytes()
    for i in range(20):  # the caption and colours of a sample are the same at every size
        small, large = render_sample(0, i, 32)[1], render_sample(0, i, 128)[1]
        assert small["prompt"] == large["prompt"]
        assert [o["color"] for o in small["objects"]] == [o["color"] for o in large["objects"]]


def test_dataset_interface():
    world = ShapesWorld(4, image_size=32, seed=2)
    item = world[1]
    assert len(world) == 4 and set(item) == {"image", "caption", "metadata"}
    assert item["image"].mode == "RGB" and item["image"].size == (32, 32)
    assert item["caption"] == item["metadata"]["prompt"]
    with pytest.raises(IndexError):
        world[4]
    for bad in (30, 33, 264, 0):
        with pytest.raises(ValueError, match="multiple of 8"):
            ShapesWorld(1, image_size=bad)


def test_tags_uniform_and_records_in_geneval_form(samples):
    counts = Counter(meta["tag"] for _, meta in samples)
    assert set(counts) == set(GENEVAL_TAG_ORDER) and min(counts.values()) > N / 6 * 0.6
    for _, meta in samples:
        keys = ["tag", "include"] + (["exclude"] if meta["tag"] == "counting" else []) + ["prompt", "objects", "qa"]
        assert list(meta) == keys
        assert meta["prompt"] == reference_prompt(meta)
        inc = meta["include"]
        assert len(inc) == (1 if meta["tag"] in ("single_object", "counting", "colors") else 2)
        for clause in inc:
            assert clause["class"] in shapes.SHAPE_NAMES
            assert list(clause)[:2] == ["class", "count"]
            assert clause["count"] == 1 or meta["tag"] == "counting"
            assert ("color" in clause) == (meta["tag"] in ("colors", "color_attr"))
        if len(inc) == 2:
            assert inc[0]["class"] != inc[1]["class"]
        if meta["tag"] == "counting":
            assert 2 <= inc[0]["count"] <= 4
            assert meta["exclude"] == [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
        if meta["tag"] == "position":
            assert "position" not in inc[0] and inc[1]["position"][1] == 0
            assert inc[1]["position"][0] in ("left of", "right of", "above", "below")
        if meta["tag"] == "color_attr":
            assert inc[0]["color"] != inc[1]["color"]


def test_images_faithful_to_captions(samples):
    for _, meta in samples:
        wanted = Counter()
        for clause in meta["include"]:
            wanted[clause["class"]] += clause["count"]
        assert Counter(o["shape"] for o in meta["objects"]) == wanted  # exactly the named objects, no distractors
        for clause in meta["include"]:
            if "color" in clause:
                assert [o["color"] for o in meta["objects"] if o["shape"] == clause["class"]] == [clause["color"]]
        assert reference_correct(meta, oracle_detections(meta))


def test_position_relation_is_clear(samples):
    for _, meta in samples:
        if meta["tag"] != "position":
            continue
        rel = meta["include"][1]["position"][0]
        target, subject = meta["objects"]
        assert (target["shape"], subject["shape"]) == (meta["include"][0]["class"], meta["include"][1]["class"])
        assert reference_relations(subject["box"], target["box"]) == {rel}
        # still only `rel` when either box moves by 2 pixels in any direction (detector tolerance)
        for dx, dy in itertools.product((-2, 0, 2), repeat=2):
            moved = [subject["box"][0] + dx, subject["box"][1] + dy, subject["box"][2] + dx, subject["box"][3] + dy]
            assert reference_relations(moved, target["box"]) == {rel}


def test_relative_offset_matches_reference():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        a, b = rng.integers(0, 64, (2, 2, 2))
        box_a = [*np.minimum(*a), *np.maximum(*a) + 1]
        box_b = [*np.minimum(*b), *np.maximum(*b) + 1]
        ours = {r for r in shapes.RELATIONS if shapes.relation_strength(box_a, box_b, r) > 0.5}
        assert ours == reference_relations(box_a, box_b)


def test_the_world_speaks_with_the_scorers_own_rules(monkeypatch):
    from eval import geneval_scoring

    assert shapes.TAGS is geneval_scoring.GENEVAL_TASKS and shapes.RELATIONS is geneval_scoring.POSITION_RELATIONS
    assert shapes.COLOR_NAMES is GENEVAL_COLORS and tuple(shapes.PALETTE) == GENEVAL_COLORS
    assert shapes.relative_offset is geneval_scoring.relative_offset
    # the scorer's default threshold is the world's: a scorer with another default moves the world's relations
    box_a, box_b = [0, 0, 10, 10], [11, 3, 21, 13]  # A left of B by a small margin
    assert shapes.relation_strength(box_a, box_b, "left of") > 0.5
    stricter = dataclasses.make_dataclass("Stricter", [("position_threshold", float, 0.4)])
    monkeypatch.setattr(shapes, "ScoringConfig", stricter)
    assert shapes.relation_strength(box_a, box_b, "left of") < 0.5
    assert "left of" not in geneval_scoring.relative_position(box_a, box_b, 0.4)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_objects_inside_apart_and_drawn_where_the_boxes_say(size):
    gap = shapes.gap_px(size)
    sizes = []
    for i in range(150):
        image, meta = render_sample(3, i, size)
        pixels = np.asarray(image).astype(int)
        differs = np.abs(pixels - shapes.BACKGROUND).sum(-1) > 0  # (H, W)
        boxes = [o["box"] for o in meta["objects"]]
        drawn = np.zeros_like(differs)
        for o in meta["objects"]:
            x1, y1, x2, y2 = o["box"]
            assert 0 < x1 < x2 < size and 0 < y1 < y2 < size
            assert o["center"] == [(x1 + x2) / 2, (y1 + y2) / 2]
            crop = pixels[y1:y2, x1:x2]
            exact = (crop == shapes.PALETTE[o["color"]]).all(-1)
            assert exact[(y2 - y1) // 2 + (y2 - y1) // 4, (x2 - x1) // 2]  # the lower middle is fully covered
            # the box is tight: every edge row and column holds a pixel at least half the object's colour
            alpha = ((crop - shapes.BACKGROUND) @ (np.subtract(shapes.PALETTE[o["color"]], shapes.BACKGROUND))
                     / np.sum(np.subtract(shapes.PALETTE[o["color"]], shapes.BACKGROUND) ** 2))
            assert alpha[0].max() > 0.45 and alpha[-1].max() > 0.45
            assert alpha[:, 0].max() > 0.45 and alpha[:, -1].max() > 0.45
            drawn[max(0, y1 - 1) : y2 + 1, max(0, x1 - 1) : x2 + 1] = True
            sizes.append(o["size"])
        assert not (differs & ~drawn).any()  # nothing drawn outside the objects (faint edges one pixel out)
        for a, b in itertools.combinations(boxes, 2):
            assert a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
    assert 0.15 * size <= min(sizes) and max(sizes) <= 0.41 * size


def test_qa_answers_follow_from_objects(samples):
    kinds, every_question = Counter(), set(shapes.question_texts())
    for _, meta in samples:
        objects = meta["objects"]
        assert {qa["question"] for qa in meta["qa"]} <= every_question  # the understanding tokenizer's corpus
        count = Counter(o["shape"] for o in objects)
        types = [qa["type"] for qa in meta["qa"]]
        assert types.count("existence") == 2 and types.count("count") == 1
        for qa in meta["qa"]:
            q, answer = qa["question"], qa["answer"]
            kinds[qa["type"], answer if answer in ("yes", "no") else "-"] += 1
            named = [s for s in shapes.SHAPE_NAMES if f" {s}" in q]
            if qa["type"] == "color":
                assert q == f"What color is the {named[0]}?" and count[named[0]] == 1
                assert answer == next(o["color"] for o in objects if o["shape"] == named[0])
            elif qa["type"] == "count":
                assert q == f"How many {named[0]}s are there?" and answer == str(count[named[0]])
            elif qa["type"] == "existence":
                assert q == f"Is there a {named[0]} in the image?"
                assert answer == ("yes" if count[named[0]] else "no")
            else:
                a_name, rel, b_name = next((a, r, b) for a in named for b in named for r in shapes.RELATIONS
                                           if q == f"Is the {a} {r} the {b}?")
                assert count[a_name] == count[b_name] == 1
                box_a = next(o["box"] for o in objects if o["shape"] == a_name)
                box_b = next(o["box"] for o in objects if o["shape"] == b_name)
                assert answer == ("yes" if rel in reference_relations(box_a, box_b) else "no")
    assert kinds["existence", "yes"] == kinds["existence", "no"]
    yes, no = kinds["position", "yes"], kinds["position", "no"]
    assert yes + no > 100 and 0.35 < yes / (yes + no) < 0.65
    assert kinds["color", "-"] > 300


def test_export_folder_and_shards(tmp_path: Path):
    out = tmp_path / "world"
    export_world(out, 23, image_size=32, seed=4, fmt="both", shard_size=10, progress=False)
    world = ShapesWorld(23, image_size=32, seed=4)
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 23
    shard_names = sorted(p.name for p in (out / "shards").iterdir())
    assert shard_names == ["000000.tar", "000001.tar", "000002.tar"]
    members = []
    for name in shard_names:
        with tarfile.open(out / "shards" / name) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [m[0] for m in members] == [f"{i:08d}.{ext}" for i in range(23) for ext in ("png", "txt", "json")]
    for i, line in enumerate(lines):
        item = world[i]
        expected = {"image": f"images/{i:08d}.png", "caption": item["caption"], **item["metadata"]}
        assert line == expected and list(line)[:3] == ["image", "caption", "tag"]
        folder_png = np.asarray(Image.open(out / line["image"]))
        assert np.array_equal(folder_png, np.asarray(item["image"]))
        png, txt, meta = (members[3 * i + k][1] for k in range(3))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), folder_png)
        assert txt.decode() == item["caption"]
        assert json.loads(meta) == {k: v for k, v in expected.items() if k != "image"}
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]

    # resumable: a re-run rewrites nothing, a missing file comes back identical, other settings are refused
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    removed = out / "images" / "00000005.png"
    data = removed.read_bytes()
    removed.unlink()
    export_world(out, 23, image_size=32, seed=4, fmt="both", shard_size=10, progress=False)
    assert removed.read_bytes() == data
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != removed)
    with pytest.raises(ValueError, match=r"other settings \(seed: 4 there, 5 now\)"):
        export_world(out, 23, image_size=32, seed=5, fmt="folder", shard_size=10, progress=False)


def test_heldout_prompt_file_is_in_geneval_form(tmp_path: Path):
    written = tmp_path / "prompts.jsonl"
    shapes.write_geneval_prompts(written)
    records = [json.loads(line) for line in written.read_text().splitlines()]
    tags = [r["tag"] for r in records]
    assert [t for t, _ in itertools.groupby(tags)] == GENEVAL_TAG_ORDER  # contiguous blocks in GenEval's order
    assert all(count >= 50 for count in Counter(tags).values())
    for r in records:
        assert list(r) == ["tag", "include"] + (["exclude"] if r["tag"] == "counting" else []) + ["prompt"]
        assert r["prompt"] == reference_prompt(r)
    single = Counter(r["prompt"] for r in records if r["tag"] == "single_object")
    assert len(single) == len(shapes.SHAPE_NAMES) and max(single.values()) - min(single.values()) <= 1
    assert shapes.geneval_prompts(seed=1) != shapes.geneval_prompts(seed=0)


def test_write_is_atomic_on_error(tmp_path: Path, monkeypatch):
    target = tmp_path / "prompts.jsonl"
    target.write_text("old\n")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        shapes.write_geneval_prompts(target)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["prompts.jsonl"]
