"""The shapes world: a procedural captioned image world small enough to train every phase on a CPU.

Each sample (seed, index) is one GenEval task drawn uniformly (single_object, two_object, counting, colors, position,
color_attr), captioned with GenEval's templates using shape names for COCO classes ("a photo of three squares",
"a photo of a red circle and a green square") and rendered so that the caption is true: exactly the objects it
names, no distractors. Objects are circles, squares and triangles (one `SHAPES` entry adds a shape everywhere:
captions, rendering, detection) in GenEval's ten colours on a plain grey background, antialiased by 4x4
supersampling, separated by a gap of at least `gap_px(size)` pixels.

Conventions:
- Pixel (x, y) covers [x, x+1) x [y, y+1); x grows right, y grows down.
- An object's "box" is [x1, y1, x2, y2], inclusive-exclusive: the tight box of the pixels it covers at least half.
  "center" is the centre of that box; "size" is the shape's nominal width in pixels (diameter, side, base).
- Count answers in the QA items are digits ("0" to "4").
- A sample's tag, prompt and colours do not depend on the image size (they are drawn first); its layout does.
- Seeds: sample `index` of a world with seed `s` draws from SeedSequence((SAMPLE_STREAM, s, index)), so any index
  renders on its own; held-out GenEval prompts draw from SeedSequence((PROMPT_STREAM, seed)), a disjoint stream
  for every seed value.

GenEval's vocabulary (task tags, colour names, relations) and its position rule are the scorer's own objects
(eval/geneval_scoring.py, eval/detection.py), so a caption this world calls true is true by the scorer's code.
Writing the world to disk (image folder + jsonl, webdataset shards, LLaVA json) is world/export.py:

    python scripts/prepare_world.py data      # the CPU default's splits, in every format (world/prepare.py)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from common.files import write_atomic
from eval.detection import GENEVAL_COLORS
from eval.geneval_scoring import GENEVAL_TASKS, POSITION_RELATIONS, ScoringConfig, relative_offset


@dataclass(frozen=True)
class ShapeSpec:
    """One shape class.

    Args:
        name: class name used in captions and detections.
        aspect: height / width of the nominal box.
        inside: (u, v) coordinates in the unit box (arrays) -> bool array, True inside the shape.
    """

    name: str
    aspect: float
    inside: Callable[[np.ndarray, np.ndarray], np.ndarray]

    @property
    def plural(self) -> str:
        return self.name + "s"


SHAPES: dict[str, ShapeSpec] = {
    s.name: s
    for s in (
        ShapeSpec("circle", 1.0, lambda u, v: (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25),
        ShapeSpec("square", 1.0, lambda u, v: (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)),
        ShapeSpec("triangle", 0.866, lambda u, v: (np.abs(u - 0.5) <= v / 2) & (v <= 1)),  # apex up, equilateral
    )
}
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)

# GenEval's colours (the scorer's tuple, in its order) with well-separated sRGB values. The grey background is far
# from all ten in RGB and differs from each by at least 30 in luma, which JPEG keeps at full resolution.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (255, 150, 20),
    "yellow": (250, 225, 45),
    "green": (30, 140, 50),
    "blue": (40, 80, 220),
    "purple": (130, 50, 170),
    "pink": (250, 140, 200),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
COLOR_NAMES: tuple[str, ...] = GENEVAL_COLORS
if tuple(PALETTE) != COLOR_NAMES:
    raise AssertionError("PALETTE must list GenEval's colours in GenEval's order")
BACKGROUND: tuple[int, int, int] = (135, 135, 135)

TAGS: tuple[str, ...] = GENEVAL_TASKS
RELATIONS: tuple[str, ...] = POSITION_RELATIONS
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}

SUPERSAMPLE = 4  # antialiasing: SUPERSAMPLE^2 samples per pixel
SAMPLE_STREAM = 0x5EED0  # SeedSequence namespaces: training samples and held-out prompts never share a stream
PROMPT_STREAM = 0x9E7A1
HELDOUT_SEED = 0
PROMPTS_PER_TASK = 60
POSITION_MARGIN = 0.2  # a relation is "clear" when GenEval's normalised offset is this far from its 0.5 threshold
_MAX_SIZE_FRACTION = {1: 0.40, 2: 0.34, 3: 0.28, 4: 0.25}  # largest object width / image size, by object count
_MIN_SIZE_FRACTION = 0.16


# ----------------------------------------------------------------------------------------------- geometry


def check_image_size(size: int) -> None:
    """Raise ValueError unless `size` is a multiple of 8 in [32, 256]."""
    if not isinstance(size, int) or size % 8 or not 32 <= size <= 256:
        raise ValueError(f"image size must be a multiple of 8 in [32, 256], got {size!r}")


def gap_px(size: int) -> int:
    """Smallest background gap between two objects' boxes (and to the border) in an image of `size` pixels."""
    return max(2, round(3 * size / 64))


@lru_cache(maxsize=4096)
def shape_coverage(shape: str, width: int, height: int) -> np.ndarray:
    """Covered sub-samples per pixel of `shape` filling a width x height pixel box.

    Returns:
        (height, width) uint8 in [0, SUPERSAMPLE**2]; read-only (cached).
    """
    s = SUPERSAMPLE
    u = (np.arange(width * s) + 0.5) / (width * s)  # (W*s,)
    v = (np.arange(height * s) + 0.5) / (height * s)  # (H*s,)
    inside = SHAPES[shape].inside(u[None, :], v[:, None])  # (H*s, W*s)
    counts = inside.reshape(height, s, width, s).sum(axis=(1, 3)).astype(np.uint8)
    counts.flags.writeable = False
    return counts


def covered_box(coverage: np.ndarray) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2), inclusive-exclusive, of the cells of a `shape_coverage` array covered at least half."""
    covered = coverage.astype(np.int32) * 2 >= SUPERSAMPLE**2
    rows, cols = np.flatnonzero(covered.any(1)), np.flatnonzero(covered.any(0))
    if not len(rows):
        return 0, 0, coverage.shape[1], coverage.shape[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@lru_cache(maxsize=4096)
def box_template(shape: str, width: int, height: int) -> np.ndarray:
    """The mask (pixels covered at least half) of a rendered `shape` whose object box is width x height.

    Rendering fills a nominal box of width w and height round(aspect * w); thin tips (a triangle's apex) can fall
    under half coverage, so the object box may be a pixel smaller. This takes the nominal box that yields the asked
    box (the renderer's own when one exists, else the box itself) and crops its mask to the box.

    Returns:
        (height, width) bool, read-only (cached).
    """
    aspect = SHAPES[shape].aspect
    candidates = sorted(((wn, hn) for wn in range(width, width + 3) for hn in range(height, height + 3)),
                        key=lambda d: (abs(d[1] - aspect * d[0]), d))
    for wn, hn in candidates:
        x1, y1, x2, y2 = covered_box(shape_coverage(shape, wn, hn))
        if (x2 - x1, y2 - y1) == (width, height):
            break
    else:
        wn, hn, x1, y1 = width, height, 0, 0
    covered = shape_coverage(shape, wn, hn).astype(np.int32) * 2 >= SUPERSAMPLE**2
    mask = np.ascontiguousarray(covered[y1 : y1 + height, x1 : x1 + width])
    mask.flags.writeable = False
    return mask


def relation_strength(box_a: Iterable[float], box_b: Iterable[float], relation: str) -> float:
    """GenEval's offset along `relation` (e.g. -dx for "left of") under the scorer's default position threshold:
    the relation holds when this exceeds 0.5 (`eval.geneval_scoring.relative_position`)."""
    dx, dy = relative_offset(list(box_a), list(box_b), ScoringConfig().position_threshold)
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]


# ----------------------------------------------------------------------------------------------- prompts


def a_or_an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _record(tag: str, include: list[dict], exclude: list[dict] | None, prompt: str) -> dict:
    """A GenEval prompt line, keys in GenEval's order."""
    record = {"tag": tag, "include": include}
    if exclude:
        record["exclude"] = exclude
    record["prompt"] = "a photo of " + prompt
    return record


@cache
def task_records(tag: str) -> tuple[dict, ...]:
    """Every distinct GenEval prompt line the shapes world has for `tag` (as read-only templates; copy to edit)."""
    pairs = [(a, b) for a in SHAPE_NAMES for b in SHAPE_NAMES if a != b]
    if tag == "single_object":
        out = [_record(tag, [{"class": s, "count": 1}], None, a_or_an(s)) for s in SHAPE_NAMES]
    elif tag == "two_object":
        out = [_record(tag, [{"class": a, "count": 1}, {"class": b, "count": 1}], None, f"{a_or_an(a)} and {a_or_an(b)}")
               for a, b in pairs]
    elif tag == "counting":
        out = [_record(tag, [{"class": s, "count": n}], [{"class": s, "count": n + 1}], f"{w} {SHAPES[s].plural}")
               for s in SHAPE_NAMES for n, w in NUMBER_WORDS.items()]
    elif tag == "colors":
        out = [_record(tag, [{"class": s, "count": 1, "color": c}], None, a_or_an(f"{c} {s}"))
               for s in SHAPE_NAMES for c in COLOR_NAMES]
    elif tag == "position":  # "a photo of A rel B": include[0] is B, include[1] is A placed relative to group 0
        out = [_record(tag, [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [r, 0]}], None,
                       f"{a_or_an(a)} {r} {a_or_an(b)}") for a, b in pairs for r in RELATIONS]
    elif tag == "color_attr":
        out = [_record(tag, [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}], None,
                       f"{a_or_an(f'{ca} {a}')} and {a_or_an(f'{cb} {b}')}")
               for a, b in pairs for ca in COLOR_NAMES for cb in COLOR_NAMES if ca != cb]
    else:
        raise ValueError(f"unknown GenEval tag {tag!r}; expected one of {TAGS}")
    return tuple(out)


def geneval_prompts(per_task: int = PROMPTS_PER_TASK, seed: int = HELDOUT_SEED) -> list[dict]:
    """Held-out GenEval prompt lines: `per_task` per task, tasks in GenEval's order in contiguous blocks.

    Each task's distinct prompts are shuffled and cycled, so every prompt appears floor or ceil(per_task / #distinct)
    times; the shuffle draws from the PROMPT_STREAM namespace, disjoint from every training sample's stream.

    Args:
        per_task: prompts per task.
        seed: seed within the held-out namespace.
    """
    rng = np.random.default_rng(np.random.SeedSequence((PROMPT_STREAM, seed)))
    out = []
    for tag in TAGS:
        records = task_records(tag)
        order: list[int] = []
        while len(order) < per_task:
            order.extend(rng.permutation(len(records)).tolist())
        out.extend(json.loads(json.dumps(records[i])) for i in order[:per_task])
    return out


def world_texts() -> list[str]:
    """Every distinct caption of the world (all GenEval tasks), sorted: the corpus of its small text tokenizer."""
    return sorted({r["prompt"] for tag in TAGS for r in task_records(tag)})


def shapes_world_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 512):
    """The CPU default's text tokenizer: `llm.text_tokenizer.corpus_tokenizer` on `world_texts()`."""
    from llm.text_tokenizer import corpus_tokenizer

    return corpus_tokenizer(world_texts(), out_dir, vocab_size)


def write_geneval_prompts(path: str | Path, per_task: int = PROMPTS_PER_TASK, seed: int = HELDOUT_SEED) -> None:
    """Write `geneval_prompts(per_task, seed)` as GenEval's jsonl (one JSON object a line), atomically."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in geneval_prompts(per_task, seed)))


# ----------------------------------------------------------------------------------------------- scenes


def _random_layout(rng: np.random.Generator, dims: list[tuple[int, int]], size: int) -> list[tuple[int, int]] | None:
    """Top-left corners placing boxes of (w, h) `dims` inside the image, pairwise `gap_px` apart; None on failure."""
    gap = gap_px(size)
    for _ in range(100):
        corners: list[tuple[int, int]] = []
        for w, h in dims:
            x, y = int(rng.integers(gap, size - gap - w + 1)), int(rng.integers(gap, size - gap - h + 1))
            if all(x + w + gap <= px or px + pw + gap <= x or y + h + gap <= py or py + ph + gap <= y
                   for (px, py), (pw, ph) in zip(corners, dims)):
                corners.append((x, y))
            else:
                break
        if len(corners) == len(dims):
            return corners
    return None


def _relation_layout(rng: np.random.Generator, dims: list[tuple[int, int]], size: int, relation: str
                     ) -> list[tuple[int, int]]:
    """Corners for (target, subject) boxes with the subject `relation` of the target along one axis, centred
    within a small offset on the other axis."""
    gap = gap_px(size)
    axis = 0 if relation in ("left of", "right of") else 1
    first = relation in ("left of", "above")  # the subject comes first along the axis
    (wt, ht), (ws, hs) = dims
    along = [(wt, ws), (ht, hs)][axis]
    across = [(ht, hs), (wt, ws)][axis]
    # along the axis: [gap, a0] [gap] [a1] [gap], the pair shifted randomly within the free room
    order = (1, 0) if first else (0, 1)
    start = int(rng.integers(gap, size - gap - (along[0] + along[1] + gap) + 1))
    extra = int(rng.integers(0, size - gap - (start + along[0] + along[1] + gap) + 1))
    pos_along = {order[0]: start, order[1]: start + along[order[0]] + gap + extra}
    # across the axis: centres within a quarter of the mean extent
    jitter = int(rng.integers(-(across[0] + across[1]) // 8, (across[0] + across[1]) // 8 + 1))
    half = (max(across) + 1) // 2
    centre = int(rng.integers(gap + half + abs(jitter), size - gap - half - abs(jitter) + 1))
    pos_across = {0: centre - across[0] // 2, 1: centre + jitter - across[1] // 2}
    return [((pos_along[i], pos_across[i]) if axis == 0 else (pos_across[i], pos_along[i])) for i in range(2)]


def draw_objects(rng: np.random.Generator, record: dict, size: int
                  ) -> tuple[list[dict], list[tuple[int, int, int, int]]]:
    """Objects that make `record` true, with no overlaps, and the nominal (x, y, w, h) box each shape fills."""
    specs: list[tuple[str, str]] = []
    for clause in record["include"]:
        for _ in range(clause["count"]):
            specs.append((clause["class"], clause.get("color") or COLOR_NAMES[rng.integers(len(COLOR_NAMES))]))
    relation = record["include"][-1].get("position", [None])[0]
    lo = max(4, round(_MIN_SIZE_FRACTION * size))
    hi = max(lo, round(_MAX_SIZE_FRACTION[len(specs)] * size))
    for _ in range(1000):
        widths = rng.integers(lo, hi + 1, size=len(specs)).tolist()
        dims = [(w, max(1, round(SHAPES[s].aspect * w))) for (s, _), w in zip(specs, widths)]
        if relation is None:
            corners = _random_layout(rng, dims, size)
        else:
            corners = _relation_layout(rng, dims, size, relation)
        if corners is None:
            hi = max(lo, hi - 1)
            continue
        nominal = [(x, y, w, h) for (x, y), (w, h) in zip(corners, dims)]
        objects = [_object(s, c, box) for (s, c), box in zip(specs, nominal)]
        if relation is None or _relation_is_clear(objects[1]["box"], objects[0]["box"], relation):
            return objects, nominal
    raise RuntimeError(f"could not lay out {record['prompt']!r} in a {size} px image")


def _relation_is_clear(box_a: list[int], box_b: list[int], relation: str) -> bool:
    """True when `relation` of A to B holds and every other relation fails, each by POSITION_MARGIN."""
    strength = {r: relation_strength(box_a, box_b, r) for r in RELATIONS}
    return all(v > 0.5 + POSITION_MARGIN if r == relation else v < 0.5 - POSITION_MARGIN for r, v in strength.items())


def _object(shape: str, color: str, nominal: tuple[int, int, int, int]) -> dict:
    x, y, w, h = nominal
    x1, y1, x2, y2 = covered_box(shape_coverage(shape, w, h))
    box = [x + x1, y + y1, x + x2, y + y2]
    return {"shape": shape, "color": color, "box": box, "center": [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2],
            "size": w}


# ----------------------------------------------------------------------------------------------- QA


def color_question(shape: str) -> str:
    return f"What color is the {shape}?"


def count_question(shape: str) -> str:
    return f"How many {SHAPES[shape].plural} are there?"


def existence_question(shape: str) -> str:
    return f"Is there {a_or_an(shape)} in the image?"


def position_question(shape: str, relation: str, other: str) -> str:
    return f"Is the {shape} {relation} the {other}?"


def question_texts() -> list[str]:
    """Every question `make_qa` can ask, sorted (with `world_texts`, the corpus of an understanding tokenizer)."""
    return sorted({q(s) for q in (color_question, count_question, existence_question) for s in SHAPE_NAMES} |
                  {position_question(a, r, b) for a in SHAPE_NAMES for b in SHAPE_NAMES if a != b for r in RELATIONS})


def make_qa(rng: np.random.Generator, objects: list[dict]) -> list[dict]:
    """Question-answer pairs true of `objects`: one colour question (a class present once), one count question,
    two existence questions (one present and one absent class, so yes/no balance), one position question (two
    classes present once each, relation clear under GenEval's rule, yes or no with equal chance; its "pair" holds
    the two shapes, asked-about first)."""
    counts = {s: sum(o["shape"] == s for o in objects) for s in SHAPE_NAMES}
    present = [s for s in SHAPE_NAMES if counts[s]]
    absent = [s for s in SHAPE_NAMES if not counts[s]]
    single = [o for o in objects if counts[o["shape"]] == 1]
    qa = []
    if single:
        o = single[rng.integers(len(single))]
        qa.append({"question": color_question(o["shape"]), "answer": o["color"], "type": "color"})
    pool = present if (not absent or rng.random() < 0.75) else absent
    s = pool[rng.integers(len(pool))]
    qa.append({"question": count_question(s), "answer": str(counts[s]), "type": "count"})
    for pool, answer in ((present, "yes"), (absent, "no")):
        if pool:
            s = pool[rng.integers(len(pool))]
            qa.append({"question": existence_question(s), "answer": answer, "type": "existence"})
    if len(single) >= 2:
        i, j = rng.permutation(len(single))[:2]
        a, b = single[i], single[j]
        strength = {r: relation_strength(a["box"], b["box"], r) for r in RELATIONS}
        want_yes = rng.random() < 0.5
        choices = [r for r in RELATIONS if (strength[r] > 0.5 + POSITION_MARGIN if want_yes
                                            else strength[r] < 0.5 - POSITION_MARGIN)]
        if choices:
            r = choices[rng.integers(len(choices))]
            qa.append({"question": position_question(a["shape"], r, b["shape"]), "answer": "yes" if want_yes else "no",
                       "type": "position", "pair": [a["shape"], b["shape"]]})
    return qa


# ----------------------------------------------------------------------------------------------- samples


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index` in the world with `seed` (independent of every other index)."""
    return np.random.default_rng(np.random.SeedSequence((SAMPLE_STREAM, seed, index)))


def sample_metadata(seed: int, index: int, image_size: int = 64) -> tuple[dict, list[tuple[int, int, int, int]]]:
    """Metadata of sample (seed, index) without rendering it.

    Returns:
        (metadata, nominal boxes): metadata has tag, include, [exclude], prompt, objects, qa; nominal boxes are the
        (x, y, w, h) each object's shape fills, in object order.
    """
    check_image_size(image_size)
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    rng = sample_rng(seed, index)
    tag = TAGS[rng.integers(len(TAGS))]
    records = task_records(tag)
    meta = json.loads(json.dumps(records[rng.integers(len(records))]))
    objects, nominal = draw_objects(rng, meta, image_size)
    meta["objects"] = objects
    meta["qa"] = make_qa(rng, objects)
    return meta, nominal


def render(objects: list[dict], nominal: list[tuple[int, int, int, int]], image_size: int) -> Image.Image:
    """RGB image of `objects` (with their nominal boxes) on the background; integer arithmetic, so bit-exact."""
    n = SUPERSAMPLE**2
    img = np.empty((image_size, image_size, 3), np.int32)
    img[:] = BACKGROUND
    for obj, (x, y, w, h) in zip(objects, nominal):
        k = shape_coverage(obj["shape"], w, h).astype(np.int32)[..., None]  # (h, w, 1)
        region = img[y : y + h, x : x + w]
        region[:] = (region * (n - k) + np.asarray(PALETTE[obj["color"]], np.int32) * k + n // 2) // n
    return Image.fromarray(img.astype(np.uint8), "RGB")


def render_sample(seed: int, index: int, image_size: int = 64) -> tuple[Image.Image, dict]:
    """Image and metadata of sample (seed, index). Same arguments, same bytes.

    Args:
        seed: world seed (>= 0); index: sample index (>= 0); image_size: multiple of 8 in [32, 256].
    """
    meta, nominal = sample_metadata(seed, index, image_size)
    return render(meta["objects"], nominal, image_size), meta


class ShapesWorld:
    """Map-style dataset of the shapes world: item i -> {"image": PIL RGB, "caption": str, "metadata": dict}.

    Args:
        num_samples: number of samples (indices 0 .. num_samples - 1).
        image_size: image side in pixels, a multiple of 8 in [32, 256].
        seed: world seed; use different seeds for different splits.
    """

    def __init__(self, num_samples: int, image_size: int = 64, seed: int = 0):
        check_image_size(image_size)
        if num_samples < 0 or seed < 0:
            raise ValueError(f"num_samples and seed must be non-negative, got {num_samples}, {seed}")
        self.num_samples, self.image_size, self.seed = num_samples, image_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for ShapesWorld of {self.num_samples} samples")
        image, meta = render_sample(self.seed, i % self.num_samples, self.image_size)
        return {"image": image, "caption": meta["prompt"], "metadata": meta}
