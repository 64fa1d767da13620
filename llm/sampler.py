"""Image-code sampler: batched prompts -> (B, N) code indices, kept apart from the model (an Engine + KVCache).

Per step: one forward over the conditional rows and, when cfg_scale != 1, the unconditional rows batched with them;
logits restricted to the code tokens; classifier-free guidance u + s (c - u); temperature; top-k; top-p; a draw from
a torch.Generator seeded by cfg.seed (greedy when temperature == 0). Every setting lives in `SamplingConfig` and is
recorded with the outputs (`to_dict()`); nothing is read from a checkpoint's generation_config.

Backends (SamplingConfig.backend):
- "fused" (default) for Llama-family decoders (Qwen3, Qwen2, Llama): the model's own weights (q/k/v and gate/up
  concatenated once, refreshed when a weight changes) in one preallocated KV cache, RoPE from the model's rotary
  module tabulated once, logits computed for the code rows of the LM head only. About 20 ops per layer instead of
  ~50 plus transformers' per-call mask and wrapper work. On CUDA the decode step is captured in CUDA graphs
  (cuda_graph=True), one per 64 attended cache columns; compile=True compiles it first, over the whole cache.
- "hf": any transformers causal LM, called per step with a DynamicCache (the reference and the fallback).

    engine = Engine(model, vocab)
    codes = engine.generate([prompt_ids], num_tokens=64, cfg=SamplingConfig(cfg_scale=5.0), uncond_ids=[uncond])
"""

from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessor, PreTrainedModel

from llm.vocab import ImageVocab, image_prefix_ids

BACKENDS = ("fused", "hf")
FUSED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
MAX_CACHED_SHAPES = 4  # KV caches / CUDA graphs kept per Engine, keyed by (rows, cache length)
CACHE_ALIGN = 64  # cache lengths are rounded up to this, so prompts of similar length share a cache and a graph
KV_BUCKET = 64  # CUDA-graph decode steps attend the written columns rounded up to this, not the whole cache


@dataclass(frozen=True)
class SamplingConfig:
    """Every setting that changes the sampled codes or the way they are computed.

    Args:
        cfg_scale: classifier-free guidance scale s in u + s (c - u); 1.0 runs no unconditional rows.
        temperature: logits are divided by it; 0 means greedy (argmax).
        top_k: keep the k largest logits (ties at the k-th value kept); 0 turns it off.
        top_p: keep the smallest set of codes whose probability reaches p (argmax always kept); 1.0 turns it off.
        seed: seed of the sampling generator (on the model's device).
        backend: "fused" or "hf" (see the module docstring).
        cuda_graph: capture the fused decode step in a CUDA graph (CUDA only; ignored elsewhere).
        compile: torch.compile the fused decode step (slow to start; pays on CUDA for long runs).
    """

    cfg_scale: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    backend: str = "fused"
    cuda_graph: bool = True
    compile: bool = False

    def __post_init__(self):
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be finite, got {self.cfg_scale}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0 or int(self.top_k) != self.top_k:
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field (write it next to the samples)."""
        return asdict(self)


PRESETS: dict[str, SamplingConfig] = {
    "janus": SamplingConfig(cfg_scale=5.0, temperature=1.0, top_k=0, top_p=1.0),
    "llamagen": SamplingConfig(cfg_scale=7.5, temperature=1.0, top_k=1000, top_p=1.0),
    "greedy": SamplingConfig(cfg_scale=1.0, temperature=0.0),
}


def add_sampling_arguments(parser: argparse.ArgumentParser, seed: int = 0) -> None:
    """The fields of SamplingConfig a command line sets (--cfg-scale --temperature --top-k --top-p --seed
    --compile); read them back with `sampling_from_arguments`."""
    parser.add_argument("--cfg-scale", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays for many images)")


def sampling_from_arguments(args: argparse.Namespace) -> SamplingConfig:
    """The SamplingConfig of options added by `add_sampling_arguments` (ValueError on a bad value)."""
    return SamplingConfig(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, compile=args.compile)


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


def sample_codes(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one index per row of logits (R, K): temperature, then top-k, then top-p (transformers' order); argmax
    when temperature == 0. The draw is an exponential race, argmax_i p_i / E_i with E_i ~ Exp(1) (exactly a
    categorical draw), which never synchronises with the device."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        logits = logits.masked_fill(~top_k_mask(logits, cfg.top_k), float("-inf"))
    if cfg.top_p < 1:
        logits = logits.masked_fill(~top_p_mask(logits, cfg.top_p), float("-inf"))
    probs = logits.softmax(-1)
    race = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    return probs.div_(race.log_().neg_()).argmax(-1)


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


# ----------------------------------------------------------------------------------------------- fused decoder


class KVCache:
    """Preallocated keys and values, per layer (R, kv_heads, L, head_dim), plus the decode step's static inputs
    (tokens, positions, write slot, attention bias) so that a captured CUDA graph can be replayed on them."""

    def __init__(self, layers: int, rows: int, kv_heads: int, length: int, head_dim: int, dtype, device):
        shape = (rows, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = length
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)  # (R, 1)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)  # (R, 1)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the cache column the next token is written to
        self.bias = torch.zeros(rows, 1, 1, length, dtype=dtype, device=device)  # additive: 0 attend, -inf not
        # captured decode steps keyed by (compiled, kv_len): (graph, the logits it writes)
        self.graphs: dict[tuple[bool, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}


class FusedDecoder:
    """Forward of a Llama-family decoder (Qwen3 / Qwen2 / Llama) over a KVCache, on the model's own weights."""

    def __init__(self, model: PreTrainedModel, vocab: ImageVocab):
        config = model.config.get_text_config()
        body = model.get_decoder()
        if config.model_type not in FUSED_MODEL_TYPES or config.hidden_act != "silu" or "sliding_attention" in (
            getattr(config, "layer_types", None) or ()
        ) or "dynamic" in body.rotary_emb.rope_type:
            raise ValueError(
                f"the fused backend supports {FUSED_MODEL_TYPES} with silu MLPs, full attention and static RoPE; "
                f"this model is {config.model_type!r}: use SamplingConfig(backend='hf')"
            )
        if any(p.numel() == 0 for p in model.parameters()):
            raise ValueError("model parameters are partitioned (ZeRO-3?): gather the weights before sampling")
        self.model, self.body, self.vocab = model, body, vocab
        attn = body.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.eps = body.norm.variance_epsilon
        self.qk_norm = hasattr(attn, "q_norm")
        self.param = next(model.parameters())
        # explicit matmuls on CPU, where the SDPA kernel costs ~70 us per call at decode sizes; SDPA elsewhere
        self.matmul_attention = self.param.device.type == "cpu"
        self._sources = [(p, p._version, p.data_ptr()) for p in model.parameters()]
        with torch.no_grad():
            self.layers = [self._fuse(layer) for layer in body.layers]
        self.rope_len = 0

    def stale(self) -> bool:
        """True when a model weight changed since the fused copies were made (in place, or replaced)."""
        return any(p._version != v or p.data_ptr() != ptr for p, v, ptr in self._sources)

    def _fuse(self, layer) -> dict:
        """One layer's weights; q/k/v and gate/up concatenated (copies), the rest views of the parameters."""
        a, m = layer.self_attn, layer.mlp

        def cat(*linears, bias=False):
            tensors = [x.bias if bias else x.weight for x in linears]
            return None if tensors[0] is None else torch.cat([t.detach() for t in tensors])

        def view(t):
            return None if t is None else t.detach()

        out = {
            "norm1": view(layer.input_layernorm.weight), "norm2": view(layer.post_attention_layernorm.weight),
            "qkv": cat(a.q_proj, a.k_proj, a.v_proj), "qkv_bias": cat(a.q_proj, a.k_proj, a.v_proj, bias=True),
            "o": view(a.o_proj.weight), "o_bias": view(a.o_proj.bias),
            "gate_up": cat(m.gate_proj, m.up_proj), "gate_up_bias": cat(m.gate_proj, m.up_proj, bias=True),
            "down": view(m.down_proj.weight), "down_bias": view(m.down_proj.bias),
        }
        if self.qk_norm:  # per-head weights of the q heads then the k heads: (H + Hkv, d)
            out["qk_norm"] = torch.cat([a.q_norm.weight.detach().expand(self.heads, -1),
                                        a.k_norm.weight.detach().expand(self.kv_heads, -1)])
        return out

    @torch.no_grad()
    def ensure_rope(self, length: int) -> bool:
        """Tabulate cos / sin for positions [0, length) (at least max_position_embeddings). True if rebuilt."""
        if length <= self.rope_len:
            return False
        length = max(length, self.body.config.max_position_embeddings)
        positions = torch.arange(length, device=self.param.device)[None]  # (1, L)
        cos, sin = self.body.rotary_emb(self.param, positions)  # (1, L, d) in the model dtype, scaled
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(sin)
        self.cos, self.sin = cos[0], sin[0] * sign  # rotate_half(x) * sin == roll(x, d/2) * (sign * sin)
        self.rope_len = length
        return True

    def code_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head rows (and bias) of the code tokens: (K, h)."""
        head = self.model.get_output_embeddings()
        start, stop = self.vocab.code_range
        bias = head.bias[start:stop] if getattr(head, "bias", None) is not None else None
        return head.weight[start:stop].detach(), bias

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, bias: torch.Tensor,
                cache: KVCache, kv_len: int) -> torch.Tensor:
        """Run T new tokens per row and return the code logits of the last one, (R, K).

        Args:
            ids, positions: (R, T); written to cache columns slot .. slot + T - 1.
            slot: (1,) long tensor, the first cache column written.
            bias: (R, 1, T, >= kv_len) additive attention bias in the model dtype: 0 attend, -inf not.
            cache: the KV cache.
            kv_len: number of cache columns attended (static under CUDA graphs / compile).
        """
        rows, steps = ids.shape
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        groups = heads // kv_heads
        cos = self.cos.index_select(0, positions.flatten()).view(rows, steps, 1, d)
        sin = self.sin.index_select(0, positions.flatten()).view(rows, steps, 1, d)
        columns = slot if steps == 1 else slot + torch.arange(steps, device=ids.device)  # (T,)
        # the query heads of one kv head are folded into the query axis: (R, Hkv, G*T, d) against (R, Hkv, S, d)
        bias = bias[..., :kv_len]
        if steps > 1:  # (R, 1, G*T, S); with one step (R, 1, 1, S) broadcasts over the G queries
            bias = bias.unsqueeze(2).expand(rows, 1, groups, steps, kv_len).reshape(rows, 1, -1, kv_len)
        if self.matmul_attention:  # (R * Hkv, 1 or G*T, S) for baddbmm
            bias = bias.expand(-1, kv_heads, -1, -1).reshape(rows * kv_heads, -1, kv_len)
        x = F.embedding(ids, self.body.embed_tokens.weight)  # (R, T, h)
        for i, w in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), w["norm1"], self.eps)
            qkv = F.linear(h, w["qkv"], w["qkv_bias"]).view(rows, steps, heads + 2 * kv_heads, d)
            qk, v = qkv[:, :, : heads + kv_heads], qkv[:, :, heads + kv_heads :]
            if self.qk_norm:
                qk = F.rms_norm(qk, (d,), None, self.eps) * w["qk_norm"]
            qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)  # RoPE, (R, T, H + Hkv, d)
            cache.keys[i].index_copy_(2, columns, qk[:, :, heads:].transpose(1, 2))
            cache.values[i].index_copy_(2, columns, v.transpose(1, 2))
            q = qk[:, :, :heads].reshape(rows, steps, kv_heads, groups, d).permute(0, 2, 3, 1, 4)
            q = q.reshape(rows, kv_heads, groups * steps, d)
            k_all, v_all = cache.keys[i][:, :, :kv_len], cache.values[i][:, :, :kv_len]
            o = _attention(q, k_all, v_all, bias, self.scale, self.matmul_attention)
            o = o.view(rows, kv_heads, groups, steps, d).permute(0, 3, 1, 2, 4).reshape(rows, steps, heads * d)
            x = _residual_linear(x, o, w["o"], w["o_bias"])
            h = F.rms_norm(x, (x.shape[-1],), w["norm2"], self.eps)
            gate, up = F.linear(h, w["gate_up"], w["gate_up_bias"]).chunk(2, dim=-1)
            x = _residual_linear(x, F.silu(gate) * up, w["down"], w["down_bias"])
        x = F.rms_norm(x[:, -1], (x.shape[-1],), self.body.norm.weight, self.eps)  # (R, h)
        return F.linear(x, *self.code_head())  # (R, K)

    def decode(self, cache: KVCache, kv_len: int) -> torch.Tensor:
        """One decode step on the cache's static inputs; advances positions and slot in place (graph-safe)."""
        cache.bias.index_fill_(-1, cache.slot, 0.0)
        logits = self.forward(cache.tokens, cache.positions, cache.slot, cache.bias, cache, kv_len)
        cache.positions.add_(1)
        cache.slot.add_(1)
        return logits


def attended_columns(written: int, length: int, graphs: bool, compiled: bool) -> int:
    """How many cache columns a decode step reads when `written` of `length` are filled. Eager steps read exactly the
    written ones; CUDA graphs of the eager step come one per KV_BUCKET columns (cheap to capture, and the bytes read
    follow the filled cache); the compiled step reads the whole cache (one shape, one compile: compiling per bucket,
    or with dynamic shapes, costs minutes on a large model)."""
    if compiled:
        return length
    return min(_round_up(written, KV_BUCKET), length) if graphs else written


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _residual_linear(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                     ) -> torch.Tensor:
    """x + h W^T (+ b): without a bias one GEMM whose epilogue adds the residual (addmm), one kernel instead of two."""
    if bias is not None:
        return x + F.linear(h, weight, bias)
    return torch.addmm(x.flatten(0, -2), h.flatten(0, -2), weight.t()).view(x.shape)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
               matmul: bool) -> torch.Tensor:
    """Attention with an additive bias; q (R, Hkv, Q, d), k / v (R, Hkv, S, d); bias (R, 1, Q or 1, S) for SDPA, or
    (R * Hkv, Q or 1, S) for the explicit matmuls (`matmul`)."""
    if not matmul:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    rows, kv_heads, queries, d = q.shape
    scores = torch.baddbmm(bias, q.reshape(-1, queries, d), k.flatten(0, 1).transpose(1, 2), alpha=scale)
    out = scores.float().softmax(-1).to(v.dtype) @ v.flatten(0, 1)  # (R * Hkv, Q, d)
    return out.view(rows, kv_heads, queries, d)


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool (True: may attend) -> additive attention bias, 0 or -inf."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


# ----------------------------------------------------------------------------------------------- engine


class Engine:
    """Samples code grids from a causal LM with an expanded vocabulary. Reuse one Engine across batches: it keeps
    the fused weights, KV caches and CUDA graphs (rebuilt when a model weight changes).

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
        self._compiled = None
        self._graphs_failed = False  # after one failed capture, decode without graphs

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self, prompt_ids_batch: list[list[int]], num_tokens: int, cfg: SamplingConfig,
        uncond_ids: list[list[int]] | None = None, return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sample `num_tokens` codes after each prompt.

        Args:
            prompt_ids_batch: B prompts (token id lists from `build_prompt_ids`, without <|image_start|>).
            num_tokens: codes per image (grid_size ** 2).
            cfg: sampling settings.
            uncond_ids: B unconditional prompts (`unconditional_prompt_ids`), required when cfg.cfg_scale != 1.
            return_logits: also return the guided code logits of every step, (B, N, K) float32.

        Returns:
            codes (B, N) int64 on the model's device (and the logits when asked).
        """
        rows = self._rows(prompt_ids_batch, num_tokens, cfg, uncond_ids)
        batch = len(prompt_ids_batch)
        guided = batch < len(rows)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
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
            drawn = sample_codes(logits, cfg, gen)  # (B,)
            codes[:, t] = drawn
            if t + 1 < num_tokens:
                logits = step(drawn + self.vocab.code_offset)  # the unconditional rows continue with the same code
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
        return [image_prefix_ids(p, self.vocab) for p in prompts]

    # ----- fused backend -------------------------------------------------------------------------------------

    def _fused_session(self, rows, num_tokens, cfg):
        if self.decoder is None or self.decoder.stale():
            self.decoder, self._compiled = FusedDecoder(self.model, self.vocab), None
            self.caches.clear()
        dec = self.decoder
        ids, starts = left_pad(rows, self.vocab.pad_id, self.device)  # (R, P), (R,)
        n_rows, width = ids.shape
        length = _round_up(width + num_tokens, CACHE_ALIGN)
        if dec.ensure_rope(length):
            self.caches.clear()  # captured graphs read the old tables
        cache = self._cache(n_rows, length)
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
                    self._capture(cache, decode, cfg.compile, kv_len)

        cols = torch.arange(width, device=self.device)
        valid = cols[None] >= starts[:, None]  # (R, P) real tokens
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=self.device)  # pad queries see themselves: no NaN rows
        prefill_bias = _bias((causal & valid[:, None, :] | eye)[:, None], dec.param.dtype)  # (R, 1, P, P)
        positions = (cols[None] - starts[:, None]).clamp_min(0)
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        logits = dec.forward(ids, positions, zero, prefill_bias, cache, kv_len=width)
        cache.bias.fill_(float("-inf"))
        cache.bias[:, 0, 0, :width] = _bias(valid, cache.bias.dtype)
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

    def _cache(self, n_rows: int, length: int) -> KVCache:
        key = (n_rows, length)
        if key not in self.caches:
            if len(self.caches) >= MAX_CACHED_SHAPES:
                self.caches.pop(next(iter(self.caches)))
            dec = self.decoder
            self.caches[key] = KVCache(len(dec.layers), n_rows, dec.kv_heads, length, dec.head_dim,
                                       dec.param.dtype, self.device)
        return self.caches[key]

    def _capture(self, cache: KVCache, decode, compiled: bool, kv_len: int) -> None:
        """Capture one decode step attending `kv_len` cache columns, on the cache's static inputs, in a CUDA graph.
        The warm-up runs start at column 0 (each row then attends at least one column, so they write finite values)
        in columns that the prefill overwrites or the mask hides until they are written."""
        cache.slot.zero_()
        cache.positions.zero_()
        try:
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):
                    decode(cache, kv_len)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = decode(cache, kv_len)
            cache.graphs[compiled, kv_len] = (graph, logits)
        except RuntimeError as err:  # capture is an optimisation: fall back to eager steps
            warnings.warn(f"CUDA graph capture failed ({err}); decoding without graphs", stacklevel=3)
            self._graphs_failed = True

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
    cfg: SamplingConfig, uncond_ids: list[list[int]] | None = None, engine: Engine | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample (B, num_tokens) code indices; see `Engine.generate`. Pass an `engine` to reuse caches and graphs
    across calls (one is built per call otherwise).

    Args:
        model: causal LM with the expanded vocabulary.
        vocab: its image vocabulary.
        prompt_ids_batch: B prompts from `build_prompt_ids`.
        num_tokens: codes per image.
        cfg: sampling settings (record `cfg.to_dict()` with the outputs).
        uncond_ids: B unconditional prompts, required when cfg.cfg_scale != 1.
        engine: an Engine built on this model and vocab.
        return_logits: also return the guided code logits of every step, (B, N, K).
    """
    engine = engine or Engine(model, vocab)
    if engine.model is not model or engine.vocab != vocab:
        raise ValueError("engine was built for a different model or vocabulary")
    return engine.generate(prompt_ids_batch, num_tokens, cfg, uncond_ids, return_logits)
