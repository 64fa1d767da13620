"""The unified model (llm/unified.py, data/mix.py, train/unified.py): one LLaVA model with the codes in its
vocabulary answers and draws; its export loads in transformers alone and in the project's sampler; training mixes
both tasks at the configured share from an understanding export or a generator export, with LoRA and ZeRO-3."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from data.codes import CHUNK_SIZE, ensure_manifest, write_chunk
from data.mix import ShardTaskMix, TaskMix
from data.transforms import ImageTransform, to_rgb
from llm.generator import SequenceFormat, save_generator
from llm.pipeline import TextToImage
from llm.sampler import CodeSampler, SamplingConfig
from llm.understanding import build_llava, load_llava
from llm.unified import expand_llava, is_unified_export, language_model_view, load_unified, save_unified
from llm.vocab import build_prompt_ids, build_tiny_qwen3, expand_vocabulary
from tests.helpers import assert_resume_is_uninterrupted, failure_report, free_port, trainer_env
from tokenizer import VQRAE, get_preset
from train.unified_trainer import per_token_losses
from world.export import LLAVA_CAPTIONS, LLAVA_CONVERSATIONS, export_llava
from world.shapes import shapes_world_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "unified.py"
UND = REPO / "train" / "understanding.py"


# ----------------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny VQRAE (saved), a tiny LLaVA on it with the codes in its vocabulary, and the vocabulary."""
    root = tmp_path_factory.mktemp("unified")
    torch.manual_seed(0)
    vqrae = VQRAE(get_preset("tiny")).eval()
    vqrae.save_pretrained(root / "vq")
    tokenizer = shapes_world_tokenizer(root / "tok")
    lm = build_tiny_qwen3(tokenizer, seed=3)
    llava, processor = build_llava(vqrae, lm, tokenizer)
    text_ids = processor.tokenizer("a photo of a red circle")["input_ids"]
    vocab = expand_llava(llava, processor, vqrae)
    return root, vqrae, llava, processor, vocab, text_ids


def test_expansion_keeps_text_ids_and_the_image_token_apart_from_the_codes(parts):
    root, vqrae, llava, processor, vocab, text_ids = parts
    assert processor.tokenizer("a photo of a red circle")["input_ids"] == text_ids
    assert not vocab.is_code(torch.tensor(processor.image_token_id))
    assert vocab.codebook_size == vqrae.config.quantizer.codebook_size
    assert llava.get_input_embeddings().weight.shape[0] == vocab.embedding_rows >= vocab.code_end
    assert llava.config.text_config.vocab_size == vocab.embedding_rows


def test_the_language_model_view_shares_the_tensors_and_computes_the_same(parts):
    root, vqrae, llava, processor, vocab, _ = parts
    view = language_model_view(llava)
    mine = {p.data_ptr() for p in view.parameters()}
    assert mine <= {p.data_ptr() for p in llava.parameters()}  # no copy
    ids = torch.tensor([build_prompt_ids(processor.tokenizer, "a photo of two squares") + [vocab.image_start_id]])
    with torch.no_grad():
        assert torch.allclose(view(input_ids=ids).logits, llava(input_ids=ids).logits, atol=0, rtol=0)


def test_drawing_equals_a_standalone_copy_of_its_language_model(parts):
    """The sampler on the view draws exactly what it draws on an independent causal LM holding the same weights."""
    root, vqrae, llava, processor, vocab, _ = parts
    tokenizer = shapes_world_tokenizer(root / "tok2")
    copy = build_tiny_qwen3(tokenizer, seed=5)
    expand_vocabulary(copy, tokenizer, vocab.codebook_size)
    body = {k.removeprefix("model.language_model."): v for k, v in llava.state_dict().items()
            if k.startswith("model.language_model.")}
    copy.model.load_state_dict(body, strict=True)
    copy.lm_head.weight.data.copy_(llava.lm_head.weight)
    prompts = [build_prompt_ids(processor.tokenizer, p) for p in ("a photo of a red circle", "a photo of a cube")]
    for backend in ("fused", "hf"):
        settings = SamplingConfig(cfg_scale=1.0, temperature=1.0, seed=4, backend=backend)
        mine = CodeSampler(language_model_view(llava), vocab).generate(prompts, 12, settings)
        theirs = CodeSampler(copy.eval(), vocab).generate(prompts, 12, settings)
        assert torch.equal(mine, theirs), backend


def test_export_loads_in_transformers_alone_and_draws_in_the_pipeline(parts, tmp_path):
    root, vqrae, llava, processor, vocab, _ = parts
    save_unified(tmp_path / "u", llava, processor, vocab, SequenceFormat("plain", "pad"), root / "vq")
    assert is_unified_export(tmp_path / "u") and not is_unified_export(root / "vq")
    alone = LlavaForConditionalGeneration.from_pretrained(tmp_path / "u").eval()
    for k, v in llava.state_dict().items():
        assert torch.equal(alone.state_dict()[k], v), k
    model, loaded_processor = load_llava(tmp_path / "u")
    assert loaded_processor.image_token_id == processor.image_token_id
    unified = load_unified(tmp_path / "u")
    assert unified.vocab == vocab and unified.fmt == SequenceFormat("plain", "pad")
    t2i = TextToImage.from_pretrained(tmp_path / "u")  # what eval/geneval.py and the chat call
    images, codes = t2i.generate(["a photo of a red circle"] * 2, SamplingConfig(cfg_scale=2.0, seed=1))
    size = vqrae.config.encoder.image_size
    assert images.shape == (2, 3, size, size) and codes.shape == (2, vqrae.config.num_tokens)
    assert torch.equal(images, vqrae.decode(codes).clamp(-1, 1))


@pytest.mark.parametrize("tied", [True, False])
def test_lora_trains_the_image_token_rows_of_embeddings_and_head(tmp_path, tied):
    from train.understanding_trainer import LoraSection, UnderstandingModelConfig, UnderstandingTrainConfig, freeze

    torch.manual_seed(0)
    vqrae = VQRAE(get_preset("tiny")).eval()
    tokenizer = shapes_world_tokenizer(tmp_path / "tok")
    llava, processor = build_llava(vqrae, build_tiny_qwen3(tokenizer, tie_word_embeddings=tied), tokenizer)
    vocab = expand_llava(llava, processor, vqrae)
    cfg = UnderstandingTrainConfig(stage=2, model=UnderstandingModelConfig(init_from="x"),
                                   lora=LoraSection(enabled=True, r=4))
    ids = [vocab.image_start_id, *range(*vocab.code_range)]
    model, _ = freeze(llava, cfg, ids)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    embed = "base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    head = "base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"
    assert embed in trained and "base_model.model.model.multi_modal_projector.linear_1.weight" in trained
    assert (head in trained) == (not tied)  # a tied head shares the embedding's rows
    with pytest.raises(ValueError, match="peft adapters"):  # the fused decode step would skip the adapters
        CodeSampler(language_model_view(model.get_base_model()), vocab).generate([[3, 4]], 2, SamplingConfig(cfg_scale=1.0))
    x = torch.tensor([[ids[5], 3, ids[9]]])
    model(input_ids=x, labels=x).loss.backward()
    delta = dict(model.named_parameters())[head if not tied else embed]
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_images_as_codes_are_the_vqrae_codes_in_the_image_tokens_places(parts):
    from llm.understanding import _model_inputs, user_turn
    from llm.unified import UnifiedModel, codes_in_place, image_codes

    root, vqrae, llava, processor, vocab, _ = parts
    size = vqrae.config.encoder.image_size
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8))
              for i in range(2)]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    signed = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for im in images])
    assert torch.equal(image_codes(vqrae, processor, pixels), vqrae.encode(signed).indices)
    text = processor.apply_chat_template([user_turn("How many circles?", True)], add_generation_prompt=True,
                                         tokenize=False)
    inputs = dict(processor(images=images, text=[text, text], return_tensors="pt"))
    codes = image_codes(vqrae, processor, inputs["pixel_values"])
    swapped = codes_in_place(inputs, codes, vocab, processor.image_token_id)
    assert "pixel_values" not in swapped
    for row in range(2):
        slots = inputs["input_ids"][row] == processor.image_token_id
        assert torch.equal(vocab.token_to_code(swapped["input_ids"][row][slots]), codes[row])
        assert torch.equal(swapped["input_ids"][row][~slots], inputs["input_ids"][row][~slots])
    unified = UnifiedModel(llava, processor, vocab, SequenceFormat(image_input="codes"), vqrae)
    hooked = _model_inputs(llava, processor, [text, text], images, unified.inputs_hook())  # what answer / reply feed
    assert "pixel_values" not in hooked and torch.equal(hooked["input_ids"], swapped["input_ids"])
    assert unified.inputs_hook()({"input_ids": swapped["input_ids"]}) == {"input_ids": swapped["input_ids"]}
    features = dataclasses.replace(unified, fmt=SequenceFormat())
    assert features.inputs_hook() is None


def test_a_blank_image_row_leaves_the_loss_as_it_was(parts):
    from train.understanding_trainer import with_blank_image

    root, vqrae, llava, processor, vocab, _ = parts
    ids = torch.randint(0, 400, (2, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    inputs["attention_mask"][1, 5:] = 0
    inputs["labels"][1, 5:] = -100
    size = vqrae.config.encoder.image_size
    grown = with_blank_image(inputs, processor.image_token_id, vqrae.config.num_tokens,
                             processor.tokenizer.pad_token_id, size, torch.float32)
    assert grown["input_ids"].shape == (3, max(7, vqrae.config.num_tokens)) and grown["pixel_values"].shape[0] == 1
    assert (grown["labels"][2] == -100).all()
    with torch.no_grad():
        assert torch.allclose(llava(**grown).loss, llava(**inputs).loss, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- the mix


class Items(torch.utils.data.Dataset):
    def __init__(self, name: str, n: int):
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        return {"item": (self.name, key[1]), "epoch": key[0]}


def test_task_mix_share_no_repeats_and_coverage():
    mix = TaskMix(Items("und", 30), Items("gen", 100), 0.75)
    assert len(mix) == 120 and mix.counts == {"gen": 90, "und": 30}
    seen = []
    for epoch in range(3):
        items = [mix[(epoch, i)] for i in range(len(mix))]
        assert sum(it["task"] == "gen" for it in items) == 90
        names = [it["item"] for it in items]
        assert len(set(names)) == len(names)  # nothing twice within an epoch
        assert all(it["task"] == it["item"][0] and it["epoch"] == epoch for it in items)
        # the epoch's slice of each dataset, in order: 90 sequences from epoch * 90 on (cyclically), then every
        # conversation
        assert names == [("gen", (epoch * 90 + k) % 100) for k in range(90)] + [("und", k) for k in range(30)]
        seen += names
    assert {n for n in seen if n[0] == "gen"} == {("gen", i) for i in range(100)}  # later epochs take the rest
    assert mix[7] == mix[(0, 7)] and mix[100] == mix[(0, 100)]  # a bare index is epoch 0's
    for share in (1.0, 0.0, -0.25, 1.5):
        with pytest.raises(ValueError, match="in \\(0, 1\\)"):
            TaskMix(Items("und", 3), Items("gen", 3), share)
    for und, gen in ((0, 3), (3, 0)):
        with pytest.raises(ValueError, match="both tasks need samples"):
            TaskMix(Items("und", und), Items("gen", gen), 0.5)
    for index in (-1, len(mix), len(mix) + 3):
        with pytest.raises(IndexError, match="outside the mix"):
            mix.locate(0, index)
    odd = TaskMix(Items("und", 10), Items("gen", 9), 0.4)  # 6 sequences, then the 10 conversations in order
    assert [odd[(0, i)]["item"] for i in range(len(odd))] == [("gen", k) for k in range(6)] + [
        ("und", k) for k in range(10)]


class ShardItems(Items):
    """Conversations in shards of these lengths, as ShardConversationDataset exposes them."""

    def __init__(self, lengths: list[int]):
        super().__init__("und", sum(lengths))
        self.shard_lengths, self.window, self.options, self.announced = lengths, 2, None, []

    def read_ahead(self, shards):
        self.announced.append(shards)

    def __getitems__(self, keys):
        return [self[k] for k in keys]


def test_shard_task_mix_keeps_shards_whole_and_mixes_each_at_the_share():
    from train.data_order import ShardLocalBatchSampler

    lengths = [8, 4, 12, 8, 4, 12]
    und = ShardItems(lengths)
    mix = ShardTaskMix(und, Items("gen", 200), 0.75)  # three sequences per conversation
    assert mix.shard_lengths == [4 * n for n in lengths] and mix.counts == {"und": 48, "gen": 144}
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    seen = []
    for epoch in range(3):
        items = mix.__getitems__([(epoch, i) for i in range(len(mix))])
        names = [it["item"] for it in items]
        assert len(set(names)) == len(names) and sum(it["task"] == "und" for it in items) == 48
        assert all(it["task"] == it["item"][0] and it["epoch"] == epoch for it in items)
        start = 0
        for s, n in enumerate(mix.shard_lengths):  # mix shard s: conversation shard s whole, then its sequences
            assert {it["item"][1] for it in items[start:start + n] if it["task"] == "und"} == set(
                range(bounds[s], bounds[s + 1]))
            start += n
        assert [mix[(epoch, i)] for i in (0, 40, len(mix) - 1)] == [items[0], items[40], items[-1]]
        # in order: the conversations shard after shard, the sequences the epoch's slice from epoch * 144 on
        assert [n for n in names if n[0] == "und"] == [("und", k) for k in range(48)]
        assert [n for n in names if n[0] == "gen"] == [("gen", (epoch * 144 + k) % 200) for k in range(144)]
        seen += names
    assert {n for n in seen if n[0] == "gen"} == {("gen", i) for i in range(200)}  # later epochs take the rest
    assert mix.__getitems__([3, 20]) == mix.__getitems__([(0, 3), (0, 20)]) and mix[20] == mix[(0, 20)]  # epoch 0
    for index in (-1, len(mix), len(mix) + 3):
        with pytest.raises(IndexError, match="outside the mix"):
            mix.locate(0, index)
    ranks = [list(zip(range(6), ShardLocalBatchSampler(mix.shard_lengths, mix.window, 8, r, 2, 0,
                                                         read_ahead=mix.read_ahead))) for r in range(2)]
    conversations = [{mix.locate(*key)[1] for _, batch in rank for key in batch if mix.locate(*key)[0] == "und"}
                     for rank in ranks]
    shards = [{int(np.searchsorted(bounds, c, side="right")) - 1 for c in rank} for rank in conversations]
    assert not shards[0] & shards[1] and und.announced  # whole conversation shards per rank; read-ahead reaches them
    with pytest.raises(ValueError, match="needs 144 caption -> codes sequences, there are 100"):
        ShardTaskMix(und, Items("gen", 100), 0.75)
    assert len(ShardTaskMix(und, Items("gen", 144), 0.75)) == 192  # exactly enough for one pass


def test_per_token_losses_are_transformers_causal_lm_loss(parts):
    root, vqrae, llava, processor, vocab, _ = parts
    ids = torch.randint(0, 400, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 6:] = -100
    with torch.no_grad():
        out = llava(input_ids=ids, labels=labels)
    losses, targets = per_token_losses(out.logits, labels)
    mask = targets != -100
    assert torch.allclose(losses.sum() / mask.sum(), out.loss, rtol=1e-5)
    assert (losses[~mask] == 0).all()


# ----------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def world(tmp_path_factory, lm_dir) -> Path:
    """A tiny tokenizer, the shapes world as LLaVA data, its images' codes, a stage-1 understanding run."""
    root = tmp_path_factory.mktemp("unified-train")
    (root / "lm").symlink_to(lm_dir)
    torch.manual_seed(0)
    vqrae = VQRAE(get_preset("tiny-p4-32")).eval()
    vqrae.save_pretrained(root / "tok")
    export_llava(root / "world", 64, image_size=32, seed=0, progress=False)
    samples = json.loads((root / "world" / LLAVA_CAPTIONS).read_text())
    transform = ImageTransform(32, "center")
    pixels = torch.stack([transform(to_rgb(Image.open(root / "world" / s["image"]))) for s in samples])
    with torch.no_grad():
        codes = vqrae.encode(pixels).indices.numpy().astype(np.uint16)
    rows = [{"index": i, "caption": s["conversations"][1]["value"]} for i, s in enumerate(samples)]
    (root / "codes").mkdir()
    ensure_manifest(root / "codes", root / "tok", vqrae.config, "world", len(rows))
    write_chunk(root / "codes", 0, codes, rows)
    assert len(rows) <= CHUNK_SIZE
    run(UND, *common(root, root / "s1"), f"data.conversations={root / 'world' / LLAVA_CAPTIONS}", "run.steps=3")
    return root


def common(root: Path, out: Path) -> list[str]:
    return [f"model.vqrae={root / 'tok'}", f"model.lm_pretrained={root / 'lm'}", f"run.output_dir={out}",
            f"data.image_root={root / 'world'}", "deepspeed.micro_batch_size=8", "run.log_every=1",
            "run.tensorboard=false", "optim.warmup_steps=1"]


def unified_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [*common(root, out), f"data.conversations={root / 'world' / LLAVA_CONVERSATIONS}",
            f"generation.codes={root / 'codes'}", "run.ckpt_every=0", *extra]


def run(script: Path, *argv: str, launcher: list[str] | None = None, check: bool = True
        ) -> subprocess.CompletedProcess:
    env = trainer_env()
    proc = subprocess.run([*(launcher or [sys.executable]), str(script), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed: {failure_report(proc)}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_is_the_uninterrupted_run(world, tmp_path):
    """The unified model (the two tasks' mix) killed after step 4 and run again: every step's loss and the exported
    weights of the uninterrupted run."""
    assert_resume_is_uninterrupted(SCRIPT, lambda out: unified_args(world, out, f"model.init_from={world / 's1'}"),
                                   tmp_path)


def test_unified_from_an_understanding_export(world):
    out = world / "u1"
    run(SCRIPT, *unified_args(world, out, f"model.init_from={world / 's1'}", "run.steps=4", "generation.ratio=0.5",
                              "run.sample_every=2"))
    assert (out / "samples" / "step_00000002.png").is_file() and (out / "samples" / "step_00000004.png").is_file()
    rows = metrics(out)
    assert len(rows) == 4
    for r in rows:  # every step's batch holds both tasks' tokens, each task's loss logged apart
        assert r["tokens_und"] > 0 and r["tokens_gen"] > 0 and np.isfinite(r["loss_und"]) and np.isfinite(
            r["loss_gen"])
        assert r["loss"] == pytest.approx(r["loss_und"] + r["loss_gen"], rel=1e-5)  # the two task means
    tokens = world / "u-tokens"
    run(SCRIPT, *unified_args(world, tokens, f"model.init_from={world / 's1'}", "run.steps=1", "generation.ratio=0.5",
                              "generation.loss=token_mean"))
    r = metrics(tokens)[0]
    total = r["tokens_und"] + r["tokens_gen"]
    assert r["loss"] == pytest.approx((r["loss_und"] * r["tokens_und"] + r["loss_gen"] * r["tokens_gen"]) / total,
                                      rel=1e-5)
    assert r["loss_und"] == pytest.approx(rows[0]["loss_und"], rel=1e-5)  # the same first batch either way
    unified = load_unified(out / "export")
    start, _ = load_llava(world / "s1" / "export")
    before, after = start.state_dict(), unified.llava.state_dict()
    tower = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(before[tower], after[tower])  # the tower stays frozen
    rows_in = after["model.language_model.embed_tokens.weight"]
    start_rows = before["model.language_model.embed_tokens.weight"]
    lo, hi = unified.vocab.code_range
    assert not torch.equal(rows_in[lo:hi], rows_in[lo].expand(hi - lo, -1))  # code rows learned apart from the mean
    assert not torch.equal(rows_in[: start_rows.shape[0]], start_rows)  # and the LLM trained
    images, _ = unified.text_to_image().generate(["a photo of a circle"], SamplingConfig(cfg_scale=3.0))
    assert images.shape[-1] == 32


def test_unified_from_llava_shards_mixes_shard_by_shard(world, tmp_path):
    from data.llava import read_conversations, write_llava_shards

    samples = read_conversations(world / "world" / LLAVA_CONVERSATIONS)[:16]
    write_llava_shards(samples, world / "world", tmp_path / "shards", shard_size=4, progress=False)
    out = tmp_path / "run"
    proc = run(SCRIPT, *unified_args(world, out, f"model.init_from={world / 's1'}", f"data.train={tmp_path / 'shards'}",
                                     "data.conversations=/nonexistent.json", "data.shards.window=1",
                                     "generation.ratio=0.5", "run.steps=4"))
    assert "mixed 16 + 16 a pass" in proc.stderr + proc.stdout
    rows = metrics(out)
    assert sum(r["examples"] for r in rows) == 32  # one pass: 4 mix shards of 4 conversations + 4 sequences
    assert all(np.isfinite(r["loss_und"]) and np.isfinite(r["loss_gen"]) for r in rows)
    assert is_unified_export(out / "export")


def test_unified_from_a_generator_export_keeps_its_format_and_vqrae(world, tmp_path):
    config = json.loads((world / "s1" / "export" / "config.json").read_text())["text_config"]
    tokenizer = shapes_world_tokenizer(tmp_path / "tok")
    lm = build_tiny_qwen3(tokenizer, seed=1, **{k: config[k] for k in ("hidden_size", "num_hidden_layers",
                                                                           "num_attention_heads", "head_dim",
                                                                           "num_key_value_heads",
                                                                           "intermediate_size")})
    vqrae = VQRAE.from_pretrained(world / "tok")
    vocab = expand_vocabulary(lm, tokenizer, vqrae.config.quantizer.codebook_size)
    # trained with template "chat" on a chat template other than the one the LLaVA export will carry
    tokenizer.chat_template = "{% for m in messages %}USER: {{ m['content'] }} {% endfor %}ASSISTANT:"
    fmt = SequenceFormat("chat", "empty").pinned(tokenizer.chat_template)
    captions = ["a photo of a red circle", "a photo of two squares"]
    trained = [(fmt.prompt_ids(tokenizer, c), fmt.uncond_ids(tokenizer, fmt.prompt_ids(tokenizer, c), vocab))
               for c in captions]
    save_generator(tmp_path / "gen", lm, tokenizer, vocab, fmt, world / "tok")
    projector = world / "s1" / "checkpoints" / "step_00000003" / "projector.safetensors"
    out = tmp_path / "u"
    refused = run(SCRIPT, *unified_args(world, out, "model.init_from=",
                                        f"generation.generator={tmp_path / 'gen'}", f"model.projector={projector}",
                                        "generation.uncond=pad"), check=False)
    assert refused.returncode == 2 and "trained with 'empty'" in refused.stderr.strip().splitlines()[-1]
    # half conversations: the projector gets gradients in both steps (the CPU default's 0.93 share may give none)
    run(SCRIPT, *unified_args(world, out, "model.init_from=", f"generation.generator={tmp_path / 'gen'}",
                              f"model.projector={projector}", "run.steps=2", "generation.ratio=0.5"))
    unified = load_unified(out / "export")
    assert unified.fmt == fmt and unified.vocab.code_range == vocab.code_range
    assert unified.processor.tokenizer.chat_template != tokenizer.chat_template  # the export's is LLaVA's
    cond, uncond = TextToImage.from_pretrained(out / "export").prompt_rows(captions)
    assert list(zip(cond, uncond)) == trained  # the prompts it was trained on, conditional and unconditional
    from safetensors.torch import load_file

    start = load_file(str(projector))
    moved = unified.llava.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(start[k], moved[k]) for k in start)  # from the projector file, then trained


def test_unified_lora_trains_the_code_rows_and_merges(world):
    out = world / "lora"
    run(SCRIPT, *unified_args(world, out, f"model.init_from={world / 's1'}", "run.steps=3", "lora.enabled=true",
                              "lora.r=4", "lora.alpha=8", "run.sample_every=3"))
    with Image.open(out / "samples" / "step_00000003.png") as grid:  # drawn through the adapters (hf backend)
        assert min(grid.size) >= 128
    start, _ = load_llava(world / "s1" / "export")
    unified = load_unified(out / "export")
    embed = unified.llava.get_input_embeddings().weight
    lo, hi = unified.vocab.code_range
    text = start.get_input_embeddings().weight
    assert torch.equal(embed[: text.shape[0]], text)  # text rows as they were (LoRA leaves them)
    assert not torch.equal(embed[lo:hi], embed[lo].expand(hi - lo, -1))  # the code rows trained
    down = "model.language_model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(unified.llava.state_dict()[down], start.state_dict()[down])  # adapters merged


def test_understanding_from_codes_alone(world, tmp_path):
    out = world / "codes"
    run(SCRIPT, *unified_args(world, out, f"model.init_from={world / 's1'}", "run.steps=2", "generation.ratio=0",
                              "generation.codes=", "image_input=codes"))
    assert all(r["tokens_gen"] == 0 and r["tokens_und"] > 0 for r in metrics(out))
    unified = load_unified(out / "export")
    assert unified.fmt.image_input == "codes"
    start, _ = load_llava(world / "s1" / "export")
    for k, v in start.model.multi_modal_projector.state_dict().items():  # never used, never moved
        assert torch.equal(unified.llava.model.multi_modal_projector.state_dict()[k], v), k
    lo, hi = unified.vocab.code_range
    rows = unified.llava.get_input_embeddings().weight
    assert not torch.equal(rows[lo:hi], rows[lo].expand(hi - lo, -1))  # the code embeddings learned
    questions = world / "world" / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": s["image"], "text": "How many circles?",
                                             "answer": "1", "type": "count"}) + "\n"
                                 for i, s in enumerate(json.loads((world / "world" / LLAVA_CAPTIONS).read_text())[:4])))
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "understanding.py"), "--model", str(out / "export"),
                           "--questions", str(questions), "--out", str(tmp_path / "eval"), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((tmp_path / "eval" / "answers.jsonl").read_text().splitlines()) == 4


def test_unified_zero3_matches_zero2(world):
    two, three = world / "z2", world / "z3"
    for out, stage in ((two, 2), (three, 3)):
        run(SCRIPT, *unified_args(world, out, f"model.init_from={world / 's1'}", "run.steps=2",
                                  f"deepspeed.zero_stage={stage}"))
    a, b = metrics(two), metrics(three)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)


def test_two_process_zero3_with_batches_lacking_images(world):
    """2 ranks of 4 samples, 90% of them captions: most micro-batches hold no image, so a rank must run the tower
    (gathered collectively under ZeRO-3) on a dummy while the other runs it on its images."""
    out = world / "z3-2"
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port())]
    run(SCRIPT, *unified_args(world, out, f"model.init_from={world / 's1'}", "run.steps=3", "deepspeed.zero_stage=3",
                              "deepspeed.micro_batch_size=4", "generation.ratio=0.9"), launcher=launcher)
    assert any(r["tokens_und"] == 0 for r in metrics(out))  # rank 0 met a batch without conversations
    unified = load_unified(out / "export")
    images, _ = unified.text_to_image().generate(["a photo of a circle"], SamplingConfig(cfg_scale=3.0))
    assert images.shape[-1] == 32


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny-und-codes.yaml", "qwen3.yaml"])
def test_the_shipped_configs_parse(name):
    from train.config import parse_config
    from train.unified_trainer import CONFIG_DIR, UnifiedTrainConfig

    cfg = parse_config(UnifiedTrainConfig, ["--config", str(CONFIG_DIR / name)], CONFIG_DIR / "tiny.yaml", "")
    assert cfg.stage == 2 and (cfg.generation.codes or cfg.generation.ratio == 0)


@pytest.mark.parametrize("extra, message", [
    (["model.init_from=X", "generation.generator=Y"], "set exactly one"),
    (["model.init_from=", "generation.generator=Y"], "needs model.projector"),
    (["model.init_from=X", "generation.ratio=1"], "generation.ratio must be in [0, 1)"),
    (["model.init_from=X", "image_input=pixels"], "image_input must be one of"),
    (["model.init_from=X", "image_input=codes", "model.train_tower=true"], "the tower never runs on codes"),
])
def test_config_errors_are_one_line(tmp_path, extra, message):
    proc = run(SCRIPT, f"run.output_dir={tmp_path / 'o'}", "generation.codes=C", *extra, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()

