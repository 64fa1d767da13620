"""lmms-eval's own code as the oracle of our understanding evaluator: the shapes world's existence questions as MME
pairs and POPE records, and (with the `lmms` extra installed) scripts/lmms_eval_check.py on a LLaVA export: every
prediction and every aggregated number of lmms-eval's llava_hf model and MME / POPE task functions equal ours."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from world.export import QUESTIONS, export_llava, mme_pope_questions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("heldout")
    export_llava(root, 8, image_size=64, seed=1, progress=False)
    return root / QUESTIONS


def test_existence_questions_become_mme_pairs_and_pope_records(heldout):
    questions = [json.loads(line) for line in heldout.read_text().splitlines()]
    mme, pope = mme_pope_questions(questions)
    existence = [q for q in questions if q["type"] == "existence"]
    assert len(pope) == len(existence) > 0 and {r["category"] for r in pope} == {"random"}
    assert Counter(r["label"] for r in pope) == Counter(q["answer"] for q in existence)
    pairs = Counter(r["image"] for r in mme)
    assert set(pairs.values()) == {2} and len(pairs) == len({q["image"] for q in existence})
    for image in pairs:  # each image: one Yes and one No, as MME's pairs
        assert sorted(r["label"] for r in mme if r["image"] == image) == ["No", "Yes"]
    assert all(r["text"] == r["question"] + "\nAnswer the question using a single word or phrase." for r in mme + pope)


def test_lmms_eval_gives_our_predictions_and_scores(llava_export, heldout, tmp_path):
    pytest.importorskip("lmms_eval.models.simple.llava_hf", reason="lmms-eval is the `lmms` extra")
    root = llava_export[0]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "lmms_eval_check.py"), "--model",
                           str(root / "export"), "--questions", str(heldout), "--limit", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "lmms_eval_check.json").read_text())
    assert report["equal"] and set(report["tasks"]) == {"mme", "pope"}
    assert report["tasks"]["pope"]["questions"] == 16 and report["tasks"]["mme"]["max_new_tokens"] == 16
