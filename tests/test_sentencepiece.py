"""A LLaMA-family LLM with a sentencepiece tokenizer (the Vicuna / LLaMA-2 case, in miniature, trained offline):
vocabulary expansion keeps every text id and round-trips, the prompts and unconditional prompts keep BOS, and the
fused sampler agrees with transformers on it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, LogitsProcessorList

from data.shapes import world_texts
from llm.sampler import CodeRangeLogitsProcessor, Engine, SamplingConfig
from llm.text_tokenizer import GENERIC_TEXTS, train_sentencepiece_tokenizer
from llm.vocab import (
    FALLBACK_CHAT,
    PAD_FALLBACK,
    build_prompt_ids,
    build_tiny_lm,
    code_token,
    expand_vocabulary,
    image_prefix_ids,
    unconditional_prompt_ids,
)

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
        tok(FALLBACK_CHAT.format(caption=CAPTIONS[0]), add_special_tokens=False)["input_ids"]  # no chat template


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
    ours = Engine(model, vocab).generate(prompts, 16, greedy)
    for prompt, codes in zip(prompts, ours):
        ids = torch.tensor([image_prefix_ids(prompt, vocab)])
        ref = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=vocab.pad_id,
                             logits_processor=LogitsProcessorList([CodeRangeLogitsProcessor(vocab)]))
        assert torch.equal(vocab.token_to_code(ref[0, ids.shape[1] :]), codes)
    sampled = SamplingConfig(cfg_scale=3.0, temperature=1.0, top_k=20, seed=1)
    uncond = [unconditional_prompt_ids(tok, p, vocab) for p in prompts]
    fused = Engine(model, vocab).generate(prompts, 16, sampled, uncond_ids=uncond)
    hf = Engine(model, vocab).generate(prompts, 16, SamplingConfig(cfg_scale=3.0, temperature=1.0, top_k=20, seed=1,
                                                                    backend="hf"), uncond_ids=uncond)
    assert torch.equal(fused, hf) and len({tuple(c.tolist()) for c in ours}) == len(prompts)
