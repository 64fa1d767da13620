"""DPG-Bench: the scoring arithmetic (fixed variant) on hand-made answers, tiles and crops, resumable generation and
scoring, and the shapes world's set end to end with the exact judge (real rendered images score 100, blank 0)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.dpg_generation import crops, generate, read_prompts, tile
from eval.dpg_scoring import (
    Question,
    crop_scores,
    format_summary,
    is_yes,
    read_question_csv,
    score_folder,
    score_prompt,
    summarize,
)
from llm.sampler import SamplingConfig
from tests.helpers import run_script
from tests.test_ar_gen import tiny_text_to_image
from world.dpg import CSV_COLUMNS, dpg_scene, render_dpg_scene, write_dpg_bench
from world.judge import ShapesJudge, geneval_record
from world.shapes import BACKGROUND, COLOR_NAMES, PALETTE

REPO = Path(__file__).resolve().parents[1]
# prompt "p": 1 entity, 2 its colour (parent 1), 3 another entity, 4 a relation (parents 1 and 3)
QUESTIONS = [Question(1, (0,), "entity - whole (circle)", "Is there a circle?"),
             Question(2, (1,), "attribute - color (circle, red)", "Is the circle red?"),
             Question(3, (0,), "entity - whole (square)", "Is there a square?"),
             Question(4, (1, 3), "relation - spatial (circle, square, left of)", "Is the circle left of the square?")]


def test_dependency_zeroing_crop_average_and_categories():
    crop_a = {1: "yes", 2: "Yes.", 3: "no", 4: "yes"}  # the square is missing: the relation is zeroed
    crop_b = {1: "no", 2: "yes", 3: "yes", 4: "yes"}  # the circle is missing: its colour and the relation are zeroed
    assert crop_scores(QUESTIONS, crop_a) == {1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0}
    assert crop_scores(QUESTIONS, crop_b) == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}
    result = score_prompt(QUESTIONS, [crop_a, crop_b])
    assert result["crop_scores"] == [0.5, 0.25] and result["score"] == pytest.approx(0.375)
    summary = summarize({"p": QUESTIONS}, {"p": result})
    assert summary["overall"] == pytest.approx(37.5) and summary["variant"] == "fixed"
    # categories over both crops after zeroing (upstream: the last crop's scores before zeroing)
    assert summary["l2"] == {"attribute - color": 50.0, "entity - whole": 50.0, "relation - spatial": 0.0}
    assert summary["l1"] == {"attribute": 50.0, "entity": 50.0, "relation": 0.0}
    # upstream-comparable (hustvl/VGT's copy, published tables): every crop, before the zeroing
    assert summary["upstream"]["l2"] == {"attribute - color": 100.0, "entity - whole": 50.0,
                                         "relation - spatial": 100.0}
    assert summary["upstream"]["l1"] == {"attribute": 100.0, "entity": 50.0, "relation": 100.0}
    assert "upstream" in format_summary(summary) and "100.00" in format_summary(summary)
    assert [is_yes(a) for a in ("yes", " Yes!", "YES.", "yes, it is", "no", "", "yess")] == \
        [True, True, True, False, False, False, False]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({c: r.get(c, "") for c in CSV_COLUMNS} for r in rows)
    return path


def test_every_csv_row_is_read_and_bad_files_are_one_line(tmp_path):
    rows = [{"item_id": "a", "proposition_id": 1, "dependency": "0", "tuple": "entity - whole (circle)",
             "question_natural_language": "Is there a circle?"},
            {"item_id": "a", "proposition_id": 2, "dependency": "1", "tuple": "attribute - color (circle, red)",
             "question_natural_language": "Is the circle red?"}]
    questions = read_question_csv(write_csv(tmp_path / "q.csv", rows))
    assert [q.proposition_id for q in questions["a"]] == [1, 2]  # the first data row too (upstream skipped it)
    assert questions["a"][1].parents == (1,) and questions["a"][1].category == "attribute - color"
    with pytest.raises(ValueError, match="depends on unknown proposition ids \\[7\\]"):
        read_question_csv(write_csv(tmp_path / "bad.csv", [{**rows[1], "dependency": "7"}]))
    (tmp_path / "cols.csv").write_text("item_id,text\na,b\n")
    with pytest.raises(ValueError, match="lacks DPG-Bench columns"):
        read_question_csv(tmp_path / "cols.csv")
    with pytest.raises(ValueError, match="prompt a repeats a proposition_id"):
        read_question_csv(write_csv(tmp_path / "twice.csv", [rows[0], {**rows[1], "proposition_id": 1}]))
    with pytest.raises(ValueError, match="unknown proposition ids \\[-1\\]"):  # only 0 means "no parent"
        read_question_csv(write_csv(tmp_path / "neg.csv", [rows[0], {**rows[1], "dependency": "-1"}]))
    # a bad number names its line (the header is line 1); a short row (a missing field) is the same one line
    with pytest.raises(ValueError, match="line 3: bad proposition_id or dependency"):
        read_question_csv(write_csv(tmp_path / "num.csv", [rows[0], {**rows[1], "dependency": "one"}]))
    (tmp_path / "short.csv").write_text(",".join(CSV_COLUMNS) + "\n" + ",".join(
        str(rows[0][c]) if c in rows[0] else "" for c in CSV_COLUMNS) + "\na\n")
    with pytest.raises(ValueError, match="line 3: bad proposition_id or dependency"):
        read_question_csv(tmp_path / "short.csv")
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):  # questions are shared between crops: never changed
        questions["a"][0].parents = (2,)


def test_tile_and_crop_order():
    images = [Image.new("RGB", (8, 8), PALETTE[c]) for c in COLOR_NAMES[:4]]
    tiled = tile(images)
    assert tiled.size == (16, 16)
    assert np.asarray(tiled)[0, 15].tolist() == list(PALETTE[COLOR_NAMES[1]])  # top-right is image 1
    assert np.asarray(tiled)[15, 0].tolist() == list(PALETTE[COLOR_NAMES[2]])  # bottom-left is image 2
    for a, b in zip(crops(tiled), images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="square with an even side"):
        crops(Image.new("RGB", (16, 15)))


def test_the_exact_judge_on_real_and_blank_images_and_the_sets_propositions(tmp_path):
    csv_path = write_dpg_bench(tmp_path / "set", 12)
    questions = read_question_csv(csv_path)
    assert len(questions) == 12 and len(read_prompts(tmp_path / "set" / "prompts")) == 12
    kinds = {q.category for qs in questions.values() for q in qs}
    assert kinds == {"entity - whole", "other - count", "attribute - color", "relation - spatial"}
    for name, picture in (("real", lambda i: render_dpg_scene(0, i, 32)[0]),
                          ("blank", lambda i: Image.new("RGB", (32, 32), BACKGROUND))):
        folder = tmp_path / name
        folder.mkdir()
        for i, (item, _) in enumerate(read_prompts(tmp_path / "set" / "prompts")):
            tile([picture(i)] * 4).save(folder / f"{item}.png")
        summary = score_folder(folder, questions, ShapesJudge(), tmp_path / f"{name}-scores")
        assert summary["overall"] == (100.0 if name == "real" else 0.0), summary
    assert summary["missing_images"] == 0 and summary["judge"] == "shapes-exact"
    with pytest.raises(ValueError, match="knows the world's propositions only"):
        geneval_record(Question(1, (0,), "global - style (watercolor)", "Is it a watercolor?"))


def test_generation_and_scoring_resume_to_the_same_files(tmp_path):
    t2i = tiny_text_to_image(tmp_path)
    write_dpg_bench(tmp_path / "set", 5)
    prompts = read_prompts(tmp_path / "set" / "prompts")
    questions = read_question_csv(tmp_path / "set" / "dpg_bench.csv")
    sampling = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=50, seed=3)
    generate(t2i, prompts, tmp_path / "a", sampling, prompts_per_batch=2, model_name="tiny")
    reference = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*.png")}
    assert len(reference) == 5 and len(set(reference.values())) == 5
    for killed in list(reference)[1::2]:
        (tmp_path / "a" / killed).unlink()
    generate(t2i, prompts, tmp_path / "a", sampling, prompts_per_batch=3, model_name="tiny")
    generate(t2i, prompts, tmp_path / "b", sampling, prompts_per_batch=5, model_name="tiny")
    for folder in ("a", "b"):
        assert {p.name: p.read_bytes() for p in (tmp_path / folder).glob("*.png")} == reference
    with pytest.raises(ValueError, match="other settings"):
        generate(t2i, prompts, tmp_path / "a", SamplingConfig(seed=4), prompts_per_batch=2, model_name="tiny")

    class Counting(ShapesJudge):
        calls = 0

        def answer(self, images, qs):
            Counting.calls += len(images)
            return super().answer(images, qs)

    full = score_folder(tmp_path / "a", questions, Counting(), tmp_path / "scores")
    answers = (tmp_path / "scores" / "answers.jsonl").read_text().splitlines()
    (tmp_path / "scores" / "answers.jsonl").write_text("\n".join(answers[:2]) + "\n" + answers[2][:10])  # cut
    Counting.calls = 0
    resumed = score_folder(tmp_path / "a", questions, Counting(), tmp_path / "scores")
    assert resumed["overall"] == full["overall"] and resumed["l2"] == full["l2"]
    assert Counting.calls == 4 * sum(len(questions[json.loads(a)["item_id"]]) for a in answers[2:])
    redrawn = sorted((tmp_path / "a").glob("*.png"))[0]  # a tile drawn again (another model) in the same folder
    tile([Image.new("RGB", (32, 32), BACKGROUND)] * 4).save(redrawn)
    Counting.calls = 0
    again = score_folder(tmp_path / "a", questions, Counting(), tmp_path / "scores")
    assert Counting.calls == 4 * len(questions[redrawn.stem])  # its recorded answers were to the old tile
    assert again["missing_images"] == 0


def test_the_scenes_prompts_name_what_the_questions_ask():
    for index in range(40):
        scene, _ = dpg_scene(0, index)
        for q in scene["questions"]:
            for word in q["tuple"].split("(")[1].rstrip(")").replace("==", "").split(", "):
                if not word.isdigit():
                    assert word in scene["prompt"], (word, scene["prompt"])


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "eval/dpg_bench.py", "--score-only", str(tmp_path), "--questions",
                           str(tmp_path / "missing.csv")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: question csv")


def test_the_command_generates_and_scores_a_handful_of_prompts(tmp_path):
    import torch

    from llm.generator import SequenceFormat, save_generator
    from llm.vocab import build_tiny_qwen3, expand_vocabulary
    from tokenizer import VQRAE, get_preset
    from world.shapes import shapes_world_tokenizer

    torch.manual_seed(0)
    VQRAE(get_preset("tiny-p4-32")).save_pretrained(tmp_path / "tok")
    tokenizer = shapes_world_tokenizer(tmp_path / "text")
    lm = build_tiny_qwen3(tokenizer)
    vocab = expand_vocabulary(lm, tokenizer, 512)
    save_generator(tmp_path / "gen", lm.eval(), tokenizer, vocab, SequenceFormat(), tmp_path / "tok")
    csv_path = write_dpg_bench(tmp_path / "set", 3)
    run_script("eval/dpg_bench.py", ["--model", str(tmp_path / "gen"), "--prompts", str(tmp_path / "set" / "prompts"),
                                     "--questions", str(csv_path), "--out", str(tmp_path / "out"), "--judge", "shapes",
                                     "--device", "cpu"])
    tiles = sorted((tmp_path / "out" / "images").glob("*.png"))
    assert [p.stem for p in tiles] == [item for item, _ in read_prompts(tmp_path / "set" / "prompts")]
    assert all(Image.open(p).size == (64, 64) for p in tiles)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["prompts"] == 3 and 0 <= summary["overall"] <= 100 and summary["judge"] == "shapes-exact"
    settings = json.loads((tmp_path / "out" / "images" / "generation.json").read_text())
    assert settings["sampling"]["cfg_scale"] == 3.0 and settings["sampling"]["seed"] == 42


def test_a_llava_export_judges_through_its_batched_answers(llava_export):
    from eval.dpg_judges import LlavaJudge
    from llm.understanding import answer

    root, _, _, model, processor = llava_export
    judge = LlavaJudge(root / "export", batch_size=2)
    images = [render_dpg_scene(0, i, 64)[0] for i in range(3)]
    got = judge.answer(images, QUESTIONS[:3])
    assert got == [answer(model, processor, [im], [q.text], 4, short=True)[0] for im, q in zip(images, QUESTIONS)]
    assert judge.name.startswith("llava:")
