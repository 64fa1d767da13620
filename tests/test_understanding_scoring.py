"""MME / POPE parsing and scores by LLaVA's rules (and lmms-eval's variants) on tricky answers and hand-made
records whose scores are computed here by hand."""

from __future__ import annotations

import pytest

from eval.understanding_scoring import (
    MME_PERCEPTION,
    normalize_answer,
    parse_mme,
    parse_pope,
    score_exact_match,
    score_mme,
    score_pope,
)

TRICKY = ["Yes, it is.", "No.", "There is no dog", "not sure", "eyes", "Nothing", "", "yes", "NO", "y", "n.",
          "Yes.", " no", "no, there is not."]


def test_parse_mme_official_rule():
    expected = ["yes", "no", "other", "no", "yes", "no", "other", "yes", "no", "other", "other", "yes", "no", "no"]
    assert [parse_mme(a) for a in TRICKY] == expected
    # lmms-eval: stripped, dots removed, a lone y / n counts
    lmms = ["yes", "no", "other", "no", "yes", "no", "other", "yes", "no", "yes", "no", "yes", "no", "no"]
    assert [parse_mme(a, "lmms-eval") for a in TRICKY] == lmms
    with pytest.raises(ValueError, match="variant"):
        parse_mme("yes", "vlmevalkit")
    # the official prefix is 4 characters: a "yes" in " yes" counts, one starting at the 3rd does not
    assert [parse_mme(a) for a in (" yes it is", "a yes", " no!", "a no")] == ["yes", "other", "no", "no"]
    assert parse_mme("an no") == "other"


def test_parse_pope_llava_rule():
    # before the first ".", commas removed, words "No" / "not" / "no" -> no; everything else yes (even "", "NO")
    expected = ["yes", "no", "no", "no", "yes", "yes", "yes", "yes", "yes", "yes", "yes", "yes", "no", "no"]
    assert [parse_pope(a) for a in TRICKY] == expected
    # lmms-eval keeps the prediction: only an exact (lower-cased, stripped) "yes" / "no" is one
    lmms = [a.lower().strip() for a in TRICKY]
    assert [parse_pope(a, "lmms-eval") for a in TRICKY] == lmms
    assert [p for p in lmms if p in ("yes", "no")] == ["yes", "no", "no"]  # "No." is neither


def test_score_mme_pairs_and_sums():
    records = []
    # existence: 2 images; image a both right, image b one right -> acc 3/4, acc+ 1/2 -> 75 + 50 = 125
    for image, answers in (("a", ["Yes", "No"]), ("b", ["Yes", "Yes"])):
        for answer, label in zip(answers, ["Yes", "No"]):
            records.append({"subtask": "existence", "image": image, "answer": answer, "label": label})
    # count: one image, both right -> 200; an "other" answer counts wrong
    records += [{"subtask": "count", "image": "c", "answer": "yes", "label": "Yes"},
                {"subtask": "count", "image": "c", "answer": "No.", "label": "No"},
                {"subtask": "count", "image": "d", "answer": "two", "label": "Yes"},
                {"subtask": "count", "image": "d", "answer": "no", "label": "No"}]
    records += [{"subtask": "code_reasoning", "image": "e", "answer": "Yes", "label": "Yes"},
                {"subtask": "code_reasoning", "image": "e", "answer": "Yes", "label": "No"}]
    out = score_mme(records)
    ex, count, code = (out["subtasks"][t] for t in ("existence", "count", "code_reasoning"))
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (0.75, 0.5, 125.0)
    assert (count["acc"], count["acc_plus"], count["score"]) == (0.75, 0.5, 125.0)
    assert (code["acc"], code["acc_plus"], code["score"]) == (0.5, 0.0, 50.0)
    assert out["perception"] == 250.0 and out["cognition"] == 50.0 and out["variant"] == "llava"
    assert set(out["missing_subtasks"]) >= set(MME_PERCEPTION) - {"existence", "count"}
    with pytest.raises(ValueError, match="yes / no"):
        score_mme([{"subtask": "count", "image": "x", "answer": "yes", "label": "maybe"}])


def test_score_pope_confusion_metrics():
    rows = [("random", "Yes", "yes"), ("random", "No", "yes"), ("random", "Yes, there is.", "no"),
            ("random", "No, there is not.", "no"), ("random", "yes", "yes"),
            ("popular", "No.", "no"), ("popular", "No.", "yes")]
    out = score_pope([{"category": c, "answer": a, "label": y} for c, a, y in rows])
    r = out["categories"]["random"]  # tp 2, fn 1, fp 1, tn 1
    assert (r["tp"], r["fn"], r["fp"], r["tn"]) == (2, 1, 1, 1)
    assert r["accuracy"] == pytest.approx(3 / 5) and r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 3) and r["f1"] == pytest.approx(2 / 3)
    assert r["yes_ratio"] == pytest.approx(3 / 5)  # of the predictions
    built = "".join(["lla", "va"])  # a variant string from a command line is equal to "llava", not the same object
    assert score_pope([{"category": c, "answer": a, "label": y} for c, a, y in rows], built) == out
    p = out["categories"]["popular"]  # nothing predicted yes: precision, recall, f1 0 rather than a crash
    assert (p["precision"], p["recall"], p["f1"], p["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    assert out["mean_f1"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert out["all"]["tp"] == 2 and out["all"]["f1"] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    lmms = score_pope([{"category": c, "answer": a, "label": y} for c, a, y in rows], "lmms-eval")
    r = lmms["categories"]["random"]  # "Yes" / "No" count; "Yes, there is." and "No, there is not." are neither
    assert (r["tp"], r["fn"], r["fp"], r["tn"], r["other"]) == (2, 1, 0, 0, 2)
    assert r["accuracy"] == pytest.approx(2 / 5) and r["precision"] == 1.0 and r["recall"] == pytest.approx(2 / 3)
    assert r["yes_ratio"] == pytest.approx(3 / 5)  # of the labels
    every = lmms["all"]  # lmms-eval's pope task: one F1 over all questions ("No." is neither either)
    assert (every["tp"], every["fn"], every["fp"], every["other"]) == (2, 1, 0, 4)
    assert every["f1"] == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))


def test_exact_match_per_type():
    records = [{"type": "color", "answer": "Red.", "label": "red"}, {"type": "color", "answer": "blue", "label": "red"},
               {"type": "count", "answer": " 3 ", "label": "3"}, {"type": "shape", "answer": "square", "label": "circle"}]
    out = score_exact_match(records)
    assert out["types"]["color"]["accuracy"] == 0.5 and out["types"]["count"]["accuracy"] == 1.0
    assert out["types"]["shape"]["accuracy"] == 0.0
    assert out["overall"] == pytest.approx(2 / 4) and normalize_answer(" Yes. ") == "yes"


def test_majority_answer_per_type():
    from eval.understanding_scoring import majority_answers

    records = [{"type": "count", "label": "2"}, {"type": "count", "label": "1"}, {"type": "count", "label": "2."},
               {"type": "existence", "label": "yes"}, {"type": "existence", "label": "no"}]
    assert majority_answers(records) == {"count": "2", "existence": "no"}  # a tie goes to the first alphabetically
