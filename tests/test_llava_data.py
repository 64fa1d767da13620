"""LLaVA-format conversations: the templates' supervision, image tokens, padding to a square, skipped samples
counted by reason, and training tokens equal to what the processor gives at evaluation."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, SiglipImageProcessor

from common.config import ConfigError
from data.llava import (
    IGNORE_INDEX,
    ConversationDataset,
    ShardConversationDataset,
    collate_llava,
    normalize_turns,
    read_conversations,
    write_llava_shards,
)
from data.serve import ShardServer
from data.shard_cache import ShardOptions
from data.shards import write_index
from data.tar_files import write_tar_shard
from llm.understanding import _model_inputs, build_processor, mean_color
from tokenizer import VQRAE, get_preset
from world.export import LLAVA_CAPTIONS, LLAVA_CONVERSATIONS, export_llava
from world.shapes import shapes_world_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-world")
    export_llava(root, 6, image_size=64, seed=2, progress=False)
    tokenizer = shapes_world_tokenizer(root / "tok")
    torch.manual_seed(0)
    processor = build_processor(VQRAE(get_preset("tiny")), tokenizer)
    return root, processor


def supervised_text(processor, item) -> str:
    return processor.tokenizer.decode([t for t in item["labels"].tolist() if t != IGNORE_INDEX])


def test_plain_template_supervises_only_the_caption(world):
    root, processor = world
    samples = read_conversations(root / LLAVA_CAPTIONS)
    data = ConversationDataset(samples, root, processor, num_image_tokens=64, template="plain")
    item = data[0]
    image_id = processor.image_token_id
    ids = item["input_ids"].tolist()
    assert ids[:64] == [image_id] * 64 and image_id not in ids[64:]
    caption = samples[0]["conversations"][1]["value"]
    assert supervised_text(processor, item) == caption + "\n"
    assert (item["labels"][:64] == IGNORE_INDEX).all()
    expected = processor.image_processor(images=Image.open(root / samples[0]["image"]).convert("RGB"),
                                         return_tensors="pt")["pixel_values"][0]
    assert torch.equal(item["pixel_values"], expected)  # square images: exactly the processor's pixels


def test_chat_template_supervises_every_answer_and_matches_evaluation(world):
    root, processor = world
    samples = read_conversations(root / LLAVA_CONVERSATIONS)
    data = ConversationDataset(samples, root, processor, num_image_tokens=64, template="chat")
    item = data[1]
    answers = [t["value"] for t in samples[1]["conversations"] if t["from"] == "gpt"]
    assert len(answers) >= 3  # multi-turn
    assert supervised_text(processor, item) == "".join(a + "<|im_end|>" for a in answers)
    # the prompt of the first turn is token for token what the processor builds for evaluation
    question = samples[1]["conversations"][0]["value"].removeprefix("<image>\n")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": question}]}],
                                         add_generation_prompt=True, tokenize=False)
    image = Image.open(root / samples[1]["image"]).convert("RGB")
    evaluation = processor(images=[image], text=[text], return_tensors="pt")
    prompt = evaluation["input_ids"][0].tolist()
    assert item["input_ids"][: len(prompt)].tolist() == prompt
    assert torch.equal(item["pixel_values"], evaluation["pixel_values"][0])


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square, written from its code: the image centred on a square of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


@pytest.mark.parametrize("size", [(41, 20), (20, 45), (64, 64), (16, 16)])
def test_every_path_pads_images_to_a_square_as_llava_does(world, tmp_path, size):
    """Training, answering (answer / caption / reply: the chat and the web demo) and the exported processor alone
    (a transformers user, lmms-eval's llava_hf) give the pixels of LLaVA's expand2square, filled with its int() mean
    colour, then SigLIP's resize and normalisation."""
    _, processor = world
    image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    image.save(tmp_path / "x.png")
    fill = tuple(int(m * 255) for m in processor.image_processor.image_mean)
    assert fill == mean_color(processor) == (127, 127, 127)  # SigLIP's 0.5: LLaVA truncates, never rounds to 128
    side = processor.image_processor.size["height"]
    siglip = SiglipImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    reference = siglip(images=expand2square(image, fill), return_tensors="pt")["pixel_values"][0]
    sample = {"id": "x", "image": "x.png", "conversations": [{"from": "human", "value": "<image>"},
                                                             {"from": "gpt", "value": "noise"}]}
    assert torch.equal(ConversationDataset([sample], tmp_path, processor, 64, "plain")[0]["pixel_values"], reference)
    assert torch.equal(_model_inputs(torch.nn.Linear(1, 1), processor, ["<image>"], [image])["pixel_values"][0],
                       reference)
    processor.save_pretrained(tmp_path / "export")
    alone = AutoProcessor.from_pretrained(tmp_path / "export")
    assert torch.equal(alone(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"][0], reference)


def test_skipped_samples_are_counted_by_reason_and_collation(world, tmp_path):
    root, processor = world
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = read_conversations(root / LLAVA_CONVERSATIONS)[0]
    samples = [
        {**good, "image": str(root / good["image"])},
        {"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
        {"id": "gone", "image": "nowhere.png", "conversations": good["conversations"]},
        {"id": "bad", "image": "bad.png", "conversations": good["conversations"]},
        {"id": "q", "conversations": [{"from": "human", "value": "No answer follows."}]},
    ]
    data = ConversationDataset(samples, tmp_path, processor, 64, "chat", max_length=2048)
    items = [data[i] for i in range(len(samples))]
    assert [it.get("skipped") for it in items] == [None, None, "missing_image", "unreadable_image", "no_answer"]
    assert items[1]["pixel_values"] is None and processor.image_token_id not in items[1]["input_ids"].tolist()
    batch = collate_llava(items, pad_id=processor.tokenizer.pad_token_id)
    assert batch["examples"] == 2 and batch["pixel_values"].shape == (1, 3, 64, 64)
    assert batch["skipped"] == 2 and batch["skip_reasons"] == {  # skipped: the images; the reasons: every sample
        "missing_image": 1, "unreadable_image": 1, "truncated_image": 0, "template_mismatch": 0, "no_answer": 1,
        "bad_sample": 0}
    n = items[1]["input_ids"].numel()
    assert batch["attention_mask"][1].sum() == n and (batch["labels"][1, n:] == IGNORE_INDEX).all()
    short = ConversationDataset(samples[:1], tmp_path, processor, 64, "chat", max_length=40)
    assert short[0]["skipped"] == "truncated_image"  # never cut through the image tokens
    three_turns = {"id": "p", "image": samples[0]["image"], "conversations": good["conversations"][:3]}
    assert ConversationDataset([three_turns], tmp_path, processor, 64, "plain")[0]["skipped"] == "template_mismatch"
    # what LLaVA cannot train exactly either: an image named in two turns, a text-only sample naming an image
    twice = {"id": "t", "image": samples[0]["image"], "conversations": [
        {"from": "human", "value": "<image>\nA?"}, {"from": "gpt", "value": "B"},
        {"from": "human", "value": "<image>\nC?"}, {"from": "gpt", "value": "D"}]}
    text_only = {"id": "u", "conversations": [{"from": "human", "value": "<image>\nA?"}, {"from": "gpt", "value": "B"}]}
    dataset = ConversationDataset([twice, text_only], tmp_path, processor, 64, "chat")
    assert [dataset[i].get("skipped") for i in range(2)] == ["bad_sample", "bad_sample"]


def test_reading_and_normalising_conversations(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"id": 1, "image": "a.png", "conversations": [
        {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."}]}]))
    turns = normalize_turns(read_conversations(path)[0])
    assert turns == [("user", "<image>\nWhat is this?"), ("assistant", "A cat.")]  # moved to the start
    # LLaVA's preprocess_multimodal and its dataset: a turn of the placeholder alone is "<image>" (stripped), turns
    # without it are kept as written, a conversation opening with the assistant loses that turn
    sample = {"id": 2, "image": "a.png", "conversations": [
        {"from": "gpt", "value": "Hello."}, {"from": "human", "value": " <image> "}, {"from": "gpt", "value": "Hi."},
        {"from": "human", "value": " And now? "}, {"from": "gpt", "value": "Yes."}]}
    assert normalize_turns(sample) == [("user", "<image>"), ("assistant", "Hi."), ("user", " And now? "),
                                       ("assistant", "Yes.")]
    unnamed = {"id": 3, "image": "a.png", "conversations": [{"from": "human", "value": "Why?"},
                                                            {"from": "gpt", "value": "No."}]}
    assert normalize_turns(unnamed)[0] == ("user", "<image>\nWhy?")
    path.write_text(json.dumps([{"id": 1, "conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(ValueError, match="sample 0 is not a LLaVA sample"):
        read_conversations(path)


def test_every_question_type_is_sometimes_asked_first_in_both_forms(tmp_path):
    from llm.understanding import SHORT_ANSWER

    export_llava(tmp_path, 60, image_size=32, seed=3, progress=False)
    conversations = read_conversations(tmp_path / LLAVA_CONVERSATIONS)
    questions = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert all(q["text"].endswith(SHORT_ANSWER) for q in questions)  # evaluation: always LLaVA's short-answer prompt
    types = {q["text"].removesuffix(SHORT_ANSWER): q["type"] for q in questions}
    first = {True: set(), False: set()}  # short-answer form -> types asked first (the turn with <image>)
    for c in conversations:
        asked = [t["value"].removeprefix("<image>\n") for t in c["conversations"][::2]]
        short = asked[0].endswith(SHORT_ANSWER)
        assert all(q.endswith(SHORT_ANSWER) == short for q in asked)  # one form per conversation
        first[short].add(types[asked[0].removesuffix(SHORT_ANSWER)])
    assert first[True] == first[False] == {"color", "count", "existence", "position"}


def test_llava_shards_give_the_same_items_locally_and_over_http(world, tmp_path):
    root, processor = world
    samples = read_conversations(root / LLAVA_CONVERSATIONS)  # 6 samples with images
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}
    gone = {**samples[0], "id": "gone", "image": "images/nowhere.png"}
    mixed = [*samples[:3], text_only, gone, *samples[3:]]
    counts = write_llava_shards(mixed, root, tmp_path / "shards", shard_size=4, progress=False)
    assert counts == {"shards": 2, "samples": 7, "text_only": 1, "missing": 1}
    kept = [s for s in mixed if s is not gone]  # the text-only sample in its place, the fourth
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.tar")}
    write_llava_shards(mixed, root, tmp_path / "shards", shard_size=4, progress=False)  # a rerun keeps the shards
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.tar")} == before
    with pytest.raises(ConfigError, match="samples"):
        write_llava_shards(samples[:2], root, tmp_path / "shards", shard_size=4, progress=False)
    for template, source in (("chat", LLAVA_CONVERSATIONS), ("plain", LLAVA_CAPTIONS)):
        if template == "plain":
            write_llava_shards(read_conversations(root / source), root, tmp_path / "plain", shard_size=4,
                               progress=False)
        folder = tmp_path / ("shards" if template == "chat" else "plain")
        given = kept if template == "chat" else read_conversations(root / source)
        reference = ConversationDataset(given, root, processor, 64, template)
        lengths = [4, 3] if template == "chat" else [4, 2]
        with ShardServer(folder) as server:
            options = ShardOptions(cache_dir=str(tmp_path / f"cache-{template}"), window=1)
            for spec in (folder, f"{server.url}/shardindex.json"):
                shards = ShardConversationDataset(spec, processor, 64, template, options=options)
                assert len(shards) == len(given) and shards.shard_lengths == lengths
                items = shards.__getitems__(list(range(len(given))))
                for want, got in zip((reference[i] for i in range(len(given))), items):
                    assert torch.equal(got["input_ids"], want["input_ids"])
                    assert torch.equal(got["labels"], want["labels"])
                    assert got["id"] == want["id"]
                    if want["pixel_values"] is None:  # the text-only conversation
                        assert got["pixel_values"] is None and want["id"] == "t"
                    else:
                        assert torch.equal(got["pixel_values"], want["pixel_values"])
                copy = pickle.loads(pickle.dumps(shards))  # what a spawned DataLoader worker receives
                assert torch.equal(copy[5]["input_ids"], reference[5]["input_ids"])


def test_a_shard_sample_that_is_not_llava_is_skipped_and_counted(world, tmp_path):
    root, processor = world
    png = (root / read_conversations(root / LLAVA_CONVERSATIONS)[0]["image"]).read_bytes()
    write_tar_shard(tmp_path / "000000.tar", [("a.png", png), ("a.json", b'{"id": "a", "conversations": []}'),
                                              ("b.png", png), ("b.json", b'{"conversations": [{"from": "human", '
                                                                         b'"value": "Hi?"}, {"from": "gpt", '
                                                                         b'"value": "yes"}]}')])
    write_index([str(tmp_path / "000000.tar")], tmp_path / "shardindex.json")
    data = ShardConversationDataset(tmp_path, processor, 64, "chat")
    items = [data[0], data[1]]
    assert items[0] == {"skipped": "bad_sample", "id": "a"}
    assert items[1]["id"] == "b" and processor.image_token_id in items[1]["input_ids"].tolist()  # image first
    assert collate_llava(items, processor.tokenizer.pad_token_id)["skip_reasons"]["bad_sample"] == 1


def test_a_shard_sample_whose_json_names_an_image_it_lacks_is_skipped_as_missing(world, tmp_path):
    root, processor = world
    turns = [{"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "yes"}]
    write_tar_shard(tmp_path / "000000.tar", [
        ("a.json", json.dumps({"id": "a", "image": "a.png", "conversations": turns}).encode()),
        ("b.json", json.dumps({"id": "b", "conversations": [{"from": "human", "value": "Hi?"}, turns[1]]}).encode())])
    write_index([str(tmp_path / "000000.tar")], tmp_path / "shardindex.json")
    data = ShardConversationDataset(tmp_path, processor, 64, "chat")
    assert data[0] == {"skipped": "missing_image", "id": "a"}
    assert data[1]["pixel_values"] is None and processor.image_token_id not in data[1]["input_ids"].tolist()


def test_chatml_renders_conversations_as_qwens_template_does(world):
    """Qwen2.5 / Qwen3's rendering of a system-less conversation, written out: every turn "<|im_start|>ROLE\\n" +
    text + "<|im_end|>\\n" (the newline after each end of turn included), then the generation prompt."""
    _, processor = world
    messages = [{"role": "user", "content": "Is there a circle?"}, {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "What color is it?"}]
    qwen = ("<|im_start|>user\nIs there a circle?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
            "<|im_start|>user\nWhat color is it?<|im_end|>\n<|im_start|>assistant\n")
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == qwen
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a circle?"}]}]
    assert processor.apply_chat_template(with_image, add_generation_prompt=True, tokenize=False) == \
        "<|im_start|>user\n<image>\nIs there a circle?<|im_end|>\n<|im_start|>assistant\n"
