"""A DPG-Bench-style prompt set of the shapes world: dense prompts naming several objects with their colours, counts
and a spatial relation, each with its questions in DPG-Bench's csv layout (dependencies included), so the whole
benchmark runs on the CPU default with the world's exact judge.

    write_dpg_bench("runs/world/dpg", 120)    # prompts/{item_id}.txt, dpg_bench.csv, scenes.jsonl, settings
    image, scene = render_dpg_scene(0, 5)      # a real rendered image of prompt 5 (every question's answer is yes)

Propositions (DPG-Bench's `tuple` column, the category before the parenthesis):
    entity - whole (S)                  "Is there a S?"                       for every shape class present
    other - count (S, ==n)              "Are there n Ss?"                     for a class drawn n >= 2 times
    attribute - color (S, C)            "Is the S C?"                         for a class drawn once; parent: S
    relation - spatial (A, B, R)        "Is the A R the B?"                   one clear pair, if any; parents: A, B
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from common.files import ensure_settings, write_atomic
from world.shapes import (
    COLOR_NAMES,
    NUMBER_WORDS,
    POSITION_MARGIN,
    RELATIONS,
    SHAPE_NAMES,
    SHAPES,
    a_or_an,
    check_image_size,
    draw_objects,
    relation_strength,
    render,
)

DPG_STREAM = 0xD9B  # SeedSequence namespace of the DPG-style scenes
DPG_SEED = 0
CSV_COLUMNS = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
               "tuple", "question_natural_language")
SETTINGS_FILE = "dpg_world.json"
PROMPTS_DIR = "prompts"  # {item_id}.txt, as DPG-Bench ships its prompts
QUESTIONS_CSV = "dpg_bench.csv"


def dpg_scene(seed: int, index: int, image_size: int = 32) -> tuple[dict, list[tuple[int, int, int, int]]]:
    """Scene `index` of the DPG-style set with `seed`: {"item_id", "prompt", "objects", "questions"} and the objects'
    nominal boxes. Two to four objects of random shapes and colours; a class may repeat."""
    check_image_size(image_size)
    rng = np.random.default_rng(np.random.SeedSequence((DPG_STREAM, seed, index)))
    count = int(rng.integers(2, 5))
    specs = [(SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))], COLOR_NAMES[rng.integers(len(COLOR_NAMES))])
             for _ in range(count)]
    specs.sort(key=lambda s: SHAPE_NAMES.index(s[0]))  # a class's objects together, as the prompt names them
    record = {"prompt": f"dpg scene {index}", "include": [{"class": s, "count": 1, "color": c} for s, c in specs]}
    objects, nominal = draw_objects(rng, record, image_size)
    per_class = Counter(o["shape"] for o in objects)
    single = [o for o in objects if per_class[o["shape"]] == 1]
    relation = None
    if len(single) >= 2:
        i, j = rng.permutation(len(single))[:2]
        a, b = single[i], single[j]
        clear = [r for r in RELATIONS if relation_strength(a["box"], b["box"], r) > 0.5 + POSITION_MARGIN]
        if clear:
            relation = (a["shape"], b["shape"], clear[rng.integers(len(clear))])
    scene = {"item_id": f"shapes_{seed}_{index:05d}", "prompt": _prompt(objects, per_class, relation),
             "objects": objects, "questions": _questions(objects, per_class, relation)}
    return scene, nominal


def _prompt(objects: list[dict], per_class: Counter, relation: tuple[str, str, str] | None) -> str:
    parts = []
    for shape in dict.fromkeys(o["shape"] for o in objects):
        colours = [o["color"] for o in objects if o["shape"] == shape]
        if len(colours) == 1:
            parts.append(a_or_an(f"{colours[0]} {shape}"))
        else:
            parts.append(f"{NUMBER_WORDS[len(colours)]} {SHAPES[shape].plural} ({', '.join(colours)})")
    text = "a photo of " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])
    if relation is not None:
        a, b, r = relation
        text += f", the {a} {r} the {b}"
    return text


def _questions(objects: list[dict], per_class: Counter, relation: tuple[str, str, str] | None) -> list[dict]:
    """The scene's propositions in DPG-Bench's csv fields (proposition ids from 1, parents before children)."""
    rows: list[dict] = []
    entity: dict[str, int] = {}

    def add(category: str, args: str, question: str, parents: list[int]) -> int:
        rows.append({"proposition_id": len(rows) + 1, "tuple": f"{category} ({args})",
                     "category_broad": category.split("-")[0].strip(), "category_detailed": category,
                     "dependency": ",".join(str(p) for p in parents) or "0", "question_natural_language": question})
        return len(rows)

    for shape in dict.fromkeys(o["shape"] for o in objects):
        entity[shape] = add("entity - whole", shape, f"Is there {a_or_an(shape)}?", [])
    for shape, n in per_class.items():
        if n > 1:
            add("other - count", f"{shape}, =={n}", f"Are there {NUMBER_WORDS[n]} {SHAPES[shape].plural}?",
                [entity[shape]])
    for o in objects:
        if per_class[o["shape"]] == 1:
            add("attribute - color", f"{o['shape']}, {o['color']}", f"Is the {o['shape']} {o['color']}?",
                [entity[o["shape"]]])
    if relation is not None:
        a, b, r = relation
        add("relation - spatial", f"{a}, {b}, {r}", f"Is the {a} {r} the {b}?", [entity[a], entity[b]])
    return rows


def render_dpg_scene(seed: int, index: int, image_size: int = 32) -> tuple[Image.Image, dict]:
    """A real rendered image of scene (seed, index) and the scene."""
    scene, nominal = dpg_scene(seed, index, image_size)
    return render(scene["objects"], nominal, image_size), scene


def write_dpg_bench(out_dir: str | Path, num_prompts: int, seed: int = DPG_SEED, image_size: int = 32) -> Path:
    """Write the set as DPG-Bench ships it: prompts/{item_id}.txt and dpg_bench.csv (one row per proposition, every
    column), plus scenes.jsonl (objects included); refuses a folder written with other settings. Returns the csv."""
    out = Path(out_dir)
    ensure_settings(out / SETTINGS_FILE, {"version": 1, "seed": seed, "num_prompts": num_prompts,
                                          "image_size": image_size})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    scenes = []
    for index in range(num_prompts):
        scene, _ = dpg_scene(seed, index, image_size)
        write_atomic(out / PROMPTS_DIR / f"{scene['item_id']}.txt", scene["prompt"] + "\n")
        keywords = ", ".join(sorted({o["shape"] for o in scene["objects"]}))
        for row in scene["questions"]:
            writer.writerow({"item_id": scene["item_id"], "text": scene["prompt"], "keywords": keywords, **row})
        scenes.append(scene)
    write_atomic(out / "scenes.jsonl", "".join(json.dumps(s) + "\n" for s in scenes))
    write_atomic(out / QUESTIONS_CSV, buffer.getvalue())
    return out / QUESTIONS_CSV
