"""The fused decode step of Llama-family decoders (Qwen3, Qwen2, Llama) for the sampler: the model's own weights
(q/k/v and gate/up concatenated, refreshed in place before each use), one preallocated KV cache, RoPE tabulated
once, logits for the code rows of the LM head only, and CUDA graphs of the decode step (one per KV_BUCKET attended
cache columns). About 20 ops per layer instead of ~50 plus transformers' per-call mask and wrapper work.
`llm.sampler.CodeSampler` drives it; nothing here decides which code is drawn.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from llm.vocab import ImageVocab

FUSED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "proportional")  # not dynamic / longrope
KV_BUCKET = 64  # CUDA-graph decode steps attend the written columns rounded up to this, not the whole cache


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


def has_peft_adapters(module: torch.nn.Module) -> bool:
    """Whether peft wrapped any of `module`'s layers (LoRA, trainable tokens): a wrapped layer keeps its original
    as `base_layer`, and reading its weights directly would skip the adapter."""
    return any(hasattr(m, "base_layer") for m in module.modules())


class FusedDecoder:
    """Forward of a Llama-family decoder (Qwen3 / Qwen2 / Llama) over a KVCache, on the model's own weights."""

    def __init__(self, model: PreTrainedModel, vocab: ImageVocab):
        config = model.config.get_text_config()
        body = model.get_decoder()
        rope = getattr(body.rotary_emb, "rope_type", None)
        if config.model_type not in FUSED_MODEL_TYPES or config.hidden_act != "silu" or "sliding_attention" in (
            getattr(config, "layer_types", None) or ()
        ) or rope not in STATIC_ROPE_TYPES:
            raise ValueError(
                f"the fused backend supports {FUSED_MODEL_TYPES} with silu MLPs, full attention and RoPE whose "
                f"frequencies do not depend on the length ({', '.join(STATIC_ROPE_TYPES)}); this model is "
                f"{config.model_type!r} with rope {rope!r}: use SamplingConfig(backend='hf')"
            )
        if has_peft_adapters(model):  # the body's layers or the head the code logits are read from
            raise ValueError("the model holds peft adapters, which the fused backend would not apply: merge them "
                             "first or use SamplingConfig(backend='hf')")
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
        self._storage = [(p, p.data_ptr()) for p in model.parameters()]
        with torch.no_grad():
            self.layers = [self._fuse(layer) for layer in body.layers]
        self.rope_len = 0

    def replaced(self) -> bool:
        """True when a parameter was replaced or moved (new storage): the views and buffers must be rebuilt."""
        return any(p.data_ptr() != ptr for p, ptr in self._storage)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the current weights into the concatenated q/k/v and gate/up buffers, in place (captured CUDA graphs
        keep reading them). Needed before every use: DeepSpeed writes updated weights through `param.data`, which
        bumps no version counter, so no cheap check can tell that they changed."""
        for layer, w in zip(self.body.layers, self.layers):
            for key, tensors in self._sources(layer).items():
                if w[key] is not None:
                    torch.cat([t.detach() for t in tensors], out=w[key])

    def _sources(self, layer) -> dict[str, list[torch.Tensor | None]]:
        """The tensors each concatenated buffer of a layer is made of; with QK-norm, the per-head norm weights of
        the q heads then the k heads, (H + Hkv, d)."""
        a, m = layer.self_attn, layer.mlp
        sources = {
            "qkv": [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight],
            "qkv_bias": [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias],
            "gate_up": [m.gate_proj.weight, m.up_proj.weight],
            "gate_up_bias": [m.gate_proj.bias, m.up_proj.bias],
        }
        if self.qk_norm:
            sources["qk_norm"] = [a.q_norm.weight.expand(self.heads, -1), a.k_norm.weight.expand(self.kv_heads, -1)]
        return sources

    def _fuse(self, layer) -> dict:
        """One layer's weights: q/k/v, gate/up and the QK-norm weights concatenated (copies, see `refresh`), the rest
        views."""
        a, m = layer.self_attn, layer.mlp

        def view(t):
            return None if t is None else t.detach()

        out = {key: None if tensors[0] is None else torch.cat([t.detach() for t in tensors])
               for key, tensors in self._sources(layer).items()}
        out.update({
            "norm1": view(layer.input_layernorm.weight), "norm2": view(layer.post_attention_layernorm.weight),
            "o": view(a.o_proj.weight), "o_bias": view(a.o_proj.bias),
            "down": view(m.down_proj.weight), "down_bias": view(m.down_proj.bias),
        })
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
                cache: KVCache, kv_len: int, every: bool = False) -> torch.Tensor:
        """Run T new tokens per row and return the code logits of the last one, (R, K), or of every one, (R, T, K).

        Args:
            ids, positions: (R, T); written to cache columns slot .. slot + T - 1.
            slot: (1,) long tensor, the first cache column written; or (R, T), each token's own column.
            bias: (R, 1, T, >= kv_len) additive attention bias in the model dtype: 0 attend, -inf not.
            cache: the KV cache.
            kv_len: number of cache columns attended (static under CUDA graphs / compile).
            every: return the logits after every token, not only the last.
        """
        rows, steps = ids.shape
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        groups = heads // kv_heads
        cos = self.cos.index_select(0, positions.flatten()).view(rows, steps, 1, d)
        sin = self.sin.index_select(0, positions.flatten()).view(rows, steps, 1, d)
        per_row = slot.dim() == 2
        columns = slot if steps == 1 or per_row else slot + torch.arange(steps, device=ids.device)  # (T,) / (R, T)
        row = torch.arange(rows, device=ids.device)[:, None] if per_row else None
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
            if per_row:  # keys[i][row, :, columns] is (R, T, Hkv, d), the layout of qk and v
                cache.keys[i][row, :, columns] = qk[:, :, heads:]
                cache.values[i][row, :, columns] = v
            else:
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
        x = F.rms_norm(x if every else x[:, -1], (x.shape[-1],), self.body.norm.weight, self.eps)  # (R, [T,] h)
        return F.linear(x, *self.code_head())  # (R, [T,] K)

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
    return min(round_up(written, KV_BUCKET), length) if graphs else written


def round_up(n: int, multiple: int) -> int:
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


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool (True: may attend) -> additive attention bias, 0 or -inf."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def capture_decode_graph(cache: KVCache, decode: Callable[[KVCache, int], torch.Tensor], compiled: bool,
                         kv_len: int) -> bool:
    """Capture one decode step attending `kv_len` cache columns, on the cache's static inputs, in a CUDA graph kept in
    `cache.graphs`. The warm-up runs start at column 0 (each row then attends at least one column, so they write
    finite values) in columns that the prefill overwrites or the mask hides until they are written. Returns False
    (with a warning) when capture fails; decoding then runs without graphs."""
    device = cache.tokens.device
    cache.slot.zero_()
    cache.positions.zero_()
    try:
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                decode(cache, kv_len)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = decode(cache, kv_len)
        cache.graphs[compiled, kv_len] = (graph, logits)
        return True
    except RuntimeError as err:  # capture is an optimisation: fall back to eager steps
        warnings.warn(f"CUDA graph capture failed ({err}); decoding without graphs", stacklevel=3)
        return False
