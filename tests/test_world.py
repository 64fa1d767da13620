"""The CPU default's world as a miniature of the real recipe: its caption grammar and truth, the prepare step (data on
disk, a SigLIP and a Qwen3 pretrained on it, deterministic and resumable), the foundation models loading through
transformers alone and through VQRAE's real encoder path, and the trainers reading only what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.config import ConfigError, load_config
from tests.helpers import failure_report, trainer_env
from world.captions import (
    CAPTION_KINDS,
    caption_facts,
    caption_is_true,
    caption_kinds,
    description,
    fact_matrix,
    image_facts,
    parse_caption,
    truth_matrix,
)
from world.prepare import PrepareConfig, prepare
from world.shapes import RELATIONS, TAGS, relation_strength, sample_metadata, task_records

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- captions


def test_every_caption_the_world_writes_is_true_of_its_image_and_in_the_grammar():
    for index in range(400):
        meta, _ = sample_metadata(0, index, 32)
        for kind, caption in caption_kinds(meta).items():
            assert caption_is_true(caption, meta["objects"]), (kind, caption, meta["objects"])
    prompts = [r["prompt"] for tag in TAGS for r in task_records(tag)]
    assert len(prompts) == 612 and all(caption_facts(p) is not None for p in prompts)


def test_captions_that_misstate_the_image_are_false():
    meta = next(m for m in (sample_metadata(0, i, 32)[0] for i in range(200))
                if len(m["objects"]) == 2 and m["objects"][0]["shape"] != m["objects"][1]["shape"]
                and "relation" not in m["prompt"])
    a, b = meta["objects"]
    other = next(c for c in ("red", "blue") if c != a["color"])
    wrong = [f"a photo of a {other} {a['shape']} and a {b['color']} {b['shape']}",  # a colour
             f"a photo of a {a['shape']}",  # an object left out
             f"a photo of two {a['shape']}s and a {b['shape']}"]  # a count
    for relation in RELATIONS:  # a relation that does not hold
        if relation_strength(a["box"], b["box"], relation) <= 0.5:
            wrong.append(f"a photo of a {a['shape']} {relation} a {b['shape']}")
    for caption in wrong:
        assert caption_facts(caption) is not None and not caption_is_true(caption, meta["objects"]), caption


def test_the_grammar_refuses_what_it_cannot_state_exactly():
    for caption in ("a red circle", "a photo of a circle and", "a photo of two circle", "a photo of a tall circle",
                    "a photo of a red circle and a circle",  # one shape's groups partly coloured
                    "a photo of a circle left of a square and a circle",  # a relation on a shape present twice
                    "a photo of five circles"):
        assert caption_facts(caption) is None, caption


def test_truth_matrix_is_the_pairwise_truth():
    metas = [sample_metadata(3, i, 32)[0] for i in range(40)]
    captions = [caption_kinds(m)[k] for m in metas for k in CAPTION_KINDS]
    got = truth_matrix(fact_matrix([image_facts(m["objects"]) for m in metas]),
                       fact_matrix([caption_facts(c) for c in captions]))
    expected = torch.tensor([[caption_is_true(c, m["objects"]) for c in captions] for m in metas])
    assert torch.equal(got, expected) and got.float().mean() > got.diagonal().float().mean() / len(captions)


def test_a_description_answers_the_position_question_it_was_made_for():
    """The LM's conversations put the asked pair's strongest relation in the description: a position question is
    then "yes" exactly when it asks that relation (questions are asked only where their answer is clear)."""
    checked = 0
    for index in range(600):
        meta, _ = sample_metadata(1, index, 32)
        for qa in meta["qa"]:
            if qa["type"] == "position":
                _, relations = parse_caption(description(meta["objects"], tuple(qa["pair"])))
                asked = next(r for r in RELATIONS if f" {r} " in qa["question"])
                assert (qa["answer"] == "yes") == (relations == [(qa["pair"][0], asked, qa["pair"][1])]), qa
                checked += 1
    assert checked > 100


# ----------------------------------------------------------------------------------------------- SigLIP's loss


def test_sigmoid_loss_is_siglips_with_one_true_caption_per_image():
    from transformers import SiglipConfig, SiglipModel

    from world.siglip import sigmoid_loss

    config = SiglipConfig(text_config={"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "intermediate_size": 32,
                                       "max_position_embeddings": 8, "projection_size": 16},
                          vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                         "intermediate_size": 32, "image_size": 16, "patch_size": 8})
    torch.manual_seed(0)
    model = SiglipModel(config)
    out = model(input_ids=torch.randint(0, 40, (5, 8)), pixel_values=torch.randn(5, 3, 16, 16), return_loss=True)
    assert torch.allclose(sigmoid_loss(out.logits_per_text, torch.eye(5, dtype=torch.bool)), out.loss)
    both = torch.eye(5, dtype=torch.bool)
    both[0, 1] = True  # caption 0 true of image 1 too: that pair's term turns from -1 to +1
    expected = out.loss - (torch.nn.functional.logsigmoid(out.logits_per_text[0, 1]) -
                           torch.nn.functional.logsigmoid(-out.logits_per_text[0, 1])) / 5
    assert torch.allclose(sigmoid_loss(out.logits_per_text, both), expected)


# ----------------------------------------------------------------------------------------------- the prepare step


def tiny_config(out: Path, **changes) -> PrepareConfig:
    """The prepare step in seconds: a few images, towers of width 16, a handful of steps."""
    towers = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    run = {"batch_size": 8, "ckpt_every": 2, "log_every": 1, "optim": {"lr": 1e-3, "warmup_steps": 1}}
    raw = {"out": str(out), "image_size": 32, "shard_size": 16, "train": {"samples": 48, "seed": 0},
           "val": {"samples": 8, "seed": 2}, "heldout": {"samples": 8, "seed": 1}, "prompts_per_task": 2,
           "val_prompts_per_task": 1, "dpg_prompts": 3,
           "siglip": {"vision": {**towers, "patch_size": 8}, "text": towers, "vocab_size": 64, "max_length": 20,
                      "run": {**run, "steps": 4}},
           "lm": {"model": {**towers, "num_key_value_heads": 1, "head_dim": 8}, "vocab_size": 300,
                  "run": {**run, "steps": 4}}}
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        target = raw
        for part in section.split(".") if section else []:
            target = target[part]
        target[field] = value
    return load_config(PrepareConfig, raw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    prepare(tiny_config(out), progress=False)
    return out


def test_prepare_writes_every_format_and_both_models(prepared):
    for split in ("train", "val", "heldout"):
        folder = prepared / split
        for name in ("captions.jsonl", "llava_captions.json", "llava_conversations.json", "questions.jsonl"):
            assert (folder / name).is_file(), (split, name)
        assert sorted(p.name for p in (folder / "shards").iterdir())[0] == "000000.tar"
    assert len((prepared / "train" / "captions.jsonl").read_text().splitlines()) == 48
    assert (prepared / "geneval_prompts.jsonl").is_file() and (prepared / "dpg" / "dpg_bench.csv").is_file()
    for model in ("siglip", "qwen3"):
        assert (prepared / model / "config.json").is_file() and (prepared / model / "pretraining.json").is_file()
    assert not (prepared / ".work").exists() or not any((prepared / ".work").iterdir())


def test_prepare_is_deterministic_for_a_seed(prepared, tmp_path):
    prepare(tiny_config(tmp_path / "again"), progress=False)
    for model in ("siglip", "qwen3"):
        a, b = load_file(str(prepared / model / "model.safetensors")), load_file(
            str(tmp_path / "again" / model / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), model
    assert (prepared / "train" / "llava_conversations.json").read_bytes() == (
        tmp_path / "again" / "train" / "llava_conversations.json").read_bytes()
    other = tmp_path / "other-seed"
    prepare(tiny_config(other, **{"siglip.run.seed": 1}), ("data", "siglip"), progress=False)
    a, b = load_file(str(prepared / "siglip" / "model.safetensors")), load_file(
        str(other / "siglip" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_killed_pretraining_resumes_to_the_same_weights(tmp_path):
    from world.pretrain import PretrainConfig, pretrain

    data = torch.randn(64, 4)

    def run(work: Path, dies_at_call: int | None = None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        calls = []

        def loss_fn(generator: torch.Generator):
            calls.append(1)
            if len(calls) == dies_at_call:
                raise KeyboardInterrupt
            x = data[torch.randint(0, 64, (8,), generator=generator)]
            return (x.sum(1, keepdim=True) - model(x)).square().mean(), {}

        pretrain(model, loss_fn, PretrainConfig(steps=6, batch_size=8, ckpt_every=2, log_every=1), work, "test",
                 progress=False)
        return {k: v.clone() for k, v in model.state_dict().items()}

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", dies_at_call=4)  # dies in step 4, after the checkpoint of step 2
    assert json.loads((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    resumed = run(tmp_path / "killed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_prepare_refuses_other_settings_and_a_missing_data_step(prepared, tmp_path):
    with pytest.raises(ConfigError, match="other settings"):
        prepare(tiny_config(prepared, dpg_prompts=4), ("data",), progress=False)
    with pytest.raises(ConfigError, match="other settings"):
        prepare(tiny_config(prepared, **{"lm.run.steps": 5}), ("lm",), progress=False)
    with pytest.raises(FileNotFoundError, match="run the data step first"):
        prepare(tiny_config(tmp_path / "empty"), ("siglip",), progress=False)
    with pytest.raises(ValueError, match="distinct world seeds"):
        tiny_config(tmp_path / "x", **{"val.seed": 0})


def test_the_models_load_in_transformers_alone(prepared, tmp_path):
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, SiglipModel
siglip = SiglipModel.from_pretrained({str(prepared / 'siglip')!r})
processor = AutoProcessor.from_pretrained({str(prepared / 'siglip')!r})
from PIL import Image
inputs = processor(text=["a photo of a red circle"], images=[Image.new("RGB", (32, 32))], padding="max_length",
                   max_length=20, return_tensors="pt")
assert siglip(**inputs).logits_per_image.shape == (1, 1)
lm = AutoModelForCausalLM.from_pretrained({str(prepared / 'qwen3')!r})
tok = AutoTokenizer.from_pretrained({str(prepared / 'qwen3')!r})
ids = tok.apply_chat_template([{{"role": "user", "content": "How many circles are there?"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = lm.generate(**ids, max_new_tokens=2, do_sample=False)
import sys
assert not any(m.split(".")[0] in ("world", "tokenizer", "llm", "data", "common") for m in sys.modules)
print(type(siglip).__name__, type(lm).__name__, out.shape[0])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, failure_report(proc)
    assert proc.stdout.split() == ["SiglipModel", "Qwen3ForCausalLM", "1"]


def test_vqrae_on_the_siglip_folder_holds_its_vision_tensors(prepared):
    from transformers import SiglipModel

    from tokenizer import VQRAE, get_preset

    vqrae = VQRAE.from_pretrained_encoder(get_preset("tiny-p4-32"), prepared / "siglip")
    siglip = SiglipModel.from_pretrained(prepared / "siglip").eval()
    reference = siglip.vision_model.state_dict()
    tower = {k.removeprefix("vision_model."): v for k, v in vqrae.encoder.tower.state_dict().items()}
    assert tower and all(torch.equal(v, reference[k]) for k, v in tower.items())
    assert all(k.startswith(("head.", "post_layernorm.")) for k in reference.keys() - tower.keys())  # never read
    assert (vqrae.config.encoder.hidden_size, vqrae.config.encoder.patch_size) == (16, 8)  # the folder's tower
    with torch.no_grad():  # the features are the tower's last hidden state, as LLaVA and VQRAE read it
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        hidden = siglip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(vqrae.encode_features(x), hidden, atol=1e-5)


def test_prepare_command_takes_steps_overrides_and_options_in_any_order(tmp_path):
    out = tmp_path / "w"
    small = ["train.samples=12", "val.samples=4", "heldout.samples=4", "shard_size=8", "prompts_per_task=1",
             "val_prompts_per_task=1", "dpg_prompts=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_world.py"), "data", "--no-progress",
                           f"out={out}", *small], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "data.json").is_file() and not (out / "siglip").exists()  # the data step alone ran
    assert len((out / "train" / "captions.jsonl").read_text().splitlines()) == 12


# ----------------------------------------------------------------------------------------------- the trainers


@pytest.mark.parametrize("script, key", [("tokenizer", "data.train"), ("ar_gen", "lm.pretrained"),
                                         ("understanding", "data.conversations")])
def test_trainers_refuse_missing_inputs_in_one_line_and_write_nothing(tmp_path, script, key):
    missing = tmp_path / "missing"
    argv = [f"{key}={missing}", f"run.output_dir={tmp_path / 'run'}"]
    if script == "ar_gen":
        argv.append(f"data.vqrae={tmp_path}")
    env = trainer_env()
    proc = subprocess.run([sys.executable, str(REPO / "train" / f"{script}.py"), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: ") and key in last and "prepare_world.py" in last, last
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no data, no run folder


def test_probes_read_a_perfect_feature_perfectly_and_know_the_majority():
    from world.probes import attribute_probes, attribute_targets

    metas = [sample_metadata(0, i, 32)[0] for i in range(300)]
    targets = attribute_targets(metas)
    onehots = torch.cat([torch.nn.functional.one_hot(y, c).float() * m[:, None] for y, m, c in targets.values()], 1)
    scores = attribute_probes(onehots[:200], metas[:200], onehots[200:], metas[200:], l2=1e-4)
    assert all(scores[a] == pytest.approx(1.0) for a in ("presence", "count", "color", "position"))
    noise = torch.randn(300, 40)
    chance = attribute_probes(noise[:200], metas[:200], noise[200:], metas[200:])
    assert chance["color"] < 0.4 and 0.0 < chance["majority color"] < 0.3
    assert np.isclose(chance["majority presence"], scores["majority presence"])


def test_lm_conversations_are_qwens_chatml_with_the_answers_supervised():
    from llm.text_tokenizer import CHATML_TEMPLATE
    from llm.understanding import CHAT_FORMATS, chat_tokens
    from world.lm import conversation
    from world.shapes import shapes_world_tokenizer

    tokenizer = shapes_world_tokenizer()
    for index in range(10):
        meta, _ = sample_metadata(0, index, 32)
        messages = conversation(meta, 0, index)
        ids, labels = chat_tokens(tokenizer, messages, CHAT_FORMATS["chatml"].template)
        rendered = tokenizer.apply_chat_template(messages, chat_template=CHATML_TEMPLATE, tokenize=False)
        assert rendered == tokenizer.apply_chat_template(messages, chat_template=CHAT_FORMATS["chatml"].template,
                                                         tokenize=False)  # the understanding model's ChatML too
        assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        supervised = tokenizer.decode([t for t in labels if t >= 0])
        assert supervised == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        assert messages[0]["content"].startswith("a photo of ") and "\n" in messages[0]["content"]


def test_lm_reading_scores_every_question_or_each_images_first(prepared):
    """An LM that always answers "yes" scores, per type, the share of "yes" answers among the questions asked: all of
    them (each after the image's description, with the short-answer prompt) or each image's first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.understanding import SHORT_ANSWER
    from world.export import conversation_order
    from world.lm import scene_text
    from world.probes import lm_reading, read_split

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(prepared / "qwen3")
    model = AutoModelForCausalLM.from_pretrained(prepared / "qwen3")
    metas = read_split(prepared / "val")
    texts = [scene_text(m) + "\n" + qa["question"] + SHORT_ANSWER for m in metas for qa in m["qa"]]
    texts += [scene_text(m) + "\n" + qa["question"] for m in metas for qa in m["qa"]]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True) for t in texts]
    answer = tokenizer("yes<|im_end|>", add_special_tokens=False)["input_ids"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # a yes-sayer: "yes" then the end of turn after any question
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + answer
            labels = [-100] * (len(ids) - len(answer)) + answer
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if loss.item() < 1e-3:
            break
    seed = json.loads((prepared / "data.json").read_text())["val"]["seed"]

    def yes_share(questions: list[dict]) -> dict[str, float]:
        types = sorted({q["type"] for q in questions})
        share = {t: float(np.mean([q["answer"] == "yes" for q in questions if q["type"] == t])) for t in types}
        return share | {"overall": float(np.mean([q["answer"] == "yes" for q in questions]))}

    every = [qa for m in metas for qa in m["qa"]]
    first = [m["qa"][conversation_order(len(m["qa"]), seed, i)[0][0]] for i, m in enumerate(metas)]
    assert lm_reading(model, tokenizer, metas, seed, batch_size=3, questions="all") == pytest.approx(yes_share(every))
    assert lm_reading(model, tokenizer, metas, seed, batch_size=3) == pytest.approx(yes_share(first))
    with pytest.raises(ValueError, match="'first' or 'all'"):
        lm_reading(model, tokenizer, metas, seed, questions="some")
