"""A LLaMA-family LLM with a sentencepiece tokenizer (the Vicuna / LLaMA-2 case, in miniature, trained offline):
vocabulary expansion keeps every text id and round-trips, the prompts and unconditional prompts keep BOS, and the
fused sampler agrees with transformers on it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, LogitsProcessorList

from llm.sampler import CodeRangeLogitsProcessor, CodeSampler, SamplingConfig
from llm.text_tokenizer import GENERIC_TEXTS, train_sentencepiece_tokenizer
from llm.vocab import (
    PAD_FALLBACK,
    build_prompt_ids,
    build_tiny_lm,
    code_token,
    expand_vocabulary,
    image_prefix_ids,
    unconditional_prompt_ids,
)
from world.shapes import world_texts

CAPTIONS = ["a photo of a red circle", "a photo of two squares", "a photo of a circle left of a blue triangle"]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    train_sentencepiece_tokenizer([*world_texts(), *GENERIC_TEXTS], root / "tok")
    return root / "tok"


def test_the_tokenizer_is_sentencepieces_own(spm_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spm_dir)
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    assert type(tok).__name__ == "LlamaTokenizer" and tok.pad_token is None
    for text in [*CAPTIONS, "Zebra ümlaut 42!"]:  # unseen characters go through byte fallback
        assert tok(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)]
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


@pytest.fixture(scope="module")
def expanded(spm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spm_dir)
    before = {t: tok(t)["input_ids"] for t in [*world_texts()[:200], *CAPTIONS]}
    model = build_tiny_lm(tok, "llama", tie_word_embeddings=False)
    rows = model.get_input_embeddings().weight.detach().clone()
    vocab = expand_vocabulary(model, tok, codebook_size=64)
    return tok, model, vocab, before, rows


def test_expansion_keeps_every_text_id_and_round_trips(expanded):
    tok, model, vocab, before, rows = expanded
    assert all(tok(t)["input_ids"] == ids for t, ids in before.items())
    assert torch.equal(model.get_input_embeddings().weight[: len(rows)], rows)
    assert tok.pad_token == PAD_FALLBACK and vocab.pad_id == tok.pad_token_id  # LLaMA has no pad: one is added
    codes = [vocab.code_offset + i for i in range(vocab.codebook_size)]
    assert tok.convert_ids_to_tokens(codes) == [code_token(i, 64) for i in range(64)]
    text = "a photo of a red circle" + "<|image_start|>" + code_token(5, 64) + code_token(63, 64) + "<|image_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[-4:] == [vocab.image_start_id, vocab.code_offset + 5, vocab.code_offset + 63, vocab.image_end_id]
    assert tok.decode(ids) == text


def test_prompts_keep_bos_and_the_unconditional_row_its_length(expanded):
    tok, _, vocab, _, _ = expanded
    prompt = build_prompt_ids(tok, CAPTIONS[0])
    assert prompt[0] == tok.bos_token_id and prompt[1:] == tok(CAPTIONS[0], add_special_tokens=False)["input_ids"]
    uncond = unconditional_prompt_ids(tok, prompt, vocab)
    assert uncond == [tok.bos_token_id] + [vocab.pad_id] * (len(prompt) - 1)
    assert unconditional_prompt_ids(tok, prompt, vocab, "empty") == [tok.bos_token_id]
    assert build_prompt_ids(tok, CAPTIONS[0], "chat") == \
        tok(f"User: {CAPTIONS[0]}\nAssistant:", add_special_tokens=False)["input_ids"]  # no chat template: the fallback


def test_the_fused_sampler_runs_llama_as_transformers_does(expanded):
    tok, model, vocab, _, _ = expanded
    assert isinstance(model, LlamaForCausalLM)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large weights: codes depend on the prompt, greedy margins are clear
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if p.shape[0] == vocab.embedding_rows else 0.5))
    prompts = [build_prompt_ids(tok, c) for c in CAPTIONS]
    greedy = SamplingConfig(cfg_scale=1.0, temperature=0.0)
    ours = CodeSampler(model, vocab).generate(prompts, 16, greedy)
    for prompt, codes in zip(prompts, ours):
        ids = torch.tensor([image_prefix_ids(prompt, vocab)])
        ref = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=vocab.pad_id,
                             logits_processor=LogitsProcessorList([CodeRangeLogitsProcessor(vocab)]))
        assert torch.equal(vocab.token_to_code(ref[0, ids.shape[1] :]), codes)
    sampled = SamplingConfig(cfg_scale=3.0, temperature=1.0, top_k=20, seed=1)
    uncond = [unconditional_prompt_ids(tok, p, vocab) for p in prompts]
    fused = CodeSampler(model, vocab).generate(prompts, 16, sampled, uncond_ids=uncond)
    hf = CodeSampler(model, vocab).generate(prompts, 16, SamplingConfig(cfg_scale=3.0, temperature=1.0, top_k=20, seed=1,
                                                                    backend="hf"), uncond_ids=uncond)
    assert torch.equal(fused, hf) and len({tuple(c.tolist()) for c in ours}) == len(prompts)


# ----- understanding with a sentencepiece LLM: LLaVA-1.5's vicuna_v1 format ---------------------------------------


@pytest.fixture(scope="module")
def vicuna(tmp_path_factory):
    """A tiny LLaMA with a sentencepiece tokenizer of the world's texts and the Vicuna prompt words, saved as a local
    LLM directory, and the shapes world's LLaVA data."""
    from llm.understanding import VICUNA_SYSTEM
    from world.export import export_llava
    from world.lm import lm_tokenizer_corpus

    root = tmp_path_factory.mktemp("vicuna")
    tok = train_sentencepiece_tokenizer([*lm_tokenizer_corpus(), VICUNA_SYSTEM, "USER: ASSISTANT:"], root / "llm")
    build_tiny_lm(tok, "llama", seed=0).save_pretrained(root / "llm")
    export_llava(root / "world", 24, image_size=32, seed=0, progress=False)
    return root


def vicuna_v1(turns: list[tuple[str, str]], generation_prompt: bool) -> str:
    """LLaVA's conv_vicuna_v1 rendering (SeparatorStyle.TWO, sep " ", sep2 "</s>"), written from its rules."""
    from llm.understanding import VICUNA_SYSTEM

    seps = (" ", "</s>")
    text = VICUNA_SYSTEM + seps[0]  # no "<s>": LLaVA's tokenizer_image_token adds the BOS
    for i, (role, message) in enumerate(turns):
        text += ("USER" if role == "user" else "ASSISTANT") + ": " + message + seps[i % 2]
    return text + ("ASSISTANT:" if generation_prompt else "")


def test_understanding_with_a_sentencepiece_llm_uses_vicuna_v1(vicuna):
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from data.llava import IGNORE_INDEX, ConversationDataset, normalize_turns, read_conversations
    from llm.understanding import answer, build_llava, end_of_turn_id, renders_bos, save_llava, user_turn
    from tokenizer import VQRAE, get_preset

    tok = AutoTokenizer.from_pretrained(vicuna / "llm")
    torch.manual_seed(0)
    model, processor = build_llava(VQRAE(get_preset("tiny-p4-32")), LlamaForCausalLM.from_pretrained(vicuna / "llm"),
                                   tok)
    assert tok.pad_token == tok.unk_token  # LLaVA's choice for Vicuna
    assert end_of_turn_id(processor) == tok.eos_token_id
    samples = read_conversations(vicuna / "world" / "llava_conversations.json")
    turns = normalize_turns(samples[0])
    assert len(turns) >= 4
    assert processor.apply_chat_template([{"role": r, "content": t} for r, t in turns],
                                         tokenize=False) == vicuna_v1(turns, False)
    # training supervises each answer and its </s>, nothing else
    item = ConversationDataset(samples, vicuna / "world", processor, num_image_tokens=64, template="chat")[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # one BOS, the tokenizer's
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    answers = [t for r, t in turns if r == "assistant"]
    assert [tok.decode(r).strip() for r in runs] == [a + "</s>" for a in answers]
    # LLaVA's preprocess_v1 masks each round's instruction up to "ASSISTANT:" (its length less the BOS and the lone
    # "▁" that " ASSISTANT: " ends in): a lone "▁" before an answer that does not merge with it ("▁" "2") is trained
    starts = [k for k in range(1, len(ids)) if labels[k] != IGNORE_INDEX and labels[k - 1] == IGNORE_INDEX]
    assert [tok.convert_ids_to_tokens(ids[k - 1]) for k in starts] == [":"] * len(answers)
    assert any(tok.convert_ids_to_tokens(ids[k]) == "▁" for k in starts)  # the case this holds
    # the evaluation prompt is the training prefix, one BOS, by the standard recipe (lmms-eval's llava_hf)
    question = turns[0][1].removeprefix("<image>\n")
    text = processor.apply_chat_template([user_turn(question, True)], add_generation_prompt=True, tokenize=False)
    assert text == vicuna_v1([turns[0]], True) and not renders_bos(tok, [text])
    from PIL import Image

    image = Image.open(vicuna / "world" / samples[0]["image"]).convert("RGB")
    prompt = list(processor(images=[image], text=[text])["input_ids"][0])
    assert prompt[0] == tok.bos_token_id and prompt[1] != tok.bos_token_id
    assert ids[: len(prompt)] == list(prompt)
    # stage 1 "plain" is LLaVA's preprocess_plain: the BOS, the image alone (the human text dropped), caption + "\n"
    sample = read_conversations(vicuna / "world" / "llava_captions.json")[0]
    sample["conversations"][0]["value"] = "Describe the image briefly.\n<image>"
    plain = ConversationDataset([sample], vicuna / "world", processor, num_image_tokens=64, template="plain")[0]
    caption = tok(sample["conversations"][1]["value"] + "\n", add_special_tokens=False)["input_ids"]
    assert plain["input_ids"].tolist() == [tok.bos_token_id, *[processor.image_token_id] * 64, *caption]
    assert plain["labels"].tolist() == [IGNORE_INDEX] * 65 + caption
    assert list(processor(images=[image], text=["<image>"])["input_ids"][0]) == plain["input_ids"].tolist()[:65]
    # the export loads in transformers alone, with the format, and answers the same
    save_llava(model, processor, vicuna / "export")
    loaded = LlavaForConditionalGeneration.from_pretrained(vicuna / "export").eval()
    again = AutoProcessor.from_pretrained(vicuna / "export")
    assert again.chat_template == processor.chat_template
    assert answer(loaded, again, [image], [question]) == answer(model, processor, [image], [question])


def test_the_understanding_trainer_runs_a_sentencepiece_llm(vicuna, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoProcessor

    from tokenizer import VQRAE, get_preset

    repo = Path(__file__).resolve().parents[1]
    torch.manual_seed(0)
    VQRAE(get_preset("tiny-p4-32")).save_pretrained(tmp_path / "tok")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(repo / "train" / "understanding.py"), f"model.vqrae={tmp_path / 'tok'}",
         f"model.lm_pretrained={vicuna / 'llm'}", f"run.output_dir={tmp_path / 'run'}",
         f"data.image_root={vicuna / 'world'}", f"data.conversations={vicuna / 'world' / 'llava_conversations.json'}",
         "data.template=chat", "run.steps=2", "deepspeed.micro_batch_size=4",
         "run.log_every=1", "run.tensorboard=false"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["examples"] == 4 and r["answer_tokens"] > 0 for r in rows)
    processor = AutoProcessor.from_pretrained(tmp_path / "run" / "export")
    assert processor.chat_template.startswith("A chat between")  # the BOS is the tokenizer's (llava-hf)


def test_a_tokenizer_with_no_chat_format_is_refused_in_one_line(spm_dir):
    from transformers import AutoTokenizer

    from common.config import ConfigError
    from llm.understanding import chat_format

    tok = AutoTokenizer.from_pretrained(spm_dir)
    assert chat_format(tok).name == "vicuna_v1"
    with pytest.raises(ConfigError, match="chatml format needs the tokens"):
        chat_format(tok, "chatml")
    tok.bos_token = None
    with pytest.raises(ConfigError, match="vicuna_v1 format needs a tokenizer with BOS and EOS"):
        chat_format(tok)
