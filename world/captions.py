"""The world's caption grammar: the captions it writes about an image, the parser that reads any caption back, and
the caption's truth on an image's objects.

    caption := "a photo of " item (" and " item)*
    item    := group | single " " RELATION " " single
    group   := ("a" | "an" | "two" | "three" | "four") [COLOR " "] SHAPE       (plural after a number)
    single  := ("a" | "an") [COLOR " "] SHAPE

A caption is true of an image when it names exactly the image's objects (the world renders exactly what a caption
names, no distractors, so this is the world's sense of true):
- per shape, the counts of its groups add up to the image's count (a shape the caption does not name is absent);
- a shape whose groups all carry colours has exactly those colours, as a multiset (a shape with some groups
  coloured and some not is outside the grammar);
- a relation names two shapes present once each, and holds by GenEval's rule (`world.shapes.relation_strength`
  above 0.5, i.e. `eval.geneval_scoring.relative_position`).
Every GenEval prompt of the world (`world.shapes.task_records`) is in the grammar and true of its rendered image.

Truth is a subset test on facts: `caption_facts(caption)` (what it claims) against `image_facts(objects)` (what
holds), both sets of hashable facts over the finite `FACTS` index, so a batch of captions against a batch of images
is one matrix product (`truth_matrix`), which the SigLIP pretraining uses as its pair labels.

Captions the world writes about an image (`caption_kinds`), each true of it:
    prompt       the GenEval prompt the image was drawn for
    counts       "a photo of two circles and a triangle"
    colors       "a photo of a red circle and two blue squares"
    description  every object with its colour and, when two shapes present once have a clear relation, that
                 relation first: "a photo of a red circle left of a blue square and two green triangles"
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from world.shapes import (
    COLOR_NAMES,
    NUMBER_WORDS,
    POSITION_MARGIN,
    RELATIONS,
    SHAPE_NAMES,
    SHAPES,
    a_or_an,
    relation_strength,
)

PREFIX = "a photo of "
MAX_COUNT = 4  # the most objects an image of the world holds
CAPTION_KINDS: tuple[str, ...] = ("prompt", "counts", "colors", "description")
_QUANTITIES = {"a": 1, "an": 1, **{w: n for n, w in NUMBER_WORDS.items()}}
_PLURALS = {SHAPES[s].plural: s for s in SHAPE_NAMES}

Fact = tuple  # ("count", shape, n) | ("color", shape, color, k) | ("relation", shape, relation, shape)
FACTS: tuple[Fact, ...] = (
    *(("count", s, n) for s in SHAPE_NAMES for n in range(MAX_COUNT + 1)),
    *(("color", s, c, k) for s in SHAPE_NAMES for c in COLOR_NAMES for k in range(1, MAX_COUNT + 1)),
    *(("relation", a, r, b) for a in SHAPE_NAMES for r in RELATIONS for b in SHAPE_NAMES if a != b),
)
FACT_INDEX: dict[Fact, int] = {f: i for i, f in enumerate(FACTS)}


# ----------------------------------------------------------------------------------------------- truth


def image_facts(objects: Sequence[dict]) -> frozenset:
    """Everything true of an image's objects that a caption can claim: each shape's count, each (shape, colour)'s
    count, and the relations (GenEval's rule) between shapes present once."""
    counts = Counter(o["shape"] for o in objects)
    facts = {("count", s, counts[s]) for s in SHAPE_NAMES}
    facts |= {("color", s, c, k) for (s, c), k in Counter((o["shape"], o["color"]) for o in objects).items()}
    single = [o for o in objects if counts[o["shape"]] == 1]
    for a in single:
        for b in single:
            if a is not b:
                facts |= {("relation", a["shape"], r, b["shape"]) for r in RELATIONS
                          if relation_strength(a["box"], b["box"], r) > 0.5}
    return frozenset(facts)


def _group(words: list[str]) -> tuple[str, str | None, int] | None:
    """(shape, colour or None, count) of a group's words, or None outside the grammar."""
    if len(words) not in (2, 3) or words[0] not in _QUANTITIES:
        return None
    n, noun = _QUANTITIES[words[0]], words[-1]
    color = words[1] if len(words) == 3 else None
    if color is not None and color not in COLOR_NAMES:
        return None
    shape = noun if n == 1 else _PLURALS.get(noun)
    if shape not in SHAPES:
        return None
    return shape, color, n


def parse_caption(caption: str) -> tuple[list[tuple[str, str | None, int]], list[tuple[str, str, str]]] | None:
    """(groups, relations) of a caption in the grammar, else None: groups as (shape, colour or None, count),
    relations as (shape, relation, shape)."""
    text = " ".join(caption.strip().rstrip(".").split())
    if not text.startswith(PREFIX):
        return None
    groups, relations = [], []
    for item in text[len(PREFIX):].split(" and "):
        words = item.split(" ")
        relation = next(((i, r) for i in range(len(words)) for r in RELATIONS
                         if words[i : i + len(r.split())] == r.split()), None)
        if relation is None:
            parsed = _group(words)
            if parsed is None:
                return None
            groups.append(parsed)
            continue
        i, r = relation
        a, b = _group(words[:i]), _group(words[i + len(r.split()):])
        if a is None or b is None or a[2] != 1 or b[2] != 1 or a[0] == b[0]:
            return None
        groups += [a, b]
        relations.append((a[0], r, b[0]))
    return groups, relations


def caption_facts(caption: str) -> frozenset | None:
    """What a caption claims, as facts of `FACTS`; None when it is outside the grammar or claims the impossible (a
    shape's groups partly coloured, a relation on a shape not present exactly once, more than MAX_COUNT of a
    shape)."""
    parsed = parse_caption(caption)
    if parsed is None:
        return None
    groups, relations = parsed
    counts = Counter()
    for shape, _, n in groups:
        counts[shape] += n
    facts = {("count", s, counts[s]) for s in SHAPE_NAMES}
    for shape in counts:
        colored = [(c, n) for s, c, n in groups if s == shape]
        if all(c is not None for c, _ in colored):
            per_color = Counter()
            for c, n in colored:
                per_color[c] += n
            facts |= {("color", shape, c, k) for c, k in per_color.items()}
        elif any(c is not None for c, _ in colored):
            return None
    if any(counts[a] != 1 or counts[b] != 1 for a, _, b in relations):
        return None
    facts |= {("relation", a, r, b) for a, r, b in relations}
    if any(f not in FACT_INDEX for f in facts):
        return None
    return frozenset(facts)


def caption_is_true(caption: str, objects: Sequence[dict]) -> bool:
    """Whether the caption is in the grammar and true of the image's objects."""
    facts = caption_facts(caption)
    return facts is not None and facts <= image_facts(objects)


def fact_matrix(fact_sets: Sequence[frozenset]) -> torch.Tensor:
    """(N, len(FACTS)) float 0/1 rows of fact sets."""
    out = torch.zeros(len(fact_sets), len(FACTS))
    for i, facts in enumerate(fact_sets):
        out[i, [FACT_INDEX[f] for f in facts]] = 1.0
    return out


def truth_matrix(image_rows: torch.Tensor, caption_rows: torch.Tensor) -> torch.Tensor:
    """(images, captions) bool: caption j is true of image i, i.e. every fact it claims holds of the image.

    Args:
        image_rows: (I, len(FACTS)) `fact_matrix` of image facts.
        caption_rows: (C, len(FACTS)) `fact_matrix` of caption facts.
    """
    return (1.0 - image_rows) @ caption_rows.T == 0


# ----------------------------------------------------------------------------------------------- writing


def _group_text(shape: str, color: str | None, n: int) -> str:
    words = f"{color} " if color else ""
    return a_or_an(words + shape) if n == 1 else f"{NUMBER_WORDS[n]} {words}{SHAPES[shape].plural}"


def counts_caption(objects: Sequence[dict]) -> str:
    """Each shape present with its count, in SHAPE_NAMES order."""
    counts = Counter(o["shape"] for o in objects)
    return PREFIX + " and ".join(_group_text(s, None, counts[s]) for s in SHAPE_NAMES if counts[s])


def _color_groups(objects: Sequence[dict]) -> list[str]:
    per = Counter((o["shape"], o["color"]) for o in objects)
    return [_group_text(s, c, per[s, c]) for s in SHAPE_NAMES for c in COLOR_NAMES if per[s, c]]


def colors_caption(objects: Sequence[dict]) -> str:
    """Each object with its colour, objects of one shape and colour grouped, in SHAPE_NAMES then colour order."""
    return PREFIX + " and ".join(_color_groups(objects))


def clear_relation(objects: Sequence[dict]) -> tuple[dict, str, dict] | None:
    """(a, relation, b): the first pair of shapes present once (SHAPE_NAMES order) and the first relation
    (RELATIONS order) that holds by POSITION_MARGIN beyond GenEval's threshold; None when none does."""
    counts = Counter(o["shape"] for o in objects)
    single = sorted((o for o in objects if counts[o["shape"]] == 1), key=lambda o: SHAPE_NAMES.index(o["shape"]))
    for i, a in enumerate(single):
        for b in single[i + 1:]:
            for r in RELATIONS:
                if relation_strength(a["box"], b["box"], r) > 0.5 + POSITION_MARGIN:
                    return a, r, b
    return None


def description(objects: Sequence[dict], pair: tuple[str, str] | None = None) -> str:
    """The image in full: a relation between two coloured shapes present once first, then every other object with
    its colour (`colors_caption`'s groups). Deterministic: without `pair`, the image's `clear_relation` (none: no
    relation); with `pair` (shape a, shape b), a's strongest relation to b when it holds by GenEval's rule, the one
    relation a question about that pair needs to be answered (questions are asked only where their answer is clear).
    """
    if pair is None:
        found = clear_relation(objects)
    else:
        a, b = (next(o for o in objects if o["shape"] == s) for s in pair)
        strength = {r: relation_strength(a["box"], b["box"], r) for r in RELATIONS}
        r = max(RELATIONS, key=strength.__getitem__)
        found = (a, r, b) if strength[r] > 0.5 else None
    if found is None:
        return colors_caption(objects)
    a, r, b = found
    rest = [o for o in objects if o is not a and o is not b]
    first = f"{_group_text(a['shape'], a['color'], 1)} {r} {_group_text(b['shape'], b['color'], 1)}"
    return PREFIX + " and ".join([first, *_color_groups(rest)])


def caption_kinds(meta: dict) -> dict[str, str]:
    """The captions the world writes about a sample (its metadata), by kind (CAPTION_KINDS), each true of it."""
    objects = meta["objects"]
    return {"prompt": meta["prompt"], "counts": counts_caption(objects), "colors": colors_caption(objects),
            "description": description(objects)}


def caption_corpus() -> list[str]:
    """Words of every caption kind, one short text per (quantity, colour, shape) group and relation, sorted: enough
    for a tokenizer to see every word of the grammar."""
    groups = {_group_text(s, c, n) for s in SHAPE_NAMES for c in (None, *COLOR_NAMES) for n in range(1, MAX_COUNT + 1)}
    return sorted({PREFIX + g for g in groups} | {f"{PREFIX}a {s} {r} a {s}" for s in SHAPE_NAMES for r in RELATIONS})


def rng_kind(rng: np.random.Generator) -> str:
    """A caption kind drawn uniformly."""
    return CAPTION_KINDS[int(rng.integers(len(CAPTION_KINDS)))]
