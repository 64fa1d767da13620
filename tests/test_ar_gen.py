"""Generator training data and runs: caption dropout, sequence collation, a 2-process ZeRO-3 run of
train/ar_gen.py (codes extracted on the fly, samples, export), and sampling from the export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError
from data.codes import MANIFEST, CodeDataset, write_chunk
from data.sequences import CaptionCodeSequences, collate_sequences
from llm.generator import SequenceFormat, load_text_side, save_generator, save_text_side
from llm.pipeline import TextToImage
from llm.sampler import SamplingConfig
from llm.vocab import (
    FALLBACK_CHAT,
    IGNORE_INDEX,
    build_prompt_ids,
    build_tiny_qwen3,
    expand_vocabulary,
    unconditional_prompt_ids,
)
from tests.helpers import assert_resume_is_uninterrupted, failure_report, free_port, trainer_env
from tokenizer import VQRAE, get_preset
from world.export import export_world
from world.shapes import ShapesWorld, geneval_prompts, shapes_world_tokenizer, write_geneval_prompts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codes")
    world = ShapesWorld(400, 32, seed=0)
    rng = np.random.default_rng(0)
    write_chunk(root, 0, rng.integers(0, 512, (400, 64)).astype(np.uint16),
                [{"index": i, "caption": world[i]["caption"]} for i in range(400)])
    (root / MANIFEST).write_text(json.dumps({"num_tokens": 64, "codebook_size": 512}))
    return root


def test_caption_dropout_and_collation(codes_dir, tmp_path):
    tokenizer = shapes_world_tokenizer(tmp_path / "tok")
    vocab = expand_vocabulary(build_tiny_qwen3(tokenizer), tokenizer, 512)
    codes = CodeDataset(codes_dir)
    seqs = CaptionCodeSequences(codes, tokenizer, vocab, SequenceFormat(), caption_dropout=0.3, seed=7)
    items = [seqs[(2, i)] for i in range(len(seqs))]
    rate = sum(it["dropped"] for it in items) / len(items)
    assert 0.22 < rate < 0.38
    assert [seqs[(2, i)]["dropped"] for i in range(50)] == [it["dropped"] for it in items[:50]]  # reproducible
    assert [seqs[(3, i)]["dropped"] for i in range(400)] != [it["dropped"] for it in items]  # new epoch, new draws
    for i, it in enumerate(items[:40]):
        prompt = build_prompt_ids(tokenizer, codes[i]["caption"])
        expected = unconditional_prompt_ids(tokenizer, prompt, vocab) if it["dropped"] else prompt
        n = len(expected)
        assert it["input_ids"][:n].tolist() == expected  # exactly the sampler's unconditional prompt
        assert it["input_ids"][n] == vocab.image_start_id
        assert torch.equal(vocab.token_to_code(it["input_ids"][n + 1 : n + 65]), codes[i]["codes"])
        assert (it["labels"][: n + 1] == IGNORE_INDEX).all() and torch.equal(it["labels"][n + 1 :],
                                                                              it["input_ids"][n + 1 :])
    batch = collate_sequences(items[:5], vocab.pad_id)
    lengths = [it["input_ids"].numel() for it in items[:5]]
    assert batch["input_ids"].shape == (5, max(lengths))
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and (batch["input_ids"][row, n:] == vocab.pad_id).all()
    assert [it["dropped"] for it in items[:50]] == [seqs.dropped(2, i) for i in range(50)]  # the item's own draw
    assert torch.equal(seqs[5]["input_ids"], seqs[(0, 5)]["input_ids"]) and seqs[5]["dropped"] == seqs.dropped(0, 5)
    for share, expected in ((0.0, 0), (1.0, 40)):  # the bounds are allowed: never or always unconditional
        ends = CaptionCodeSequences(codes, tokenizer, vocab, caption_dropout=share, seed=7)
        assert sum(ends[(2, i)]["dropped"] for i in range(40)) == expected
    for share in (1.5, -0.1):
        with pytest.raises(ValueError, match="caption_dropout"):
            CaptionCodeSequences(codes, tokenizer, vocab, caption_dropout=share)
    for size in (256, 1024):  # codes of another codebook than the vocabulary's, smaller or larger
        fresh = shapes_world_tokenizer(tmp_path / f"tok{size}")
        other = expand_vocabulary(build_tiny_qwen3(fresh), fresh, size)
        with pytest.raises(ValueError, match=f"codes use 512 codes but the vocabulary has {size}"):
            CaptionCodeSequences(codes, fresh, other)


def test_two_process_zero3_run_then_sample_from_export(tmp_path, lm_dir):
    export_world(tmp_path / "world", 48, image_size=32, seed=0, fmt="shards", shard_size=16, progress=False)
    torch.manual_seed(0)
    VQRAE(get_preset("tiny-p4-32")).save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "train" / "ar_gen.py"), f"data.vqrae={tmp_path / 'tok'}", f"data.codes={tmp_path / 'codes'}",
           f"lm.pretrained={lm_dir}",
           f"data.images={tmp_path / 'world' / 'shards'}", f"run.output_dir={out}", "run.steps=4",
           "run.sample_every=2", "run.ckpt_every=2", "run.log_every=1", "run.tensorboard=false",
           "deepspeed.zero_stage=3", "deepspeed.micro_batch_size=4", "data.extract_batch_size=8"]
    env = trainer_env()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, failure_report(proc)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert (out / "samples" / "step_00000002.png").is_file() and len(CodeDataset(tmp_path / "codes")) == 48
    t2i = TextToImage.from_pretrained(out / "export")
    images, codes = t2i.generate(["a photo of a red circle"] * 2, SamplingConfig(cfg_scale=3.0, seed=1))
    assert images.shape == (2, 3, 32, 32) and codes.shape == (2, 64)
    assert (codes >= 0).all() and (codes < 512).all()
    again, _ = t2i.generate(["a photo of a red circle"] * 2, SamplingConfig(cfg_scale=3.0, seed=1))
    assert torch.equal(images, again)

    # the command lines on the export: generate.py, then geneval.py (shapes detector) with resume and a refused mix
    gen = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), "--model", str(out / "export"),
                          "--prompt", "a photo of a red circle", "-n", "3", "--cfg-scale", "3.0", "--seed", "1",
                          "--out", str(tmp_path / "gen")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert gen.returncode == 0, failure_report(gen)
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["0000.png", "0001.png", "0002.png", "grid.png",
                                                                    "settings.json"]
    assert json.loads((tmp_path / "gen" / "settings.json").read_text())["sampling"]["cfg_scale"] == 3.0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in geneval_prompts()[:3]))
    geneval = [sys.executable, str(REPO / "eval" / "geneval.py"), "--model", str(out / "export"), "--prompts",
               str(prompts), "--detector", "shapes", "-n", "2", "--out", str(tmp_path / "geneval")]
    first = subprocess.run(geneval, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, failure_report(first)
    sample = tmp_path / "geneval" / "00002" / "samples" / "0001.png"
    summary = json.loads((tmp_path / "geneval" / "summary.json").read_text())
    written = sample.stat().st_mtime_ns
    second = subprocess.run(geneval, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, failure_report(second)
    assert sample.stat().st_mtime_ns == written  # finished prompts are kept, not regenerated
    assert json.loads((tmp_path / "geneval" / "summary.json").read_text()) == summary
    mixed = subprocess.run([*geneval, "--cfg-scale", "7.0"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert mixed.returncode == 2 and mixed.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "cfg_scale" in mixed.stderr or "sampling" in mixed.stderr


def test_resume_after_sigkill_is_the_uninterrupted_run(codes_dir, lm_dir, tmp_path):
    """The generator killed after step 4 and run again: every step's loss (caption dropout and data order included)
    and the exported weights of the uninterrupted run."""
    torch.manual_seed(0)
    VQRAE(get_preset("tiny-p4-32")).save_pretrained(tmp_path / "tok")
    assert_resume_is_uninterrupted(REPO / "train" / "ar_gen.py", lambda out: [
        f"lm.pretrained={lm_dir}", f"data.vqrae={tmp_path / 'tok'}", f"data.codes={codes_dir}", "data.images=",
        f"run.output_dir={out}", "run.sample_every=0", "run.tensorboard=false", "deepspeed.micro_batch_size=4",
        "optim.warmup_steps=1"], tmp_path)


def test_pretrained_lm_directory_with_codebook_init_and_chat_template(codes_dir, tmp_path):
    tokenizer = shapes_world_tokenizer(tmp_path / "qwen")
    build_tiny_qwen3(tokenizer, tie_word_embeddings=False).save_pretrained(tmp_path / "qwen")  # a local "Qwen3" dir
    torch.manual_seed(0)
    VQRAE(get_preset("tiny-p4-32")).save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train" / "ar_gen.py"), f"lm.pretrained={tmp_path / 'qwen'}", "lm.init=codebook",
           "lm.template=chat", f"data.vqrae={tmp_path / 'tok'}", f"data.codes={codes_dir}", "data.images=",
           f"run.output_dir={out}",
           "run.steps=2", "run.sample_every=0", "run.tensorboard=false", "deepspeed.micro_batch_size=4"]
    env = trainer_env()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, failure_report(proc)
    t2i = TextToImage.from_pretrained(out / "export")
    assert t2i.fmt.template == "chat" and t2i.vocab.init == "codebook" and not t2i.model.config.tie_word_embeddings
    text_ids = tokenizer("a photo of a circle")["input_ids"]
    assert t2i.tokenizer("a photo of a circle")["input_ids"] == text_ids  # text ids unchanged by the expansion
    images, _ = t2i.generate(["a photo of a circle"], SamplingConfig(cfg_scale=2.0, seed=0))
    assert images.shape == (1, 3, 32, 32)
    bad = subprocess.run([*cmd[:2], f"lm.pretrained={tmp_path / 'missing'}", *cmd[3:]], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "lm.pretrained" in bad.stderr.strip().splitlines()[-1]


def test_captions_that_would_inject_tokens_are_refused_before_training(tmp_path):
    tokenizer = shapes_world_tokenizer(tmp_path / "tok")
    vocab = expand_vocabulary(build_tiny_qwen3(tokenizer), tokenizer, 512)
    rows = [{"index": i, "caption": c} for i, c in enumerate(
        ["a photo of a circle", "a photo of <|img_00012|> squares", "a photo of a square"])]
    write_chunk(tmp_path / "codes", 0, np.zeros((3, 64), np.uint16), rows)
    (tmp_path / "codes" / MANIFEST).write_text(json.dumps({"num_tokens": 64, "codebook_size": 512}))
    with pytest.raises(ConfigError, match=r"row 1 \(dataset index 1\): caption contains the image token string"):
        CaptionCodeSequences(CodeDataset(tmp_path / "codes"), tokenizer, vocab)
    assert CodeDataset(tmp_path / "codes").captions.containing("<|") == [1]


def tiny_text_to_image(tmp_path) -> TextToImage:
    tokenizer = shapes_world_tokenizer(tmp_path / "tok")
    model = build_tiny_qwen3(tokenizer)
    torch.manual_seed(0)
    vqrae = VQRAE(get_preset("tiny-p4-32")).eval()
    vocab = expand_vocabulary(model, tokenizer, vqrae.config.quantizer.codebook_size)
    return TextToImage(model.eval(), tokenizer, vocab, vqrae)


@pytest.mark.parametrize("spec_window", [0, 4])
def test_geneval_resumed_or_rebatched_run_writes_identical_images(tmp_path, spec_window):
    """One code per forward or speculative Jacobi decoding: a run resumed after lost prompts, or batched otherwise,
    writes byte-identical images."""
    from eval.geneval_generation import generate, read_prompts

    t2i = tiny_text_to_image(tmp_path)
    write_geneval_prompts(tmp_path / "prompts.jsonl")
    prompts = read_prompts(tmp_path / "prompts.jsonl")[::60][:5]
    sampling = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=100, seed=42, spec_window=spec_window)
    stats = generate(t2i, prompts, tmp_path / "a", 2, sampling, prompts_per_batch=2, model_name="tiny")
    assert (stats["images"], stats["batches"]) == (10, 3)  # 5 prompts x 2 images in batches of 2 prompts
    if spec_window:  # the prefill, then at most one forward per code of the batch's slowest image
        assert 3 < stats["forwards"] <= 3 * (1 + t2i.num_tokens)
    else:
        assert stats["forwards"] == 3 * t2i.num_tokens
    images = sorted((tmp_path / "a").glob("*/samples/*.png"))
    assert len(images) == 10
    reference = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in images}
    assert len(set(reference.values())) == 10
    for killed in ("00001", "00003", "00004"):  # as if the run had died before these prompts were done
        for p in (tmp_path / "a" / killed).rglob("*"):
            if p.is_file():
                p.unlink()
    assert generate(t2i, prompts, tmp_path / "a", 2, sampling, prompts_per_batch=3, model_name="tiny")["images"] == 6
    generate(t2i, prompts, tmp_path / "b", 2, sampling, prompts_per_batch=5, model_name="tiny")
    for folder in ("a", "b"):
        assert {p.relative_to(tmp_path / folder): p.read_bytes()
                for p in (tmp_path / folder).glob("*/samples/*.png")} == reference, folder
    with pytest.raises(ConfigError, match="other settings"):
        generate(t2i, prompts, tmp_path / "a", 2, SamplingConfig(cfg_scale=3.0, seed=42), 2, "tiny")


def test_geneval_folders_hold_their_prompts_images_and_nothing_a_scorer_would_count_beside_them(tmp_path):
    """A prompt folder is kept only when its metadata is its prompt's and its samples are exactly its n images: one
    with an upstream-named image beside them, or another prompt's metadata, is written again (stray images removed);
    another prompt file into a started folder is refused; a fresh start with fewer images per prompt leaves none of
    the old ones behind."""
    from eval.geneval_generation import generate, read_prompts
    from eval.geneval_scoring import find_prompt_folders

    t2i = tiny_text_to_image(tmp_path)
    write_geneval_prompts(tmp_path / "prompts.jsonl")
    prompts = read_prompts(tmp_path / "prompts.jsonl")[::60][:3]
    sampling = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=100, seed=42)
    out = tmp_path / "a"
    generate(t2i, prompts, out, 2, sampling, prompts_per_batch=3, model_name="tiny")
    reference = {p.relative_to(out): p.read_bytes() for p in out.glob("*/samples/*.png")}
    (out / "00000" / "samples" / "00000.png").write_bytes(reference[Path("00001/samples/0000.png")])  # upstream name
    (out / "00002" / "metadata.jsonl").write_text(json.dumps(prompts[0]) + "\n")
    assert generate(t2i, prompts, out, 2, sampling, prompts_per_batch=3, model_name="tiny")["images"] == 4
    assert {p.relative_to(out): p.read_bytes() for p in out.glob("*/samples/*.png")} == reference
    assert [json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) for i in range(3)] == prompts
    other = [prompts[0], *read_prompts(tmp_path / "prompts.jsonl")[1::60][:2]]  # shares the first prompt
    with pytest.raises(ConfigError, match="prompts"):
        generate(t2i, other, out, 2, sampling, prompts_per_batch=3, model_name="tiny")
    for p in out.glob("*/metadata.jsonl"):  # as if killed before any prompt was finished
        p.unlink()
    generate(t2i, prompts, out, 1, sampling, prompts_per_batch=3, model_name="tiny")
    assert sorted(p.name for p in out.glob("*/samples/*.png")) == ["0000.png"] * 3
    assert all(len(images) == 1 for _, _, images in find_prompt_folders(out))


def test_sample_settings_are_a_sampling_config():
    import yaml

    from common.config import load_config
    from train.ar_gen_trainer import ARGenTrainConfig

    data = yaml.safe_load((REPO / "train" / "configs" / "ar_gen" / "tiny.yaml").read_text())
    cfg = load_config(ARGenTrainConfig, data, ["sample.sampling.top_k=5", "sample.sampling.seed=3"])
    assert cfg.sample.sampling == SamplingConfig(cfg_scale=2.5, temperature=1.0, top_k=5, seed=3)
    with pytest.raises(ConfigError, match="top_k must be a non-negative integer"):
        load_config(ARGenTrainConfig, data, ["sample.sampling.top_k=-2"])


def test_a_pinned_chat_template_survives_the_text_side_and_a_changed_tokenizer_template(tmp_path):
    """A generator trained with template "chat" builds the same prompts after an export whose tokenizer carries
    another chat template (a unified export's LLaVA one): the template is pinned in sequence_format.json."""
    tokenizer = shapes_world_tokenizer(tmp_path / "tok")
    vocab = expand_vocabulary(build_tiny_qwen3(tokenizer), tokenizer, 64)
    fmt = SequenceFormat("chat", "empty").pinned(tokenizer.chat_template)
    assert fmt.chat_template == tokenizer.chat_template and fmt.pinned("other") == fmt  # pinned once
    assert SequenceFormat("plain").pinned("other") == SequenceFormat("plain")  # plain renders no template
    assert SequenceFormat("chat").pinned(None).chat_template == FALLBACK_CHAT
    caption = "a photo of a red circle"
    cond = fmt.prompt_ids(tokenizer, caption)
    assert tokenizer.decode(cond) == f"<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n"
    uncond = fmt.uncond_ids(tokenizer, cond, vocab)
    save_text_side(tmp_path / "side", tokenizer, vocab, fmt)
    loaded_tokenizer, _, loaded = load_text_side(tmp_path / "side")
    loaded_tokenizer.chat_template = "{% for m in messages %}USER: {{ m['content'] }} {% endfor %}ASSISTANT:"
    assert loaded == fmt
    assert loaded.prompt_ids(loaded_tokenizer, caption) == cond
    assert loaded.uncond_ids(loaded_tokenizer, cond, vocab) == uncond
    assert SequenceFormat("chat", "empty").prompt_ids(loaded_tokenizer, caption) != cond  # unpinned: it would move


def test_drawing_commands_name_what_is_wrong_in_the_order_it_is_fixed(tmp_path):
    """GenEval: the model first, then --out, then the detector's folders; --detector auto takes the shapes world's
    detector for the world's prompts and Mask2Former for the official ones; generate.py -n 0 says what -n is."""
    from eval.detection import build_detector
    from eval.geneval_generation import OFFICIAL_PROMPTS, prompt_classes, read_prompts
    from world.detector import ShapesDetector

    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def last_line(*argv: str) -> str:
        proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode != 0
        return proc.stderr.strip().splitlines()[-1]

    geneval = str(REPO / "eval" / "geneval.py")
    assert "no generator export at /nonexistent" in last_line(geneval, "--model", "/nonexistent")
    t2i = tiny_text_to_image(tmp_path)
    (tmp_path / "vq").mkdir()
    t2i.vqrae.save_pretrained(tmp_path / "vq")
    save_generator(tmp_path / "gen", t2i.model, t2i.tokenizer, t2i.vocab, SequenceFormat(), tmp_path / "vq")
    assert "--out is required" in last_line(geneval, "--model", str(tmp_path / "gen"))
    assert "needs --mask2former DIR and --clip DIR" in last_line(geneval, "--model", str(tmp_path / "gen"), "--out",
                                                               str(tmp_path / "out"))
    write_geneval_prompts(tmp_path / "world.jsonl")
    assert isinstance(build_detector("auto", prompt_classes(read_prompts(tmp_path / "world.jsonl"))), ShapesDetector)
    with pytest.raises(FileNotFoundError, match="needs --mask2former"):
        build_detector("auto", prompt_classes(read_prompts(OFFICIAL_PROMPTS)))
    assert "-n (images to sample) must be at least 1, got 0" in last_line(
        str(REPO / "scripts" / "generate.py"), "--model", str(tmp_path / "gen"), "--prompt", "a circle", "-n", "0")
