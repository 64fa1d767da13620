"""Sampler: the sampling math against independent computations, and the CodeSampler against transformers' own forward and
generate on a tiny random Qwen3."""

import argparse
import copy
import dataclasses
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import LogitsProcessorList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from llm.fused import attended_columns
from llm.sampler import (
    BACKENDS,
    PRESETS,
    CodeRangeLogitsProcessor,
    CodeSampler,
    SamplingConfig,
    add_sampling_arguments,
    apply_cfg,
    generate_codes,
    image_uniforms,
    inverse_cdf,
    restrict_to_codes,
    sample_codes,
    sampling_from_arguments,
    top_k_mask,
    top_p_mask,
)
from llm.speculative import verify
from llm.vocab import (
    ImageVocab,
    build_prompt_ids,
    build_tiny_qwen3,
    expand_vocabulary,
    image_prefix_ids,
    unconditional_prompt_ids,
)
from tests.helpers import run_fresh_process
from world.shapes import shapes_world_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a photo of a red square", "a photo of three circles", "a photo of a circle",
            "a photo of a purple triangle below a green square"]
N = 24  # codes per test image


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is all per-op overhead: one intra-op thread is faster, and immune to the spin-waiting of
    OpenMP threads on a busy machine (which made these tests 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An untied tiny Qwen3 with large random weights, so that codes depend on the prompt and greedy choices have
    clear margins; prompts of different lengths."""
    tok = shapes_world_tokenizer(tmp_path_factory.mktemp("tok") / "shapes")
    model = build_tiny_qwen3(tok, tie_word_embeddings=False)
    vocab = expand_vocabulary(model, tok, codebook_size=128)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if p.shape[0] == vocab.embedding_rows else 0.5))
    prompts = [build_prompt_ids(tok, c) for c in CAPTIONS]
    assert len({len(p) for p in prompts}) > 1
    uncond = [unconditional_prompt_ids(tok, p, vocab) for p in prompts]
    return tok, model, vocab, prompts, uncond


def greedy(**kw) -> SamplingConfig:
    return SamplingConfig(cfg_scale=1.0, temperature=0.0, **kw)


def full_forward_code_logits(model, vocab, prompt, codes) -> torch.Tensor:
    """Reference: one no-cache transformers forward over prompt + <start> + codes[:-1]; (N, K) code logits."""
    ids = torch.tensor([image_prefix_ids(prompt, vocab) + (codes[:-1] + vocab.code_offset).tolist()])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    return restrict_to_codes(logits[-len(codes) :], vocab)


# ----------------------------------------------------------------------------------------------- math


def test_apply_cfg_matches_the_formula():
    cond, uncond = torch.randn(3, 50), torch.randn(3, 50)
    for s in (0.0, 1.0, 1.5, 5.0, 7.5):
        expected = uncond.double() + s * (cond.double() - uncond.double())
        assert torch.allclose(apply_cfg(cond, uncond, s).double(), expected, atol=1e-5)
    assert torch.allclose(apply_cfg(cond, uncond, 1.0), cond, atol=1e-6)


def _rank_top_k(row: list[float], k: int) -> list[bool]:
    """Independent rule: keep an entry when fewer than k entries are strictly larger."""
    return [sum(o > x for o in row) < k for x in row]


def test_top_k_mask_against_rank_rule_and_transformers():
    for row, k in [([1, 3, 3, 2], 1), ([1, 3, 3, 2], 2), ([1, 3, 3, 2], 3), ([5, 4, 4, 4, 1], 2),
                   ([2, 2, 2], 1), ([0, -math.inf, 1, -math.inf], 2)]:
        assert top_k_mask(torch.tensor([row]), k)[0].tolist() == _rank_top_k(row, k), (row, k)
    x = torch.randn(6, 40)
    for k in (1, 5, 39):
        ours = x.masked_fill(~top_k_mask(x, k), -math.inf)
        assert torch.equal(ours, TopKLogitsWarper(k)(None, x.clone()))
        assert (top_k_mask(x, k).sum(-1) == k).all()
    assert top_k_mask(x, 0).all() and top_k_mask(x, 40).all() and top_k_mask(x, 1000).all()
    assert top_k_mask(x, -1).all()  # k <= 0 is off
    assert torch.equal(top_k_mask(x.view(2, 3, 40), 5), top_k_mask(x, 5).view(2, 3, 40))  # along the last dim


def _smallest_nucleus(probs: list[float], p: float) -> list[bool]:
    """Independent rule (distinct probabilities): the shortest prefix of the sorted order reaching p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, total = set(), 0.0
    for i in order:
        keep.add(i)
        total += probs[i]
        if total >= p:
            break
    return [i in keep for i in range(len(probs))]


def test_top_p_mask_against_smallest_set_rule_and_transformers():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen) * 2
    probs = x.double().softmax(-1)
    for p in (0.05, 0.3, 0.5, 0.9, 0.99):
        ours = top_p_mask(x, p)
        hf = TopPLogitsWarper(p)(None, x.clone()) > -math.inf
        for r in range(len(x)):
            cum = probs[r].sort(descending=True).values.cumsum(0)
            if (cum - p).abs().min() < 1e-5:
                continue  # p on a boundary: float rounding may decide
            assert ours[r].tolist() == _smallest_nucleus(probs[r].tolist(), p)
            assert ours[r].tolist() == hf[r].tolist()
    # ties are kept or dropped together; the argmax is always kept; p = 1 keeps everything
    tied = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    assert top_p_mask(tied, 0.6)[0].tolist() == [True, True, True, False]  # probs .58 .21 .21 .08
    assert top_p_mask(tied, 1e-9)[0].tolist() == [True, False, False, False]
    assert top_p_mask(torch.tensor([[1.0, 1.0, 0.0]]), 1e-9)[0].tolist() == [True, True, False]
    assert top_p_mask(x, 1.0).all()
    assert torch.equal(top_p_mask(x, 0.0), top_k_mask(x, 1))  # the argmax alone, even at p = 0
    halves = torch.tensor([[0.0, -math.log(2), -math.log(2)]])  # probabilities exactly 1/2, 1/4, 1/4
    assert top_p_mask(halves, 0.5)[0].tolist() == [True, False, False]  # the argmax reaches p = 1/2 exactly
    # p = 1 keeps even the codes whose probability float32 rounds away (the mass before them reads exactly 1)
    assert top_p_mask(torch.tensor([[0.0, -30.0, -60.0, -90.0]]), 1.0).all()
    assert torch.equal(top_p_mask(x.view(20, 10, 12), 0.5), top_p_mask(x, 0.5).view(20, 10, 12))  # the last dim


def test_restrict_to_codes():
    vocab = ImageVocab(codebook_size=4, code_offset=6, image_start_id=4, image_end_id=5, pad_id=0,
                       text_vocab_size=4, embedding_rows=16)
    logits = torch.arange(32.0).view(2, 16)
    assert restrict_to_codes(logits, vocab).tolist() == [[6, 7, 8, 9], [22, 23, 24, 25]]
    for short in (logits[:, :8], logits[None, :, :8]):  # (R, V) or (B, N, V)
        with pytest.raises(ValueError, match="logits have 8 columns, fewer than the code range end 10"):
            restrict_to_codes(short, vocab)
    assert restrict_to_codes(logits[:, :10], vocab).tolist() == [[6, 7, 8, 9], [22, 23, 24, 25]]  # exactly enough
    assert torch.equal(restrict_to_codes(logits.expand(3, 2, 16), vocab), logits[:, 6:10].expand(3, 2, 4))  # (B, N, V)


def test_sample_codes_distribution_support_and_streams():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(40000, -1)
    uniforms = torch.from_numpy(image_uniforms(0, range(len(logits)), 1)[:, 0])
    cfg = SamplingConfig(temperature=1.0)
    draws = sample_codes(logits, cfg, uniforms)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert (freq - logits[0].double().softmax(-1)).abs().max() < 0.01
    hot = sample_codes(logits, SamplingConfig(temperature=2.0), uniforms)
    freq_hot = torch.bincount(hot, minlength=5).double() / len(hot)
    assert (freq_hot - (logits[0].double() / 2).softmax(-1)).abs().max() < 0.01
    top2 = sample_codes(logits, SamplingConfig(top_k=2), uniforms)
    assert set(top2.tolist()) == {0, 1}
    for k in (5, 1000):  # k at or above the number of codes keeps them all
        assert torch.equal(sample_codes(logits, SamplingConfig(top_k=k), uniforms), draws)
    nucleus = sample_codes(logits, SamplingConfig(top_p=0.6), uniforms)
    assert set(nucleus.tolist()) == {0, 1}  # p(0) = 0.53 < 0.6 <= p(0) + p(1)
    assert (sample_codes(logits, SamplingConfig(temperature=0.0), None) == 0).all()
    # the inverse CDF: u below p(0) draws code 0, just above it code 1, the largest u the last code
    p0 = float(logits[0].softmax(-1)[0])
    edge = torch.tensor([p0 - 1e-6, p0 + 1e-6, 1 - 2**-33], dtype=torch.float64)
    assert sample_codes(logits[:3], cfg, edge).tolist() == [0, 1, 4]


def test_image_streams_depend_only_on_seed_and_image():
    table = image_uniforms(5, [3, 11, 7], 40)
    assert table.shape == (3, 40) and (table > 0).all() and (table < 1).all()
    assert np.array_equal(image_uniforms(5, [11], 40)[0], table[1])  # the same row alone
    assert np.array_equal(image_uniforms(5, [7, 3], 40), table[[2, 0]])  # in another batch order
    assert not np.array_equal(image_uniforms(6, [3], 40)[0], table[0])
    assert not np.array_equal(table[0], table[1])
    with pytest.raises(ValueError, match="image ids must be non-negative, got -1"):
        image_uniforms(5, [-1], 4)


def test_image_streams_are_the_documented_draws():
    """Row r is (k + 1/2) / 2^32 for the 32-bit integers k of SeedSequence((0x1A6E5, seed, image)): the midpoints of
    2^32 equal cells, never 0 or 1; images drawn with an earlier release keep their codes."""
    for seed, image in ((0, 0), (5, 3), (2**40, 123456)):
        k = np.random.default_rng(np.random.SeedSequence((0x1A6E5, seed, image))).integers(0, 2**32, size=64,
                                                                                          dtype=np.uint64)
        np.testing.assert_array_equal(image_uniforms(seed, [image], 64)[0], (k + 0.5) / 2**32)


def test_sampling_config_validation_and_record():
    cfg = SamplingConfig(cfg_scale=7.5, temperature=0.9, top_k=1000, top_p=0.95, seed=3)
    record = cfg.to_dict()
    assert set(record) == {"cfg_scale", "temperature", "top_k", "top_p", "seed", "backend", "cuda_graph", "compile",
                           "spec_window", "spec_init"}
    assert SamplingConfig(**record) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):  # a config recorded with outputs cannot change afterwards
        cfg.seed = 4
    llamagen = PRESETS["llamagen"]  # LlamaGen's sample_t2i.py: cfg 7.5, temperature 1, top-k 1000, top-p 1
    assert (llamagen.cfg_scale, llamagen.temperature, llamagen.top_k, llamagen.top_p) == (7.5, 1.0, 1000, 1.0)
    janus = PRESETS["janus"]  # Janus's generation script: cfg_weight 5, temperature 1, neither top-k nor top-p
    assert (janus.cfg_scale, janus.temperature, janus.top_k, janus.top_p) == (5.0, 1.0, 0, 1.0)
    assert (PRESETS["greedy"].cfg_scale, PRESETS["greedy"].temperature) == (1.0, 0.0)
    assert SamplingConfig().to_dict() == {"cfg_scale": 5.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0,
                                          "backend": "fused", "cuda_graph": True, "compile": False,
                                          "spec_window": 0, "spec_init": "uniform"}  # Janus's
    for bad in ({"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": -0.5}, {"top_p": 1.5},
                {"backend": "vllm"}, {"cfg_scale": float("nan")}, {"temperature": float("nan")},
                {"temperature": float("inf")}, {"top_k": 2.0}, {"top_k": True}, {"top_p": float("nan")},
                {"seed": -1}, {"seed": 1.5}, {"spec_window": -1}, {"spec_window": 2.0}, {"spec_window": True},
                {"spec_init": "zeros"}, {"spec_window": 4, "compile": True}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


# ----------------------------------------------------------------------------------------------- sampler


def test_greedy_matches_transformers_generate(setup):
    """CFG off + greedy == transformers generate(do_sample=False) restricted to codes, token for token; and the
    restriction matters: on this model unrestricted greedy decoding leaves the code range."""
    _, model, vocab, prompts, _ = setup
    sampler = CodeSampler(model, vocab)
    ours = sampler.generate(prompts, N, greedy())
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        saved = head[: vocab.text_vocab_size].clone()
        head[: vocab.text_vocab_size] *= 3  # text tokens now win unrestricted argmax
        try:
            for prompt in prompts:
                ids = torch.tensor([image_prefix_ids(prompt, vocab)])
                kwargs = {"max_new_tokens": N, "do_sample": False, "pad_token_id": vocab.pad_id}
                restricted = model.generate(ids, logits_processor=LogitsProcessorList(
                    [CodeRangeLogitsProcessor(vocab)]), **kwargs)[0, ids.shape[1] :]
                free = model.generate(ids, **kwargs)[0, ids.shape[1] :]
                assert not vocab.is_code(free).all()
                assert torch.equal(vocab.token_to_code(restricted), sampler.generate([prompt], N, greedy())[0])
        finally:
            head[: vocab.text_vocab_size] = saved
    # and on the unmodified model both agree with the codes sampled above
    for prompt, codes in zip(prompts, ours):
        ids = torch.tensor([image_prefix_ids(prompt, vocab)])
        ref = model.generate(ids, max_new_tokens=N, do_sample=False, pad_token_id=vocab.pad_id,
                             logits_processor=LogitsProcessorList([CodeRangeLogitsProcessor(vocab)]))
        assert torch.equal(vocab.token_to_code(ref[0, ids.shape[1] :]), codes)
    assert len({tuple(c.tolist()) for c in ours}) == len(prompts)  # the codes depend on the prompt


@pytest.mark.parametrize("backend", ["fused", "hf"])
def test_cached_step_logits_equal_a_full_forward(setup, backend):
    """Left-padded batch, KV cache, sampled trajectory: every step's code logits equal one no-cache forward of
    transformers over that row's own (unpadded) sequence."""
    _, model, vocab, prompts, _ = setup
    cfg = SamplingConfig(cfg_scale=1.0, temperature=1.0, top_k=50, seed=1, backend=backend)
    codes, logits = CodeSampler(model, vocab).generate(prompts, N, cfg, return_logits=True)
    assert logits.shape == (len(prompts), N, vocab.codebook_size)
    for prompt, row_codes, row_logits in zip(prompts, codes, logits):
        ref = full_forward_code_logits(model, vocab, prompt, row_codes)
        assert torch.allclose(row_logits.double(), ref, atol=1e-3 * ref.abs().max().item())


def test_cfg_logits_equal_guidance_of_two_full_forwards(setup):
    _, model, vocab, prompts, uncond = setup
    scale = 4.0
    cfg = SamplingConfig(cfg_scale=scale, temperature=1.0, top_p=0.9, seed=2)
    codes, guided = CodeSampler(model, vocab).generate(prompts, N, cfg, uncond_ids=uncond, return_logits=True)
    for i in range(len(prompts)):
        c = full_forward_code_logits(model, vocab, prompts[i], codes[i])
        u = full_forward_code_logits(model, vocab, uncond[i], codes[i])
        expected = u + scale * (c - u)
        assert torch.allclose(guided[i].double(), expected, atol=2e-3 * expected.abs().max().item())


def test_batched_equals_one_by_one_and_backends_agree(setup):
    _, model, vocab, prompts, uncond = setup
    sampler = CodeSampler(model, vocab)
    batched = sampler.generate(prompts, N, greedy())
    for i, prompt in enumerate(prompts):
        assert torch.equal(sampler.generate([prompt], N, greedy())[0], batched[i])
    assert torch.equal(CodeSampler(model, vocab).generate(prompts, N, greedy(backend="hf")), batched)
    guided = SamplingConfig(cfg_scale=3.0, temperature=0.0)
    both = sampler.generate(prompts, N, guided, uncond_ids=uncond)
    single = sampler.generate(prompts[1:2], N, guided, uncond_ids=uncond[1:2])
    assert torch.equal(both[1], single[0])
    assert not torch.equal(both, batched)  # guidance changes the codes


def test_sdpa_attention_path_matches_matmul_path(setup):
    """The SDPA path (used on GPUs) and the explicit-matmul path (CPU) of the fused decoder agree."""
    _, model, vocab, prompts, uncond = setup
    cfg = SamplingConfig(cfg_scale=2.0, temperature=1.0, seed=4)
    sampler = CodeSampler(model, vocab)
    codes, logits = sampler.generate(prompts, N, cfg, uncond_ids=uncond, return_logits=True)
    sampler.decoder.matmul_attention = False
    sdpa_codes, sdpa_logits = sampler.generate(prompts, N, cfg, uncond_ids=uncond, return_logits=True)
    assert not sampler.decoder.matmul_attention  # the same decoder was used
    assert torch.equal(sdpa_codes, codes)
    assert torch.allclose(sdpa_logits, logits, atol=1e-4 * logits.abs().max().item())


def test_seeds_reproducible(setup):
    _, model, vocab, prompts, uncond = setup
    sampler = CodeSampler(model, vocab)
    cfg = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=64, top_p=0.95, seed=7)
    a = sampler.generate(prompts, N, cfg, uncond_ids=uncond)
    b = generate_codes(model, vocab, prompts, N, cfg, uncond_ids=uncond)  # a fresh sampler
    c = sampler.generate(prompts, N, SamplingConfig(**{**cfg.to_dict(), "seed": 8}), uncond_ids=uncond)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.long and a.min() >= 0 and a.max() < vocab.codebook_size


def test_sampler_follows_weight_updates(setup):
    """A reused CodeSampler notices an in-place weight change (a training step) and samples from the new weights."""
    _, model, vocab, prompts, _ = setup
    sampler = CodeSampler(model, vocab)
    before = sampler.generate(prompts, N, greedy())
    qkv = model.model.layers[0].self_attn.q_proj.weight
    saved = qkv.detach().clone()
    with torch.no_grad():
        qkv.mul_(-1.5)
    try:
        after = sampler.generate(prompts, N, greedy())
        assert torch.equal(after, CodeSampler(model, vocab).generate(prompts, N, greedy()))
        assert not torch.equal(after, before)
    finally:
        with torch.no_grad():
            qkv.copy_(saved)
    assert torch.equal(sampler.generate(prompts, N, greedy()), before)


def test_sampler_input_errors(setup):
    _, model, vocab, prompts, uncond = setup
    sampler = CodeSampler(model, vocab)
    with pytest.raises(ValueError, match="unconditional"):
        sampler.generate(prompts, N, SamplingConfig(cfg_scale=5.0))
    with pytest.raises(ValueError, match="unconditional"):
        sampler.generate(prompts, N, SamplingConfig(cfg_scale=5.0), uncond_ids=uncond[:1])
    with pytest.raises(ValueError, match="unconditional"):
        sampler.generate(prompts, N, SamplingConfig(cfg_scale=5.0), uncond_ids=uncond + uncond[:1])
    with pytest.raises(ValueError, match="unconditional"):  # any scale but 1 guides, below 1 too
        sampler.generate(prompts, N, SamplingConfig(cfg_scale=0.5))
    with pytest.raises(ValueError, match="num_tokens"):
        sampler.generate(prompts, 0, greedy())
    with pytest.raises(ValueError, match="token ids"):
        sampler.generate([[vocab.embedding_rows]], N, greedy())
    for token in (-1, vocab.embedding_rows + 5):
        with pytest.raises(ValueError, match="token ids"):
            sampler.generate([[3, token]], N, greedy())
    with pytest.raises(ValueError, match="empty"):
        sampler.generate([], N, greedy())
    for ids in ([0, 1, 2], [0, 1, 2, 3, 4]):
        with pytest.raises(ValueError, match=f"image_ids has {len(ids)} entries for 4 prompts"):
            sampler.generate(prompts, N, greedy(), image_ids=ids)
    assert sampler.generate([[0, 3]], 2, greedy()).shape == (1, 2)  # token id 0 is a token
    rows = model.get_input_embeddings().weight.shape[0]
    exact = ImageVocab(**{**vocab.__dict__, "codebook_size": rows - vocab.code_offset})  # codes end at the last row
    assert CodeSampler(model, exact).vocab.code_end == rows
    with pytest.raises(ValueError, match=f"model has {rows} embedding rows but the image codes end at id {rows + 1}"):
        CodeSampler(model, ImageVocab(**{**vocab.__dict__, "codebook_size": rows - vocab.code_offset + 1,
                                    "embedding_rows": rows + 1}))  # a vocabulary of another, larger model
    with pytest.raises(ValueError, match="different model"):
        generate_codes(model, vocab, prompts, N, greedy(), sampler=CodeSampler(model, ImageVocab(**{
            **vocab.__dict__, "codebook_size": 8})))
    equal_vocab = ImageVocab(**vocab.__dict__)  # an equal vocabulary (e.g. read back from image_vocab.json) is fine
    assert torch.equal(generate_codes(model, equal_vocab, prompts, N, greedy(), sampler=sampler),
                       sampler.generate(prompts, N, greedy()))


def test_one_code_and_the_too_long_message(setup):
    _, model, vocab, prompts, _ = setup
    sampler = CodeSampler(model, vocab)
    assert torch.equal(sampler.generate(prompts, 1, greedy()), sampler.generate(prompts, N, greedy())[:, :1])
    limit = model.config.max_position_embeddings
    prompt = prompts[0]
    message = (f"a prompt of {len(prompt)} tokens + <|image_start|> + {limit} codes needs {len(prompt) + 1 + limit} "
               "positions")
    with pytest.raises(ValueError, match=re.escape(message)):
        sampler.generate([prompt], limit, greedy())
    fits = limit - len(prompt) - 1  # prompt + <|image_start|> + codes fill every position exactly
    assert sampler.generate([prompt], fits, greedy()).shape == (1, fits)


def test_sampler_cache_shapes_and_steps(setup, monkeypatch):
    """KV caches are keyed by (rows, length rounded up to 64), reused across calls, the 4 latest kept; each eager step
    attends to exactly the columns written so far; compile=False never compiles."""
    _, model, vocab, prompts, _ = setup
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile called with compile=False"))
    sampler = CodeSampler(model, vocab)
    width = max(len(p) for p in prompts) + 1  # prompts + <|image_start|>, left-padded to the longest
    for rows in range(1, 6):
        sampler.generate((prompts * 2)[:rows], N, greedy())
    length = -(-(width + N) // 64) * 64
    assert length == 64 and list(sampler.caches) == [(rows, length) for rows in (2, 3, 4, 5)]
    kept = sampler.caches[(4, length)]
    sampler.generate(prompts, N, greedy())
    assert sampler.caches[(4, length)] is kept and len(sampler.caches) == 4
    sampler.generate(prompts, 64 - width + 1, greedy())  # one column past 64: the next multiple
    assert (4, 128) in sampler.caches
    seen = []
    monkeypatch.setattr("llm.sampler.attended_columns",
                        lambda written, *a, **k: seen.append(written) or attended_columns(written, *a, **k))
    sampler.generate(prompts, N, greedy())
    assert seen == list(range(width + 1, width + N))


def test_backend_chosen_by_value_and_compile_plumbing(setup, monkeypatch):
    """A backend name built at run time (read from a config) picks the fused backend; compile=True runs the decode
    step through one torch.compile(dynamic=False), kept for later calls, over the whole cache."""
    _, model, vocab, prompts, _ = setup
    sampler = CodeSampler(model, vocab)
    sampler.generate(prompts, 4, greedy(backend="".join(["fu", "sed"])))
    assert sampler.decoder is not None and sampler.caches
    compiles, steps = [], []

    def fake_compile(fn, **options):
        compiles.append(options)

        def compiled(cache, kv_len):
            steps.append(kv_len)
            return fn(cache, kv_len)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    eager = sampler.generate(prompts, N, greedy())
    for _ in range(2):
        assert torch.equal(sampler.generate(prompts, N, greedy(compile=True)), eager)
    length = next(iter(sampler.caches))[1]
    assert compiles == [{"dynamic": False}] and steps == [length] * 2 * (N - 1)


def test_hf_backend_calls(setup):
    """The transformers backend computes the head at the last position only, and each step's attention mask covers
    exactly the cached and the new tokens."""
    _, model, vocab, prompts, _ = setup
    head_positions, masks = [], []

    def record_inputs(module, args, kwargs):
        cached = kwargs["cache"].get_seq_length()
        masks.append((kwargs["attention_mask"].shape[1], cached + kwargs["input_ids"].shape[1]))

    hooks = [model.get_output_embeddings().register_forward_hook(lambda m, i, out: head_positions.append(out.shape[1])),
             model.register_forward_pre_hook(record_inputs, with_kwargs=True)]
    try:
        CodeSampler(model, vocab).generate(prompts, 4, greedy(backend="hf"))
    finally:
        for hook in hooks:
            hook.remove()
    assert head_positions == [1] * 4
    assert len(masks) == 4 and all(width == expected for width, expected in masks)
    for backend in BACKENDS:  # no autograd graph is built, whatever the weights require
        _, logits = CodeSampler(model, vocab).generate(prompts, 2, greedy(backend=backend), return_logits=True)
        assert not logits.requires_grad


def test_chat_template_and_empty_unconditional(setup):
    tok, model, vocab, _, _ = setup
    prompts = [build_prompt_ids(tok, c, "chat") for c in CAPTIONS[:2]]
    uncond = [unconditional_prompt_ids(tok, p, vocab, "empty", "chat") for p in prompts]
    codes = generate_codes(model, vocab, prompts, 8, SamplingConfig(cfg_scale=3.0, top_k=10), uncond_ids=uncond)
    assert codes.shape == (2, 8)


@pytest.mark.parametrize("backend", ["fused", "hf"])
@pytest.mark.parametrize("spec_window", [0, 3])
def test_sampled_codes_do_not_depend_on_the_batch(setup, backend, spec_window):
    """temperature > 0, top-k, top-p and CFG, one code per forward or speculative: a prompt's codes are those of its
    own (seed, image id) stream, whether it is sampled alone, first, last, or beside other prompts."""
    _, model, vocab, prompts, uncond = setup
    sampler = CodeSampler(model, vocab)
    cfg = SamplingConfig(cfg_scale=2.5, temperature=1.0, top_k=64, top_p=0.95, seed=11, backend=backend,
                         spec_window=spec_window)
    ids = [40, 41, 42, 43]
    batched = sampler.generate(prompts, N, cfg, uncond_ids=uncond, image_ids=ids)
    for i in range(len(prompts)):
        alone = sampler.generate([prompts[i]], N, cfg, uncond_ids=[uncond[i]], image_ids=[ids[i]])
        assert torch.equal(alone[0], batched[i]), i
    order = [3, 1, 0]
    shuffled = sampler.generate([prompts[i] for i in order], N, cfg, uncond_ids=[uncond[i] for i in order],
                               image_ids=[ids[i] for i in order])
    assert torch.equal(shuffled, batched[order])
    twice = sampler.generate([prompts[0]] * 2, N, cfg, uncond_ids=[uncond[0]] * 2, image_ids=[40, 99])
    assert torch.equal(twice[0], batched[0]) and not torch.equal(twice[1], twice[0])  # another stream


# ----------------------------------------------------------------------------------------------- speculative Jacobi


def test_verify_accepts_by_the_ratio_and_draws_the_residual():
    """Hand-made windows: a draft with p >= q is always accepted; one with p = 0 is rejected and the code comes from
    max(0, p - q); a fully accepted window draws the next code from p; drafts past `lengths` never count."""
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (1, 3, 3): two drafts and the next
    q = torch.tensor([[[0.25, 0.25, 0.5], [0.5, 0.5, 0.0]]])
    draw = torch.tensor([0.999], dtype=torch.float64)
    taken, drawn = verify(p, q, torch.tensor([[0, 1]]), torch.tensor([2]), torch.tensor([[0.999, 0.999]]), draw)
    assert (taken.item(), drawn.item()) == (2, 2)  # p/q = 2 and 2: both accepted; the next code from p[2]
    taken, drawn = verify(p, q, torch.tensor([[2, 1]]), torch.tensor([2]), torch.tensor([[1e-9, 0.5]]), draw)
    assert taken.item() == 0 and drawn.item() == 1  # p(2) = 0: rejected; residual (0.25, 0.25, 0) -> code 1 at u ~ 1
    taken, drawn = verify(p, q, torch.tensor([[0, 0]]), torch.tensor([2]), torch.tensor([[0.5, 0.5]]), draw)
    assert (taken.item(), drawn.item()) == (1, 1)  # second draft p(0) = 0 under p[1]: residual = p[1] - q[1]+ = e1
    taken, drawn = verify(p, q, torch.tensor([[0, 0]]), torch.tensor([1]), torch.tensor([[0.5, 0.5]]), draw)
    assert (taken.item(), drawn.item()) == (1, 1)  # one draft counts: accepted, then a draw from p[1] itself
    ratio = torch.tensor([[0.4, 0.6]])  # a draft of p 0.2 under q 0.5 is accepted iff u < 0.4
    p2, q2 = torch.tensor([[[0.2, 0.8], [0.5, 0.5]]]), torch.tensor([[[0.5, 0.5]]])
    for u, accepted in ((ratio[0, 0] - 1e-6, 1), (ratio[0, 0] + 1e-6, 0)):
        taken, drawn = verify(p2, q2, torch.tensor([[0]]), torch.tensor([1]), u.view(1, 1), draw)
        assert taken.item() == accepted
    assert drawn.item() == 1  # rejected: residual (0, 0.3) -> code 1


@pytest.mark.parametrize("backend", ["fused", "hf"])
def test_speculative_greedy_is_the_one_code_path(setup, backend):
    """Temperature 0, with and without CFG, any window and initialisation: exactly the one-code sampler's codes, and
    the guided logits of every position those of the one-code path."""
    _, model, vocab, prompts, uncond = setup
    sampler = CodeSampler(model, vocab)
    for scale in (1.0, 3.0):
        base = SamplingConfig(cfg_scale=scale, temperature=0.0, backend=backend)
        codes, logits = sampler.generate(prompts, N, base, uncond, return_logits=True)
        for window, init in ((1, "uniform"), (4, "repeat"), (N + 5, "uniform")):
            spec = dataclasses.replace(base, spec_window=window, spec_init=init)
            spec_codes, spec_logits = sampler.generate(prompts, N, spec, uncond, return_logits=True)
            assert torch.equal(spec_codes, codes), (scale, window, init)
            assert torch.allclose(spec_logits, logits, atol=1e-5 * logits.abs().max().item())


def test_speculative_window_accepts_whole_windows_of_a_certain_model(setup):
    """A model whose every code logit is equal (greedy: always code 0) accepts a whole window and one more code per
    forward once its drafts come from its own predictions: with spec_init "repeat", 1 prefill + 1 + ceil((N - 1) /
    (window + 1)) forwards (the first forward rejects the uniform drafts unless they are 0 and predicts every window
    position; later windows start past every prediction and repeat the last). Uniform drafts there are rejected."""
    _, model, vocab, prompts, _ = setup
    flat = copy.deepcopy(model)  # untied: zeroing the head leaves the embeddings
    with torch.no_grad():
        flat.get_output_embeddings().weight[vocab.code_offset : vocab.code_end] = 0.0
    sampler = CodeSampler(flat, vocab)
    for window in (1, 3, 7):
        codes = sampler.generate(prompts, N, greedy(spec_window=window, spec_init="repeat"))
        assert (codes == 0).all()
        assert sampler.forwards == 2 + math.ceil((N - 1) / (window + 1)), window
        assert (sampler.generate(prompts, N, greedy(spec_window=window)) == 0).all()
        assert 2 + math.ceil((N - 1) / (window + 1)) < sampler.forwards <= 1 + N
    sampler.generate(prompts, N, greedy())
    assert sampler.forwards == N


def _exact_code_distribution(model, vocab, prompt, uncond, num_tokens, scale) -> dict[tuple, float]:
    """P(codes) of every code sequence by transformers forwards without a cache (no sampler code): at each prefix
    softmax(u + s (c - u)) of the last position's code logits, multiplied along the sequence."""
    out = {}
    with torch.no_grad():
        for codes in itertools.product(range(vocab.codebook_size), repeat=num_tokens):
            prob = 1.0
            for t in range(num_tokens):
                heads = []
                for p in (prompt, uncond):
                    ids = image_prefix_ids(p, vocab) + [vocab.code_offset + c for c in codes[:t]]
                    heads.append(model(input_ids=torch.tensor([ids])).logits[0, -1, vocab.code_offset:
                                                                             vocab.code_end].double())
                prob *= float((heads[1] + scale * (heads[0] - heads[1])).softmax(-1)[codes[t]])
            out[codes] = prob
    return out


def _chi_square_p(sampler, prompt, uncond, cfg, exact, images=8000, batch=500) -> float:
    """p-value of the sampled code sequences of `images` images (ids 0 ..) against `exact`; cells expected fewer
    than 5 times pooled."""
    counts = dict.fromkeys(exact, 0)
    for first in range(0, images, batch):
        codes = sampler.generate([prompt] * batch, len(next(iter(exact))), cfg, [uncond] * batch,
                                 image_ids=range(first, first + batch))
        for row in codes.tolist():
            counts[tuple(row)] += 1
    expected = np.array([exact[c] for c in exact]) * images
    observed = np.array([counts[c] for c in exact], dtype=float)
    small = expected < 5
    expected = np.append(expected[~small], expected[small].sum())
    observed = np.append(observed[~small], observed[small].sum())
    return float(chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)


def test_speculative_sampling_keeps_the_distribution(tmp_path, monkeypatch):
    """At temperature 1 with CFG, the speculative sampler's code sequences (3 codes of 4) follow the exact
    distribution computed from full forwards, as the one-code sampler's do (chi-square over the whole joint: every
    marginal and pair); a mutant that accepts every draft, and one that redraws a rejected code from p instead of the
    residual, fail the same test."""
    tok = shapes_world_tokenizer(tmp_path / "tok")
    model = build_tiny_qwen3(tok, tie_word_embeddings=False)
    vocab = expand_vocabulary(model, tok, codebook_size=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distributions neither flat nor certain: the likeliest sequence has p 0.18
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    prompt = build_prompt_ids(tok, CAPTIONS[0])
    uncond = unconditional_prompt_ids(tok, prompt, vocab)
    exact = _exact_code_distribution(model, vocab, prompt, uncond, 3, 2.0)
    assert 0.1 < max(exact.values()) < 0.3
    sampler = CodeSampler(model, vocab)
    base = SamplingConfig(cfg_scale=2.0, temperature=1.0, seed=3)
    assert _chi_square_p(sampler, prompt, uncond, base, exact) > 1e-3
    for window, init in ((2, "uniform"), (1, "repeat")):
        spec = dataclasses.replace(base, spec_window=window, spec_init=init)
        assert _chi_square_p(sampler, prompt, uncond, spec, exact) > 1e-3, (window, init)
    import llm.speculative

    rule = llm.speculative.verify
    spec = dataclasses.replace(base, spec_window=2)
    monkeypatch.setattr(llm.speculative, "verify", lambda p, q, d, n, u, w: rule(p, q, d, n, torch.zeros_like(u), w))
    assert _chi_square_p(sampler, prompt, uncond, spec, exact) < 1e-6  # every draft accepted

    def redraw_from_p(p, q, drafts, lengths, u, w):
        taken, _ = rule(p, q, drafts, lengths, u, w)
        return taken, inverse_cdf(p[torch.arange(len(p)), taken], w)

    monkeypatch.setattr(llm.speculative, "verify", redraw_from_p)
    assert _chi_square_p(sampler, prompt, uncond, spec, exact) < 1e-6


def test_sampler_follows_writes_through_param_data(setup):
    """DeepSpeed writes updated weights through `param.data`, which bumps no version counter: a reused CodeSampler must
    still sample from the new weights."""
    _, model, vocab, prompts, _ = setup
    sampler = CodeSampler(model, vocab)
    before = sampler.generate(prompts, N, greedy())
    weights = [model.model.layers[0].self_attn.k_proj.weight, model.model.layers[1].mlp.up_proj.weight]
    saved = [w.detach().clone() for w in weights]
    versions = [w._version for w in weights]
    for w in weights:
        w.data.mul_(-2.0)
    assert [w._version for w in weights] == versions
    try:
        after = sampler.generate(prompts, N, greedy())
        assert torch.equal(after, CodeSampler(model, vocab).generate(prompts, N, greedy()))
        assert not torch.equal(after, before)
    finally:
        for w, s in zip(weights, saved):
            w.data.copy_(s)


def _zero2_check() -> None:
    """Run in a fresh process: a CodeSampler built on a DeepSpeed ZeRO-2 model before three optimizer steps samples
    afterwards exactly what the transformers backend computes from the updated weights."""
    import deepspeed

    from common.distributed import init_distributed
    from train.engine import DeepSpeedConfig, OptimConfig, build_engine, deepspeed_json

    info = init_distributed(always=True)
    tok = shapes_world_tokenizer()
    model = build_tiny_qwen3(tok, tie_word_embeddings=False)
    vocab = expand_vocabulary(model, tok, codebook_size=64)
    optim = OptimConfig(lr=5e-2, warmup_steps=1)
    ds = deepspeed_json(DeepSpeedConfig(zero_stage=2, bf16=False, micro_batch_size=2), optim, info.world_size)
    engine = build_engine(model.train(), [{"params": list(model.parameters())}], optim, 10, ds)
    sampler = CodeSampler(engine.module, vocab)
    prompts = [build_prompt_ids(tok, c) for c in CAPTIONS[:2]]
    cfg = greedy()
    sampler.generate(prompts, 8, cfg)  # builds the fused copies of the initial weights
    codes = list(range(vocab.code_offset, vocab.code_offset + 8))
    ids = torch.tensor([image_prefix_ids(prompts[0], vocab) + codes] * 2)
    for _ in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    engine.module.eval()
    fused, fused_logits = sampler.generate(prompts, 8, cfg, return_logits=True)
    hf, hf_logits = sampler.generate(prompts, 8, greedy(backend="hf"), return_logits=True)
    assert torch.equal(fused, hf), (fused, hf)
    assert torch.allclose(fused_logits, hf_logits, atol=1e-4 * hf_logits.abs().max().item()), \
        (fused_logits - hf_logits).abs().max()
    deepspeed.comm.destroy_process_group()
    print("zero2 ok")


def test_sampler_samples_the_weights_of_a_zero2_engine():
    proc = run_fresh_process("from tests.test_sampler import _zero2_check; _zero2_check()", timeout=600)
    assert proc.returncode == 0 and "zero2 ok" in proc.stdout, proc.stderr[-3000:]


def test_refusals_of_what_would_be_silently_wrong(setup):
    tok, model, vocab, prompts, _ = setup
    sampler = CodeSampler(model, vocab)
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"the model has {limit}"):
        sampler.generate(prompts[:1], limit, greedy())
    for caption in ("a photo of <|img_00007|> circles", "a <|image_start|> square", "a photo <|endoftext|>"):
        with pytest.raises(ValueError, match="token string"):
            build_prompt_ids(tok, caption)
    assert build_prompt_ids(tok, "a photo of <img_7> and | pipes |")  # look-alikes are plain text
    long_rope = build_tiny_qwen3(tok, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                       "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                                       "original_max_position_embeddings": 128})
    long_vocab = expand_vocabulary(long_rope, shapes_world_tokenizer(), codebook_size=16)
    with pytest.raises(ValueError, match="longrope"):
        CodeSampler(long_rope, long_vocab).generate(prompts[:1], 4, greedy())
    assert CodeSampler(long_rope, long_vocab).generate(prompts[:1], 4, greedy(backend="hf")).shape == (1, 4)


def test_sampling_options_are_the_config_fields():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, seed=42)
    defaults = sampling_from_arguments(parser.parse_args([]))
    assert defaults == SamplingConfig(seed=42)
    args = parser.parse_args(["--cfg-scale", "3", "--top-k", "7", "--top-p", "0.5", "--temperature", "0.7",
                              "--backend", "hf", "--no-cuda-graph", "--compile", "--seed", "1"])
    assert sampling_from_arguments(args) == SamplingConfig(cfg_scale=3.0, top_k=7, top_p=0.5, temperature=0.7,
                                                           backend="hf", cuda_graph=False, compile=True, seed=1)
    options = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(SamplingConfig)} <= options
    # an export's recommendation fills what the command line leaves unset, the program's default what it lacks
    recommended = {"cfg_scale": 2.5, "temperature": 0.9}
    assert sampling_from_arguments(parser.parse_args([]), recommended) == SamplingConfig(cfg_scale=2.5, temperature=0.9,
                                                                                          seed=42)
    given = sampling_from_arguments(parser.parse_args(["--cfg-scale", "4"]), recommended)
    assert (given.cfg_scale, given.temperature, given.top_k) == (4.0, 0.9, 0)
    program = argparse.ArgumentParser()
    add_sampling_arguments(program, cfg_scale=3.0)
    assert sampling_from_arguments(program.parse_args([])).cfg_scale == 3.0
    assert sampling_from_arguments(program.parse_args([]), recommended).cfg_scale == 2.5


def test_attended_columns():
    # eager: exactly the written columns; graphs: rounded up to 64, never past the cache; compiled: the whole cache
    assert [attended_columns(w, 192, graphs=False, compiled=False) for w in (1, 64, 65, 192)] == [1, 64, 65, 192]
    assert [attended_columns(w, 192, graphs=True, compiled=False) for w in (1, 64, 65, 130, 192)] == [64, 64, 128,
                                                                                                    192, 192]
    assert {attended_columns(w, 192, graphs=g, compiled=True) for w in (1, 100) for g in (False, True)} == {192}


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(setup):
    _, model, vocab, prompts, _ = setup
    eager = CodeSampler(model, vocab).generate(prompts, N, greedy())
    assert torch.equal(CodeSampler(model, vocab).generate(prompts, N, greedy(compile=True)), eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_matches_eager_and_generate(setup):
    _, model, vocab, prompts, uncond = setup
    gpu = model.to("cuda")
    try:
        sampler = CodeSampler(gpu, vocab)
        graphed, logits = sampler.generate(prompts, N, greedy(), return_logits=True)
        assert not sampler._graphs_failed and any(cache.graphs for cache in sampler.caches.values())  # captured
        eager, eager_logits = sampler.generate(prompts, N, greedy(cuda_graph=False), return_logits=True)
        assert torch.equal(graphed, eager)
        assert torch.allclose(logits, eager_logits, atol=1e-3 * eager_logits.abs().max().item())
        again = sampler.generate(prompts[:2], N, greedy())  # a cached graph, new prompts
        assert torch.equal(again, graphed[:2])
        # a generation crossing several KV_BUCKET graphs (one per 64 attended columns) equals the eager one
        long_graphed = sampler.generate(prompts, 150, greedy())
        assert torch.equal(long_graphed, sampler.generate(prompts, 150, greedy(cuda_graph=False)))
        # a second graph on a used cache, of the compiled step (its warm-up restarts at column 0)
        compiled, compiled_logits = sampler.generate(prompts, N, greedy(compile=True), return_logits=True)
        assert torch.equal(compiled, eager)
        assert torch.allclose(compiled_logits, eager_logits, atol=1e-3 * eager_logits.abs().max().item())
        cfg = SamplingConfig(cfg_scale=3.0, seed=5)
        assert torch.equal(sampler.generate(prompts, N, cfg, uncond_ids=uncond),
                           sampler.generate(prompts, N, cfg, uncond_ids=uncond))
    finally:
        model.to("cpu")


@pytest.mark.slow
def test_bench_script_runs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--device", "cpu",
                           "--batch", "2", "--repeats", "1", "--spec-window", "3", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ratios:" in proc.stdout and "unified model / generator-only model" in proc.stdout and out.is_file()
    results = json.loads(out.read_text())
    assert results["forwards_per_batch"]["ours_cfg"] == 64  # one per code of the tiny model's 8 x 8 grid
    for init in ("uniform", "repeat"):
        assert 1 < results["forwards_per_batch"][f"ours_cfg_spec_{init}"] <= 65  # the prefill, then <= one per code
        assert f"ours_cfg_spec_{init}/ours_cfg" in results["ratios"]


def test_the_fused_backend_refuses_an_adapter_on_the_head_alone(setup):
    """The code logits are read from the output embeddings' weight: a LoRA adapter there (and nowhere in the body)
    would be skipped, so the fused backend refuses it and transformers' backend applies it."""
    from peft import LoraConfig, get_peft_model

    tok, model, vocab, prompts, _ = setup
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["lm_head"])).get_base_model()
    with pytest.raises(ValueError, match="peft adapters"):
        CodeSampler(wrapped, vocab).generate(prompts[:1], 2, greedy())
    codes = CodeSampler(wrapped, vocab).generate(prompts[:1], 2, greedy(backend="hf"))
    assert codes.shape == (1, 2)
