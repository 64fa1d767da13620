"""The understanding model is a standard transformers LLaVA: the VQRAE tower's features equal encode_features, an
export loads and answers in a process that never imports this repository, and plug-and-play swaps keep the rest."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration

from common.config import ConfigError
from data.transforms import pil_to_tensor
from llm.understanding import (
    add_image_token,
    answer,
    export_vision_tower,
    feature_select_strategy,
    replace_vision_tower,
    save_llava,
    vision_tower,
)
from llm.vocab import build_tiny_qwen3
from tokenizer import VQRAE, get_preset
from world.shapes import render_sample, shapes_world_tokenizer

REPO = Path(__file__).resolve().parents[1]


def tiny_vqrae(preset: str = "tiny", seed: int = 0, **encoder) -> VQRAE:
    torch.manual_seed(seed)
    cfg = get_preset(preset)
    if encoder:
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **encoder))
    return VQRAE(cfg).eval()


def small_internvit() -> VQRAE:
    cfg = get_preset("internvit-300m-p14-448")
    tower = dict(cfg.encoder.tower, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                 image_size=56)
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, tower=tower, feature_layer=-2))
    cfg.decoder = dataclasses.replace(cfg.decoder, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64)
    torch.manual_seed(0)
    return VQRAE(cfg).eval()


def shapes_images(size: int, n: int = 2) -> list[Image.Image]:
    return [render_sample(5, i, size)[0] for i in range(n)]


@pytest.mark.parametrize("which", ["siglip-last", "siglip-penultimate", "internvit"])
def test_exported_tower_features_equal_encode_features(tmp_path, which):
    vqrae = {"siglip-last": lambda: tiny_vqrae(), "siglip-penultimate": lambda: tiny_vqrae(feature_layer=-2),
             "internvit": small_internvit}[which]()
    vqrae.save_pretrained(tmp_path / "tok")
    from transformers import AutoImageProcessor, AutoModel

    out = export_vision_tower(tmp_path / "tok", tmp_path / "tower")
    tower, processor = AutoModel.from_pretrained(out).eval(), AutoImageProcessor.from_pretrained(out)
    images = shapes_images(vqrae.config.encoder.image_size)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]  # what LLaVA reads
        if feature_select_strategy(vqrae) == "default":
            hidden = hidden[:, 1:]
        ours = vqrae.encode_features(torch.stack([pil_to_tensor(im) for im in images]))
    torch.testing.assert_close(hidden, ours, atol=1e-5, rtol=1e-5)


def test_naflex_towers_are_refused_for_llava():
    tower = {"model_type": "siglip2_vision_model", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "patch_size": 8, "num_patches": 64, "vision_use_head": False}
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, tower=tower))
    with pytest.raises(ConfigError, match="NaFlex"):
        vision_tower(VQRAE(cfg))


def test_llava_features_and_text_path_are_the_parts(llava_export):
    _, vqrae, lm, model, processor = llava_export
    images = shapes_images(64)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                            vision_feature_select_strategy="full").pooler_output
        expected = model.model.multi_modal_projector(vqrae.encode_features(torch.stack([pil_to_tensor(im)
                                                                                        for im in images])))
        torch.testing.assert_close(torch.stack(features), expected, atol=1e-5, rtol=1e-5)
        ids = torch.tensor([[5, 9, 13, 2]])  # text only: exactly the language model
        torch.testing.assert_close(model(input_ids=ids).logits, lm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert model.config.vision_feature_select_strategy == "full" and model.config.image_seq_length == 64
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "hi"}]}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images[:1], text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 64  # one token per feature


SUBPROCESS = """
import json, sys
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
directory, images, questions = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3])
model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
processor = AutoProcessor.from_pretrained(directory)
processor.tokenizer.padding_side = "left"
texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                       add_generation_prompt=True, tokenize=False) for q in questions]
inputs = processor(images=[Image.open(p).convert("RGB") for p in images], text=texts, return_tensors="pt",
                   padding=True)
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)  # the export's generation config: where to stop
print(json.dumps([processor.tokenizer.decode(r, skip_special_tokens=True).strip()
                  for r in out[:, inputs["input_ids"].shape[1]:]]))
print("modules:", sorted(m for m in sys.modules if m.split(".")[0] in ("tokenizer", "llm", "common", "data")))
"""


def test_export_answers_the_same_in_transformers_alone(llava_export, tmp_path):
    root, _, _, model, processor = llava_export
    images = shapes_images(64, 3)
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    questions = ["What color is the circle?", "How many squares are there?", "Is there a triangle?"]
    from llm.understanding import SHORT_ANSWER

    ours = answer(model, processor, images, questions, max_new_tokens=8)
    assert len(set(ours)) > 1  # the answers depend on the input
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS, str(root / "export"), ",".join(paths),
                           json.dumps([q + SHORT_ANSWER for q in questions])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[-2]) == ours
    assert lines[-1] == "modules: []"  # this repository was never imported there


def test_the_export_stops_a_plain_generate_at_the_end_of_turn(llava_export):
    """ChatML's end of turn is not the LM's EOS: the export's generation config and its tokenizer's EOS name it (what
    `generate` and lmms-eval's llava_hf stop at), and the LM's own EOS still ends a generation."""
    from transformers import AutoProcessor, GenerationConfig

    root, _, _, _, processor = llava_export
    end, eos = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    config = GenerationConfig.from_pretrained(root / "export")
    assert config.eos_token_id == [end, eos] and config.pad_token_id == processor.tokenizer.pad_token_id
    exported = AutoProcessor.from_pretrained(root / "export").tokenizer
    assert exported.eos_token_id == end and exported.decode([eos, end], skip_special_tokens=True) == ""
    assert processor.tokenizer.eos_token_id == eos  # the training tokenizer is left as it was


def test_the_exported_processor_counts_the_image_tokens_it_inserts(llava_export):
    """Serving tools (vLLM's transformers backend) ask the processor how many tokens an image takes, from its crop
    size: the count must be the number of <image> tokens it writes, whatever the image's size."""
    from transformers import AutoProcessor

    root, _, _, _, _ = llava_export
    processor = AutoProcessor.from_pretrained(root / "export")
    image = Image.new("RGB", (50, 20), (200, 10, 10))
    ids = processor(images=image, text="<image>\nWhat is it?", return_tensors="pt")["input_ids"][0]
    written = int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
    grid = processor.image_processor.size["height"] // processor.patch_size
    assert written == grid * grid
    assert processor._get_num_multimodal_tokens(image_sizes=[(20, 50)])["num_image_tokens"] == [written]


def test_replace_vision_tower_keeps_projector_and_llm(tmp_path):
    tokenizer = shapes_world_tokenizer(tmp_path / "tok")
    add_image_token(tokenizer)
    lm = build_tiny_qwen3(tokenizer, seed=1)
    vision = {k: v for k, v in get_preset("tiny").encoder.tower.items() if k != "model_type"}
    config = LlavaConfig(vision_config={"model_type": "siglip_vision_model", **vision},
                         text_config=lm.config.to_dict(), image_token_index=add_image_token(tokenizer),
                         vision_feature_select_strategy="full", vision_feature_layer=-2, image_seq_length=64)
    torch.manual_seed(7)
    original = LlavaForConditionalGeneration(config).eval()
    vqrae = tiny_vqrae(seed=11)
    from llm.understanding import build_processor

    save_llava(original, build_processor(vqrae, tokenizer), tmp_path / "llava")
    vqrae.save_pretrained(tmp_path / "tok-a")
    swapped_dir = replace_vision_tower(tmp_path / "llava", tmp_path / "tok-a", tmp_path / "swapped")
    swapped = LlavaForConditionalGeneration.from_pretrained(swapped_dir).eval()
    before, after = original.state_dict(), swapped.state_dict()
    for name, tensor in before.items():
        if not name.startswith("model.vision_tower."):
            assert torch.equal(after[name], tensor), name
    x = torch.stack([pil_to_tensor(im) for im in shapes_images(64)])
    with torch.no_grad():
        feats = swapped.get_image_features(pixel_values=(x + 1) / 2 * 2 - 1, vision_feature_layer=-1,
                                           vision_feature_select_strategy="full").pooler_output
        torch.testing.assert_close(torch.stack(feats), swapped.model.multi_modal_projector(vqrae.encode_features(x)),
                                   atol=1e-5, rtol=1e-5)
    wide = tiny_vqrae(seed=0)
    wide_cfg = dataclasses.replace(wide.config.encoder, tower=dict(wide.config.encoder.tower, hidden_size=32,
                                                                   num_attention_heads=2))
    VQRAE(dataclasses.replace(wide.config, encoder=wide_cfg)).save_pretrained(tmp_path / "tok-wide")
    with pytest.raises(ConfigError, match="width 64, the VQRAE encoder 32"):
        replace_vision_tower(tmp_path / "llava", tmp_path / "tok-wide", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert np.isfinite(feats[0].numpy()).all()


def test_tower_script_errors_are_one_line(tmp_path):
    script = [sys.executable, str(REPO / "scripts" / "llava_tower.py")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*script, "export", str(tmp_path / "missing"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "not a VQRAE directory" in proc.stderr
    tiny_vqrae().save_pretrained(tmp_path / "tok")
    proc = subprocess.run([*script, "swap", str(tmp_path / "tok"), str(tmp_path / "tok"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a LLaVA export" in proc.stderr
    proc = subprocess.run([*script, "export", str(tmp_path / "tok"), str(tmp_path / "tower")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "tower" / "preprocessor_config.json").is_file()


def test_evaluation_answers_resumes_and_scores(llava_export, tmp_path):
    from tests.helpers import run_script
    from world.export import export_llava

    root = llava_export[0]
    export_llava(tmp_path / "world", 3, image_size=64, seed=4, progress=False)
    questions = tmp_path / "world" / "questions.jsonl"
    out = tmp_path / "eval"
    def evaluate(arguments):
        run_script("eval/understanding.py", arguments)

    argv = ["--model", str(root / "export"), "--questions", str(questions), "--out", str(out), "--batch-size", "4",
            "--device", "cpu"]
    evaluate(argv)
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    total = len(questions.read_text().splitlines())
    assert len(rows) == total and all("prediction" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["questions"] == total and 0 <= summary["overall"] <= 1
    # an interrupted run: drop the last answers (and cut a line in half); the rerun answers only those, the same way
    lines = (out / "answers.jsonl").read_text().splitlines()
    (out / "answers.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:10])
    evaluate(argv)
    again = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert sorted(again, key=lambda r: r["question_id"]) == sorted(rows, key=lambda r: r["question_id"])
    with pytest.raises(SystemExit):
        evaluate([*argv, "--max-new-tokens", "3"])  # other settings in the same folder: refused
    evaluate([*argv[:5], str(tmp_path / "blank"), *argv[6:], "--blank-images"])
    blank = [json.loads(line) for line in (tmp_path / "blank" / "answers.jsonl").read_text().splitlines()]
    assert len(blank) == total
