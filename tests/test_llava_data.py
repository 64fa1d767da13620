"""LLaVA-format conversations: the templates' supervision, image tokens, padding to a square, skipped samples
counted by reason, and training tokens equal to what the processor gives at evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from data.llava import IGNORE_INDEX, ConversationDataset, collate_llava, normalize_turns, read_conversations
from data.shapes import shapes_world_tokenizer
from data.shapes_export import export_llava
from llm.understanding import build_processor
from tokenizer import VQRAE, get_preset


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
    samples = read_conversations(root / "captions.json")
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
    samples = read_conversations(root / "conversations.json")
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


def test_images_are_padded_to_a_square_with_the_mean_colour(world, tmp_path):
    _, processor = world
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "wide.png")
    sample = {"id": "w", "image": "wide.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                {"from": "gpt", "value": "a red bar"}]}
    item = ConversationDataset([sample], tmp_path, processor, 64, "plain")[0]
    square = Image.new("RGB", (40, 40), (128, 128, 128))  # SigLIP's mean 0.5 -> 128
    square.paste(Image.new("RGB", (40, 20), (255, 0, 0)), (0, 10))
    expected = processor.image_processor(images=square, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(item["pixel_values"], expected)


def test_skipped_samples_are_counted_by_reason_and_collation(world, tmp_path):
    root, processor = world
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = read_conversations(root / "conversations.json")[0]
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
    assert batch["skipped"] == 3 and batch["skip_reasons"] == {
        "missing_image": 1, "unreadable_image": 1, "truncated_image": 0, "template_mismatch": 0, "no_answer": 1}
    n = items[1]["input_ids"].numel()
    assert batch["attention_mask"][1].sum() == n and (batch["labels"][1, n:] == IGNORE_INDEX).all()
    short = ConversationDataset(samples[:1], tmp_path, processor, 64, "chat", max_length=40)
    assert short[0]["skipped"] == "truncated_image"  # never cut through the image tokens
    three_turns = {"id": "p", "image": samples[0]["image"], "conversations": good["conversations"][:3]}
    assert ConversationDataset([three_turns], tmp_path, processor, 64, "plain")[0]["skipped"] == "template_mismatch"


def test_reading_and_normalising_conversations(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"id": 1, "image": "a.png", "conversations": [
        {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."}]}]))
    turns = normalize_turns(read_conversations(path)[0])
    assert turns == [("user", "<image>\nWhat is this?"), ("assistant", "A cat.")]  # moved to the start
    path.write_text(json.dumps([{"id": 1, "conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(ValueError, match="sample 0 is not a LLaVA sample"):
        read_conversations(path)


def test_every_question_type_is_sometimes_asked_first(tmp_path):
    export_llava(tmp_path, 60, image_size=32, seed=3, progress=False)
    conversations = read_conversations(tmp_path / "conversations.json")
    questions = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    first = {}
    for q in questions:  # the first question of each image in the conversation is the one with <image>
        first.setdefault(q["image"], None)
    types = {q["text"]: q["type"] for q in questions}
    for c in conversations:
        first[c["image"]] = types[c["conversations"][0]["value"].removeprefix("<image>\n")]
    assert set(first.values()) == {"color", "count", "existence", "position"}
