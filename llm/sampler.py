"""Image-code sampler: batched prompts -> (B, N) code indices, kept apart from the model (a CodeSampler over a KV cache).

Per step: one forward over the conditional rows and, when cfg_scale != 1, the unconditional rows batched with them;
logits restricted to the code tokens; classifier-free guidance u + s (c - u); temperature; top-k; top-p; a draw from
the image's own random stream (seed, image id), so a prompt's codes do not depend on its batch (greedy when
temperature == 0). Every setting lives in `SamplingConfig` and is recorded with the outputs (`to_dict()`); nothing is
read from a checkpoint's generation_config. A generator export carries the settings it was tuned and reported with
(RECOMMENDED_FILE: guidance, temperature, top-k, top-p), which every command-line consumer takes as its defaults.

Backends (SamplingConfig.backend):
- "fused" (default) for Llama-family decoders (Qwen3, Qwen2, Llama): `llm.fused`, the model's own weights in one
  preallocated KV cache; on CUDA the decode step runs as CUDA graphs (cuda_graph=True), one per 64 attended cache
  columns; compile=True compiles it first, over the whole cache.
- "hf": any transformers causal LM, called per step with a DynamicCache (the reference and the fallback).

Speculative Jacobi decoding (SamplingConfig.spec_window > 0): `llm.speculative`, on both backends; the same
distribution of codes in fewer forwards.

    sampler = CodeSampler(model, vocab)
    codes = sampler.generate([prompt_ids], num_tokens=64, cfg=SamplingConfig(cfg_scale=5.0), uncond_ids=[uncond])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessor, PreTrainedModel

from llm.fused import FusedDecoder, KVCache, attended_columns, attention_bias, capture_decode_graph, round_up
from llm.vocab import ImageVocab, image_prefix_ids

BACKENDS = ("fused", "hf")
MAX_CACHED_SHAPES = 4  # KV caches / CUDA graphs kept per CodeSampler, keyed by (rows, cache length)
CACHE_ALIGN = 64  # cache lengths are rounded up to this, so prompts of similar length share a cache and a graph
IMAGE_STREAM = 0x1A6E5  # SeedSequence namespace of the per-image sampling streams
RECOMMENDED_FILE = "sampling.json"  # in an export: the sampling settings it was tuned and reported with
RECOMMENDED_FIELDS = ("cfg_scale", "temperature", "top_k", "top_p")  # what changes the images' distribution
SPEC_INITS = ("uniform", "repeat")  # proposal of a draft with no prediction yet: uniform codes, or the last one made


@dataclass(frozen=True)
class SamplingConfig:
    """Every setting that changes the sampled codes or the way they are computed (the command-line options of
    `add_sampling_arguments` are these fields).

    Args:
        cfg_scale: classifier-free guidance scale s in u + s (c - u); 1.0 runs no unconditional rows.
        temperature: logits are divided by it; 0 means greedy (argmax).
        top_k: keep the k largest logits (ties at the k-th value kept); 0 turns it off.
        top_p: keep the smallest set of codes whose probability reaches p (argmax always kept); 1.0 turns it off.
        seed: seed of the per-image random streams (image i draws from (seed, i) alone).
        backend: "fused" or "hf" (see the module docstring).
        cuda_graph: capture the fused decode step in CUDA graphs (CUDA only; ignored elsewhere).
        compile: torch.compile the fused decode step (slow to start; pays on CUDA for long runs).
        spec_window: draft codes per image verified in each forward (speculative Jacobi decoding, see the module
            docstring); 0 draws one code per forward. Changes how many forwards run, not the codes' distribution.
        spec_init: proposal of a draft the model has made no prediction for yet: "uniform" over the codes (the
            paper's random initialisation) or "repeat" (the latest prediction of that image, its last position's).
    """

    cfg_scale: float = field(default=5.0, metadata={"help": "classifier-free guidance scale (1 = off)"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely codes (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus probability (1 = off)"})
    seed: int = field(default=0, metadata={"help": "seed of the per-image random streams"})
    backend: str = field(default="fused", metadata={"help": "fused (Llama-family decoders) or hf",
                                                     "choices": BACKENDS})
    cuda_graph: bool = field(default=True, metadata={"help": "CUDA graphs of the decode step (CUDA only)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step (pays for many images)"})
    spec_window: int = field(default=0, metadata={"help": "draft codes verified per forward, speculative Jacobi "
                                                          "decoding (0 = one code per forward)"})
    spec_init: str = field(default="uniform", metadata={"help": "proposal of a new draft code", "choices": SPEC_INITS})

    def __post_init__(self):
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be finite, got {self.cfg_scale}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:  # also refuses nan
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.spec_window, bool) or not isinstance(self.spec_window, int) or self.spec_window < 0:
            raise ValueError(f"spec_window must be a non-negative integer (0 = off), got {self.spec_window!r}")
        if self.spec_init not in SPEC_INITS:
            raise ValueError(f"spec_init must be one of {SPEC_INITS}, got {self.spec_init!r}")
        if self.spec_window and self.compile:
            raise ValueError("compile applies to the one-code decode step; speculative decoding (spec_window > 0) "
                             "runs its windows eagerly: drop one of them")

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field (write it next to the samples)."""
        return asdict(self)


PRESETS: dict[str, SamplingConfig] = {
    "janus": SamplingConfig(cfg_scale=5.0, temperature=1.0, top_k=0, top_p=1.0),
    "llamagen": SamplingConfig(cfg_scale=7.5, temperature=1.0, top_k=1000, top_p=1.0),
    "greedy": SamplingConfig(cfg_scale=1.0, temperature=0.0),
}


def add_sampling_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """One option per SamplingConfig field (--cfg-scale, --temperature, --top-k, --top-p, --seed, --backend,
    --[no-]cuda-graph, --[no-]compile); `defaults` change a field's default for this program (e.g. seed=42). The
    options of RECOMMENDED_FIELDS default to the export's recommendation, else to those defaults. Read them back with
    `sampling_from_arguments`."""
    unknown = set(defaults) - {f.name for f in dataclasses.fields(SamplingConfig)}
    if unknown:
        raise TypeError(f"not SamplingConfig fields: {sorted(unknown)}")
    group = parser.add_argument_group("sampling")
    fallback = {}
    for f in dataclasses.fields(SamplingConfig):
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
            continue
        kind = {"float": float, "int": int, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        shown = f"default {default}"
        if f.name in RECOMMENDED_FIELDS:  # unset: the export's recommendation, else `default`
            fallback[f.name], shown, default = default, f"default: the model's {RECOMMENDED_FILE}, else {default}", None
        group.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"),
                           help=f"{f.metadata['help']} ({shown})")
    parser.set_defaults(sampling_fallback=fallback)


def sampling_from_arguments(args: argparse.Namespace, recommended: dict | None = None) -> SamplingConfig:
    """The SamplingConfig of options added by `add_sampling_arguments` (ValueError on a bad value): an option given
    on the command line, else the model's `recommended` settings (`load_recommended`), else the program's default."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)}
    for name in RECOMMENDED_FIELDS:
        if values[name] is None:
            values[name] = (recommended or {}).get(name, args.sampling_fallback[name])
    return SamplingConfig(**values)


def recommended_settings(sampling: SamplingConfig) -> dict:
    """The RECOMMENDED_FIELDS of `sampling`."""
    return {name: getattr(sampling, name) for name in RECOMMENDED_FIELDS}


def save_recommended(directory: str | Path, settings: dict) -> None:
    """Write recommended sampling settings (`recommended_settings`) into directory/RECOMMENDED_FILE."""
    SamplingConfig(**settings)
    (Path(directory) / RECOMMENDED_FILE).write_text(json.dumps(settings, indent=2))


def load_recommended(directory: str | Path) -> dict:
    """An export's recommended sampling settings ({} for an export without them); checked as a SamplingConfig."""
    path = Path(directory) / RECOMMENDED_FILE
    if not path.is_file():
        return {}
    settings = json.loads(path.read_text())
    unknown = set(settings) - set(RECOMMENDED_FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown sampling settings {sorted(unknown)}")
    SamplingConfig(**settings)  # a bad value is refused here, naming it
    return settings


# ----------------------------------------------------------------------------------------------- sampling math


def apply_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond)."""
    return torch.lerp(uncond, cond, scale)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (same shape) of the entries top-k keeps along the last dim: those >= the k-th largest value, so
    ties at the threshold are all kept. k == 0 or k >= size keeps everything."""
    if k <= 0 or k >= logits.shape[-1]:
        return torch.ones_like(logits, dtype=torch.bool)
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits >= kth


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask of the nucleus along the last dim: an entry is kept when the probability of the entries strictly
    more likely than it is below p. Without ties this is the smallest set whose probability reaches p; tied entries
    are kept or dropped together; the argmax is always kept. p >= 1 keeps everything."""
    if p >= 1:
        return torch.ones_like(logits, dtype=torch.bool)
    probs = logits.float().softmax(-1)
    sorted_probs = probs.sort(-1, descending=True).values
    before = sorted_probs.cumsum(-1) - sorted_probs  # probability strictly before each sorted position
    n_keep = (before < p).sum(-1, keepdim=True).clamp_min(1)  # a prefix of the sorted order
    threshold = sorted_probs.gather(-1, n_keep - 1)  # (..., 1) smallest kept probability
    return probs >= threshold


def restrict_to_codes(logits: torch.Tensor, vocab: ImageVocab) -> torch.Tensor:
    """Full-vocabulary logits (..., V) -> the code columns (..., K); index i of the result is code i."""
    if logits.shape[-1] < vocab.code_end:
        raise ValueError(f"logits have {logits.shape[-1]} columns, fewer than the code range end {vocab.code_end}")
    return logits[..., vocab.code_offset : vocab.code_end]


def image_uniforms(seed: int, image_ids: Sequence[int], steps: int) -> np.ndarray:
    """The random numbers of each image's own stream: (B, steps) float64 in (0, 1), row r drawn from
    SeedSequence((IMAGE_STREAM, seed, image_ids[r])) alone, so an image's draws depend on nothing else in its batch.

    Args:
        seed: SamplingConfig.seed. image_ids: one non-negative id per image (e.g. its index in a benchmark).
        steps: draws per image (one per code).
    """
    out = np.empty((len(image_ids), steps), dtype=np.float64)
    for row, image in enumerate(image_ids):
        out[row] = open_uniforms(image_stream(seed, image), steps)
    return out


def image_stream(seed: int, image: int, *namespace: int) -> np.random.Generator:
    """The random stream of one image: SeedSequence((IMAGE_STREAM, seed, image, *namespace))."""
    if int(image) < 0:
        raise ValueError(f"image ids must be non-negative, got {image}")
    return np.random.default_rng(np.random.SeedSequence((IMAGE_STREAM, seed, int(image), *namespace)))


def open_uniforms(rng: np.random.Generator, n: int) -> np.ndarray:
    """n float64 draws in (0, 1): (k + 1/2) / 2^32 for 32-bit integers k, never 0 or 1."""
    return (rng.integers(0, 1 << 32, size=n, dtype=np.uint64) + 0.5) / float(1 << 32)


def sample_codes(logits: torch.Tensor, cfg: SamplingConfig, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Draw one index per row of logits (R, K): temperature, then top-k, then top-p (transformers' order), then the
    inverse of the CDF at the row's uniform in (0, 1) (`uniforms`, (R,) float64; exactly a categorical draw, and one
    that never synchronises with the device); argmax when temperature == 0."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    return inverse_cdf(target_probs(logits, cfg), uniforms)


def target_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution a code is drawn from, (..., K) float32: temperature, then top-k, then top-p, then softmax;
    at temperature 0 the argmax's one-hot (what greedy draws)."""
    if cfg.temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        logits = logits.masked_fill(~top_k_mask(logits, cfg.top_k), float("-inf"))
    if cfg.top_p < 1:
        logits = logits.masked_fill(~top_p_mask(logits, cfg.top_p), float("-inf"))
    return logits.softmax(-1)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of (unnormalised) probabilities (..., K): the inverse of the CDF at the row's uniform in
    (0, 1), `uniforms` (...) float64; exactly a categorical draw, and one that never synchronises with the device. A
    code of probability 0 is never chosen."""
    cdf = probs.double().cumsum(-1)
    target = uniforms[..., None] * cdf[..., -1:]  # strictly below the total (u <= 1 - 2^-33)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


class CodeRangeLogitsProcessor(LogitsProcessor):
    """For transformers' `generate`: every logit outside the code range becomes -inf."""

    def __init__(self, vocab: ImageVocab):
        self.start, self.stop = vocab.code_range

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, float("-inf"))
        out[:, self.start : self.stop] = scores[:, self.start : self.stop]
        return out


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows. Returns ids (R, P) and the first real column of each row, starts (R,)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
    starts = torch.tensor([width - len(r) for r in rows], dtype=torch.long)
    return ids.to(device), starts.to(device)


# ----------------------------------------------------------------------------------------------- sampler


class CodeSampler:
    """Samples code grids from a causal LM with an expanded vocabulary. Reuse one CodeSampler across batches: it keeps
    the fused weights (refreshed from the model at every call), KV caches and CUDA graphs.

    Args:
        model: a transformers causal LM whose vocabulary holds `vocab`.
        vocab: the image vocabulary.
    """

    def __init__(self, model: PreTrainedModel, vocab: ImageVocab):
        rows = model.get_input_embeddings().weight.shape[0]
        if rows < vocab.code_end:
            raise ValueError(f"model has {rows} embedding rows but the image codes end at id {vocab.code_end}")
        self.model, self.vocab = model, vocab
        self.decoder: FusedDecoder | None = None
        self.caches: dict[tuple[int, int], KVCache] = {}
        self._compiled: Callable | None = None
        self._graphs_failed = False  # after one failed capture, decode without graphs
        self.forwards = 0  # model forwards (prefill included) of the last `generate`

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self, prompt_ids_batch: list[list[int]], num_tokens: int, cfg: SamplingConfig,
        uncond_ids: list[list[int]] | None = None, return_logits: bool = False,
        image_ids: Sequence[int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sample `num_tokens` codes after each prompt.

        Args:
            prompt_ids_batch: B prompts (token id lists from `build_prompt_ids`, without <|image_start|>).
            num_tokens: codes per image (grid_size ** 2).
            cfg: sampling settings.
            uncond_ids: B unconditional prompts (`unconditional_prompt_ids`), required when cfg.cfg_scale != 1.
            return_logits: also return the guided code logits of every step, (B, N, K) float32.
            image_ids: one id per prompt naming its random stream (`image_uniforms`; default 0 .. B-1). The same
                (seed, id, prompt) gives the same codes whatever else is in the batch.

        Returns:
            codes (B, N) int64 on the model's device (and the logits when asked).
        """
        rows = self._rows(prompt_ids_batch, num_tokens, cfg, uncond_ids)
        batch = len(prompt_ids_batch)
        image_ids = list(range(batch)) if image_ids is None else list(image_ids)
        if len(image_ids) != batch:
            raise ValueError(f"image_ids has {len(image_ids)} entries for {batch} prompts")
        guided = batch < len(rows)
        if cfg.spec_window:
            from llm.speculative import jacobi_generate  # it builds on this module

            return jacobi_generate(self, rows, batch, num_tokens, cfg, image_ids, return_logits)
        uniforms = torch.from_numpy(image_uniforms(cfg.seed, image_ids, num_tokens)).to(self.device)  # (B, N)
        start = self._fused_session if cfg.backend == "fused" else self._hf_session
        logits, step = start(rows, num_tokens, cfg)
        codes = torch.empty(batch, num_tokens, dtype=torch.long, device=self.device)
        trace = []
        for t in range(num_tokens):
            logits = logits.float()
            if guided:
                logits = apply_cfg(logits[:batch], logits[batch:], cfg.cfg_scale)
            if return_logits:
                trace.append(logits.clone())
            drawn = sample_codes(logits, cfg, uniforms[:, t])  # (B,)
            codes[:, t] = drawn
            if t + 1 < num_tokens:
                logits = step(drawn + self.vocab.code_offset)  # the unconditional rows continue with the same code
        self.forwards = num_tokens
        return (codes, torch.stack(trace, 1)) if return_logits else codes

    def _rows(self, prompts, num_tokens, cfg, uncond) -> list[list[int]]:
        """Validated model inputs: the B conditional prefixes, then (CFG) the B unconditional ones."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise ValueError("prompt_ids_batch is empty")
        if cfg.cfg_scale != 1:
            if uncond is None or len(uncond) != len(prompts):
                raise ValueError(
                    f"cfg_scale {cfg.cfg_scale} needs one unconditional prompt per prompt (uncond_ids, from "
                    f"llm.vocab.unconditional_prompt_ids); got {None if uncond is None else len(uncond)} for "
                    f"{len(prompts)} prompts"
                )
            prompts += [list(map(int, p)) for p in uncond]
        limit = self.model.get_input_embeddings().weight.shape[0]
        for p in prompts:
            if any(not 0 <= t < limit for t in p):
                raise ValueError(f"prompt token ids must lie in [0, {limit}), got {p}")
        rows = [image_prefix_ids(p, self.vocab) for p in prompts]
        positions = self.model.config.get_text_config().max_position_embeddings
        longest = max(len(r) for r in rows)
        if longest + num_tokens > positions:
            raise ValueError(f"a prompt of {longest - 1} tokens + <|image_start|> + {num_tokens} codes needs "
                             f"{longest + num_tokens} positions; the model has {positions}")
        return rows

    # ----- fused backend -------------------------------------------------------------------------------------

    def fused_decoder(self) -> FusedDecoder:
        """The fused decoder of the model, rebuilt when a parameter moved, its weights refreshed (see
        `FusedDecoder.refresh`)."""
        if self.decoder is None or self.decoder.replaced():
            self.decoder, self._compiled = FusedDecoder(self.model, self.vocab), None
            self.caches.clear()
        self.decoder.refresh()
        return self.decoder

    def _fused_session(self, rows, num_tokens, cfg):
        dec = self.fused_decoder()
        ids, starts = left_pad(rows, self.vocab.pad_id, self.device)  # (R, P), (R,)
        n_rows, width = ids.shape
        length = round_up(width + num_tokens, CACHE_ALIGN)
        if dec.ensure_rope(length):
            self.caches.clear()  # captured graphs read the old tables
        cache = self.kv_cache(n_rows, length)
        decode = dec.decode
        if cfg.compile:
            self._compiled = self._compiled or torch.compile(dec.decode, dynamic=False)
            decode = self._compiled
        use_graph = cfg.cuda_graph and self.device.type == "cuda" and not self._graphs_failed

        def attended(t: int) -> int:
            return attended_columns(width + t, length, graphs=use_graph, compiled=cfg.compile)

        if use_graph:  # every graph this session needs, captured before the prefill writes the cache
            for kv_len in sorted({attended(t) for t in range(1, num_tokens)}):
                if (cfg.compile, kv_len) not in cache.graphs and not self._graphs_failed:
                    self._graphs_failed = not capture_decode_graph(cache, decode, cfg.compile, kv_len)

        cols = torch.arange(width, device=self.device)
        valid = cols[None] >= starts[:, None]  # (R, P) real tokens
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=self.device)  # pad queries see themselves: no NaN rows
        prefill_bias = attention_bias((causal & valid[:, None, :] | eye)[:, None], dec.param.dtype)  # (R, 1, P, P)
        positions = (cols[None] - starts[:, None]).clamp_min(0)
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        logits = dec.forward(ids, positions, zero, prefill_bias, cache, kv_len=width)
        cache.bias.fill_(float("-inf"))
        cache.bias[:, 0, 0, :width] = attention_bias(valid, cache.bias.dtype)
        cache.positions.copy_((width - starts)[:, None])
        cache.slot.fill_(width)
        t = 0

        def step(tokens: torch.Tensor) -> torch.Tensor:
            nonlocal t
            t += 1
            cache.tokens.view(-1, len(tokens)).copy_(tokens)  # (B,) into each group of B rows
            kv_len = attended(t)
            graph = cache.graphs.get((cfg.compile, kv_len)) if use_graph else None
            if graph is not None:
                graph[0].replay()
                return graph[1]
            return decode(cache, kv_len)

        return logits, step

    def kv_cache(self, n_rows: int, length: int) -> KVCache:
        """A KV cache of this shape, kept for reuse (at most MAX_CACHED_SHAPES)."""
        key = (n_rows, length)
        if key not in self.caches:
            if len(self.caches) >= MAX_CACHED_SHAPES:
                self.caches.pop(next(iter(self.caches)))
            dec = self.decoder
            self.caches[key] = KVCache(len(dec.layers), n_rows, dec.kv_heads, length, dec.head_dim,
                                       dec.param.dtype, self.device)
        return self.caches[key]

    # ----- transformers backend --------------------------------------------------------------------------------

    def _hf_session(self, rows, num_tokens, cfg):
        ids, starts = left_pad(rows, self.vocab.pad_id, self.device)
        cols = torch.arange(ids.shape[1], device=self.device)
        mask = (cols[None] >= starts[:, None]).long()  # (R, P)
        positions = (cols[None] - starts[:, None]).clamp_min(0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        state = {"mask": mask, "next": positions[:, -1:] + 1}

        def step(tokens: torch.Tensor) -> torch.Tensor:
            tokens = tokens.repeat(len(ids) // len(tokens))[:, None]  # (R, 1)
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(tokens), 1)], 1)
            out = self.model(input_ids=tokens, attention_mask=state["mask"], position_ids=state["next"],
                             cache=cache, use_cache=True)
            state["next"] = state["next"] + 1
            return restrict_to_codes(out.logits[:, -1], self.vocab)

        return restrict_to_codes(out.logits[:, -1], self.vocab), step


def generate_codes(
    model: PreTrainedModel, vocab: ImageVocab, prompt_ids_batch: list[list[int]], num_tokens: int,
    cfg: SamplingConfig, uncond_ids: list[list[int]] | None = None, sampler: CodeSampler | None = None,
    return_logits: bool = False, image_ids: Sequence[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample (B, num_tokens) code indices; see `CodeSampler.generate`. Pass a `sampler` to reuse caches and graphs
    across calls (one is built per call otherwise).

    Args:
        model: causal LM with the expanded vocabulary.
        vocab: its image vocabulary.
        prompt_ids_batch: B prompts from `build_prompt_ids`.
        num_tokens: codes per image.
        cfg: sampling settings (record `cfg.to_dict()` with the outputs).
        uncond_ids: B unconditional prompts, required when cfg.cfg_scale != 1.
        sampler: a CodeSampler built on this model and vocab.
        return_logits: also return the guided code logits of every step, (B, N, K).
        image_ids: the images' random-stream ids (default 0 .. B-1).
    """
    sampler = sampler or CodeSampler(model, vocab)
    if sampler.model is not model or sampler.vocab != vocab:
        raise ValueError("sampler was built for a different model or vocabulary")
    return sampler.generate(prompt_ids_batch, num_tokens, cfg, uncond_ids, return_logits, image_ids)
