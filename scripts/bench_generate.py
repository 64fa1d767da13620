"""Images per second of the project's sampler against the baselines people use, on the same model, prompts and
settings, in one run.

    python scripts/bench_generate.py --device cpu --compile
    python scripts/bench_generate.py --qwen3-0.6b-shape --device cuda --dtype bfloat16 --compile
    python scripts/bench_generate.py --generator runs/tiny-ar/export --spec-window 16 --skip-baselines --batch 32 \
        --cfg-scale 2.5 --top-k 0

Methods (batch B prompts, N = grid^2 codes each; temperature and top-k identical and active everywhere, top-k
applied to the code logits by every method):
- ours:        llm.sampler.CodeSampler, CFG off (CUDA graphs on CUDA).
- ours_compiled / ours_cfg_compiled (--compile): the same with the decode step torch.compile'd first.
- hf_generate: transformers `generate` (do_sample, CFG off; code restriction, temperature and top-k as logits
               processors in that order).
- hf_static_compiled: the same with transformers' own fast path: a static KV cache and its automatic
               torch.compile of the forward (CompileConfig), the strongest transformers baseline.
- ours_cfg:    llm.sampler.CodeSampler with CFG (conditional + unconditional rows batched).
- unified_cfg: llm.sampler.CodeSampler with CFG on the same language model inside a unified model (llm/unified.py: a
               LLaVA model whose language model holds the codes, drawn through its shared view; tiny VQRAE tower):
               it must draw as fast as the generator-only model (ratio unified_cfg/ours_cfg).
- ours_cfg_spec (--spec-window W): ours_cfg with speculative Jacobi decoding (W drafts per image per forward, both
               initialisations); its forwards per batch against ours_cfg's (one per code) and its time ratio. Drafts
               are accepted only where the model is confident, so a random model accepts almost none: measure it on a
               trained generator (--generator EXPORT, its own prompt format and sampling settings otherwise as given).
- plain_loop:  the loop Janus and LlamaGen ship: the transformers model called once per step with its default
               dynamic KV cache, cond / uncond rows batched, image-code logits at the last position only, eager,
               CFG + top-k + multinomial on the code logits.
Ratios printed: every CFG-off variant of ours against the strongest CFG-off baseline, every CFG variant against
plain_loop. On CUDA also the per-step time of each ours_cfg variant against the bound set by the bytes one decode
step must read (decoder weights + code rows of the head + the filled KV cache) over the device-to-device copy
bandwidth measured in the same run. The models are random: speed does not depend on the weights.
"""

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList, Qwen3Config, Qwen3ForCausalLM
from transformers.generation import CompileConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

from llm.pipeline import TextToImage
from llm.sampler import SPEC_INITS, CodeRangeLogitsProcessor, CodeSampler, SamplingConfig, left_pad
from llm.unified import language_model_view
from llm.vocab import (
    ImageVocab,
    build_prompt_ids,
    build_tiny_qwen3,
    expand_vocabulary,
    image_prefix_ids,
    unconditional_prompt_ids,
)
from world.shapes import geneval_prompts, shapes_world_tokenizer

QWEN3_06B_SHAPE = {
    "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 3072, "max_position_embeddings": 40960, "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}
QWEN3_TEXT_VOCAB, QWEN3_PAD, QWEN3_CODES, QWEN3_TOKENS = 151936, 151643, 16384, 256


def build(args, tokenizer) -> tuple[torch.nn.Module, ImageVocab, int]:
    """The model, its image vocabulary and the number of codes per image."""
    dtype = getattr(torch, args.dtype)
    if args.generator:
        t2i = TextToImage.from_pretrained(args.generator, device=args.device, dtype=dtype)
        return t2i.model.eval(), t2i.vocab, t2i.num_tokens
    if args.qwen3_06b_shape:
        if args.device == "cpu":
            raise SystemExit("--qwen3-0.6b-shape is meant for a GPU (pass --device cuda)")
        rows = -(-(QWEN3_TEXT_VOCAB + 2 + QWEN3_CODES) // 64) * 64
        vocab = ImageVocab(codebook_size=QWEN3_CODES, code_offset=QWEN3_TEXT_VOCAB + 2,
                           image_start_id=QWEN3_TEXT_VOCAB, image_end_id=QWEN3_TEXT_VOCAB + 1, pad_id=QWEN3_PAD,
                           text_vocab_size=QWEN3_TEXT_VOCAB, embedding_rows=rows)
        config = Qwen3Config(vocab_size=rows, pad_token_id=QWEN3_PAD, eos_token_id=QWEN3_PAD, **QWEN3_06B_SHAPE)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = Qwen3ForCausalLM(config).to(dtype).eval()
        return model, vocab, QWEN3_TOKENS
    model = build_tiny_qwen3(tokenizer)
    vocab = expand_vocabulary(model, tokenizer, codebook_size=512)
    return model.to(args.device, dtype).eval(), vocab, 64


def unified_model(model, tokenizer) -> torch.nn.Module:
    """A unified model (LLaVA: a tiny VQRAE tower, a projector, a copy of `model` as its language model)."""
    from llm.understanding import build_llava
    from tokenizer import VQRAE, get_preset

    llava, _ = build_llava(VQRAE(get_preset("tiny")).eval(), model, copy.deepcopy(tokenizer))
    return llava


@torch.no_grad()
def plain_loop(model, vocab: ImageVocab, rows: list[list[int]], num_tokens: int, cfg_scale: float,
               temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Janus / LlamaGen-style sampling: rows = B conditional then B unconditional prefixes."""
    device = next(model.parameters()).device
    ids, starts = left_pad(rows, vocab.pad_id, device)
    cols = torch.arange(ids.shape[1], device=device)
    mask = (cols[None] >= starts[:, None]).long()
    positions = (cols[None] - starts[:, None]).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    codes = []
    for t in range(num_tokens):
        logits = out.logits[:, -1, vocab.code_offset : vocab.code_end]
        cond, uncond = torch.split(logits, len(logits) // 2, dim=0)
        logits = (uncond + cfg_scale * (cond - uncond)) / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.size(-1)))[0][:, -1:]
            logits[logits < kth] = -float("inf")
        nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)  # (B, 1)
        codes.append(nxt)
        if t + 1 < num_tokens:
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=torch.cat([nxt, nxt]) + vocab.code_offset, attention_mask=mask,
                        position_ids=positions, cache=out.cache, use_cache=True)
    return torch.cat(codes, dim=1)


@torch.no_grad()
def hf_generate(model, vocab: ImageVocab, rows: list[list[int]], num_tokens: int, temperature: float, top_k: int,
                static_compiled: bool = False) -> torch.Tensor:
    """transformers `generate`; `static_compiled`: with a static cache and its automatic compilation."""
    device = next(model.parameters()).device
    ids, starts = left_pad(rows, vocab.pad_id, device)
    mask = (torch.arange(ids.shape[1], device=device)[None] >= starts[:, None]).long()
    processors = LogitsProcessorList([CodeRangeLogitsProcessor(vocab), TemperatureLogitsWarper(temperature),
                                      TopKLogitsWarper(top_k)])  # codes first, then as every other method
    fast = {}
    if static_compiled:
        compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else "default")
        compile_config._compile_all_devices = device.type != "cuda"  # transformers compiles on accelerators only
        fast = {"cache_implementation": "static", "compile_config": compile_config}
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=num_tokens, min_new_tokens=num_tokens, pad_token_id=vocab.pad_id,
        logits_processor=processors, **fast,
    )
    return vocab.token_to_code(out[:, ids.shape[1] :])


def time_methods(methods: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per call of each method, the methods interleaved round by round so that a change in machine
    load hits all of them alike (CUDA synchronised around every call)."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(repeats):
        for name, fn in methods.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
        print(f"round {round_ + 1}/{repeats} (s per batch):", " ".join(f"{n} {t[-1]:.3f}" for n, t in times.items()),
              flush=True)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def copy_bandwidth(device: torch.device, gib: float = 2.0, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (each copy reads and writes `gib`)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * src.numel() * repeats / (time.perf_counter() - start)


def step_bytes(model, vocab: ImageVocab, n_rows: int, prompt_len: int, num_tokens: int) -> tuple[int, int, int]:
    """Bytes one decode step must read: (decoder weights + code head rows, same with the full head, mean KV)."""
    body, head = model.get_decoder(), model.get_output_embeddings()
    size = head.weight.element_size()
    layers = sum(p.numel() for p in body.layers.parameters()) + body.norm.weight.numel()
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * size
    kv = n_rows * per_token * (prompt_len + num_tokens / 2)
    h = head.weight.shape[1]
    return (layers + vocab.codebook_size * h) * size, (layers + head.weight.shape[0] * h) * size, int(kv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny"], default="tiny")
    parser.add_argument("--generator", default=None, help="a trained generator export instead of a random model")
    parser.add_argument("--spec-window", type=int, default=0, help="also time speculative Jacobi decoding, W drafts")
    parser.add_argument("--qwen3-0.6b-shape", dest="qwen3_06b_shape", action="store_true",
                        help="random Qwen3-0.6B-shaped model, 16384 codes, 256 tokens per image (GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bfloat16 on CUDA, else float32)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per method (median; after a warm-up)")
    parser.add_argument("--cfg-scale", type=float, default=7.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None, help="default: a quarter of the codes, at most 1000")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time our sampler with its decode step torch.compile'd")
    parser.add_argument("--no-cuda-graph", action="store_true")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.generator and args.qwen3_06b_shape:
        raise SystemExit("--generator and --qwen3-0.6b-shape name two models: pass one")
    tokenizer = shapes_world_tokenizer(Path(tempfile.mkdtemp(prefix="bench-tok-")) / "tok")
    model, vocab, num_tokens = build(args, tokenizer)
    if args.top_k is None:
        args.top_k = min(1000, vocab.codebook_size // 4)
    if not args.skip_baselines and not 0 < args.top_k < vocab.codebook_size:  # every method must filter alike
        raise SystemExit(f"--top-k must be active: between 1 and {vocab.codebook_size - 1}")
    captions = [p["prompt"] for p in geneval_prompts()][: args.batch]
    if args.generator:
        prompts, uncond = TextToImage.from_pretrained(args.generator).prompt_rows(captions)
    else:
        prompts = [build_prompt_ids(tokenizer, c) for c in captions]
        uncond = [unconditional_prompt_ids(tokenizer, p, vocab) for p in prompts]
    base = {"temperature": args.temperature, "top_k": args.top_k, "top_p": 1.0, "seed": 0,
            "cuda_graph": not args.no_cuda_graph}
    cfg_off, cfg_on = SamplingConfig(cfg_scale=1.0, **base), SamplingConfig(cfg_scale=args.cfg_scale, **base)
    compiled_off, compiled_on = (dataclasses.replace(c, compile=True) for c in (cfg_off, cfg_on))
    sampler = CodeSampler(model, vocab)
    cond_rows = [image_prefix_ids(p, vocab) for p in prompts]
    all_rows = cond_rows + [image_prefix_ids(p, vocab) for p in uncond]
    gen = torch.Generator(device=device).manual_seed(0)

    forwards: dict[str, int] = {}

    def ours(name: str, cfg: SamplingConfig, drawer: CodeSampler = sampler, guided: bool = True):
        def draw() -> torch.Tensor:
            codes = drawer.generate(prompts, num_tokens, cfg, uncond_ids=uncond if guided else None)
            forwards[name] = drawer.forwards
            return codes
        return draw

    methods = {"ours": ours("ours", cfg_off, guided=False), "ours_cfg": ours("ours_cfg", cfg_on)}
    if not args.generator:  # the unified model shares the random generator's language model
        unified = CodeSampler(language_model_view(unified_model(model, tokenizer).to(device, model.dtype)), vocab)
        methods["unified_cfg"] = ours("unified_cfg", cfg_on, unified)
    spec = {f"ours_cfg_spec_{init}": dataclasses.replace(cfg_on, spec_window=args.spec_window, spec_init=init)
            for init in SPEC_INITS} if args.spec_window else {}
    for name, cfg in spec.items():
        methods[name] = ours(name, cfg)
    if args.compile:
        methods["ours_compiled"] = lambda: sampler.generate(prompts, num_tokens, compiled_off)
        methods["ours_cfg_compiled"] = lambda: sampler.generate(prompts, num_tokens, compiled_on, uncond_ids=uncond)
    if not args.skip_baselines:
        methods["hf_generate"] = lambda: hf_generate(model, vocab, cond_rows, num_tokens, args.temperature, args.top_k)
        methods["hf_static_compiled"] = lambda: hf_generate(model, vocab, cond_rows, num_tokens, args.temperature,
                                                            args.top_k, static_compiled=True)
        methods["plain_loop"] = lambda: plain_loop(model, vocab, all_rows, num_tokens, args.cfg_scale,
                                                   args.temperature, args.top_k, gen)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"dtype {args.dtype}, threads {torch.get_num_threads()}, batch {args.batch}, {num_tokens} tokens/image, "
          f"{vocab.codebook_size} codes, vocab {vocab.embedding_rows}")
    configs = {"cfg_off": cfg_off, "cfg_on": cfg_on, **({"compiled_off": compiled_off, "compiled_on": compiled_on}
                                                        if args.compile else {}), **spec}
    print("settings:", json.dumps({name: c.to_dict() for name, c in configs.items()}))
    results: dict = {"settings": vars(args), "seconds_per_batch": {}, "images_per_second": {}}
    for name, fn in methods.items():  # first calls: warm-up (CUDA graph capture, compilation) and a validity check
        start = time.perf_counter()
        codes = fn()
        valid = 0 <= int(codes.min()) <= int(codes.max()) < vocab.codebook_size
        if codes.shape != (args.batch, num_tokens) or not valid:
            raise RuntimeError(f"{name} returned invalid codes of shape {tuple(codes.shape)}")
        print(f"{name:18s} first call {time.perf_counter() - start:.2f} s", flush=True)
    for name, sec in time_methods(methods, device, args.repeats).items():
        results["seconds_per_batch"][name] = sec
        results["images_per_second"][name] = args.batch / sec
        print(f"{name:18s} {args.batch / sec:9.2f} images/s  {sec / num_tokens * 1e3:8.3f} ms/step")
    ips = results["images_per_second"]
    if "hf_generate" in ips:
        strongest = max(("hf_generate", "hf_static_compiled"), key=lambda m: ips[m])
        pairs = [(ours, strongest) for ours in ("ours", "ours_compiled")] + \
                [(ours, "plain_loop") for ours in ("ours_cfg", "ours_cfg_compiled")]
        results["strongest_cfg_off_baseline"] = strongest
        results["ratios"] = {f"{ours}/{base}": ips[ours] / ips[base] for ours, base in pairs if ours in ips}
        print("ratios:", " ".join(f"{k} {v:.2f}x" for k, v in results["ratios"].items()))
    if "unified_cfg" in ips:
        results.setdefault("ratios", {})["unified_cfg/ours_cfg"] = ips["unified_cfg"] / ips["ours_cfg"]
        print(f"unified model / generator-only model (CFG): {results['ratios']['unified_cfg/ours_cfg']:.2f}x")
    results["forwards_per_batch"] = forwards
    for name in spec:
        results.setdefault("ratios", {})[f"{name}/ours_cfg"] = ips[name] / ips["ours_cfg"]
        print(f"{name}: {forwards[name]} forwards per batch against {forwards['ours_cfg']} "
              f"({forwards['ours_cfg'] / forwards[name]:.2f}x fewer), {ips[name] / ips['ours_cfg']:.2f}x the images/s")
    if device.type == "cuda":
        bw = copy_bandwidth(device)
        width = max(len(r) for r in all_rows)
        weights, weights_full, kv = step_bytes(model, vocab, len(all_rows), width, num_tokens)
        bound, bound_full = (weights + kv) / bw, (weights_full + kv) / bw
        results["bandwidth"] = {"copy_GBps": bw / 1e9, "bound_ms": bound * 1e3, "bound_full_head_ms": bound_full * 1e3}
        print(f"bandwidth {bw / 1e9:.0f} GB/s; bound {bound * 1e3:.3f} ms per step ({(weights + kv) / 1e9:.2f} GB: "
              f"weights+code head {weights / 1e9:.2f}, mean KV {kv / 1e9:.2f}; full-vocabulary head "
              f"{bound_full * 1e3:.3f} ms)")
        for name in ("ours_cfg", "ours_cfg_compiled"):
            if name in results["seconds_per_batch"]:
                step = results["seconds_per_batch"][name] / num_tokens
                results["bandwidth"][f"{name}_step_ms"] = step * 1e3
                results["bandwidth"][f"{name}_step_over_bound"] = step / bound
                print(f"{name:18s} step {step * 1e3:.3f} ms -> {step / bound:.2f}x the bound")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
