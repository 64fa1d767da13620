"""Speculative Jacobi decoding (SamplingConfig.spec_window > 0; Teng et al. 2024, "Accelerating Auto-regressive
Text-to-Image Generation with Training-free Speculative Jacobi Decoding"), on both backends: each image carries a window
of draft codes, each drawn from a recorded proposal distribution q (at first `spec_init`, then the model's own
prediction for that position from the previous forward); one forward runs the conditional and unconditional rows over
every image's window; draft j is accepted when u < p(d_j) / q(d_j) against the guided, filtered target p of that
position (CFG, temperature, top-k, top-p exactly as the one-code step), in order, and the first rejected one is
redrawn from the residual max(0, p - q) (after a fully accepted window, one more code from p). Every accepted code is
therefore distributed exactly as the one-code sampler's; temperature 0 makes p and q one-hot and gives the one-code
path's codes. The draws come from each image's own stream (seed, image id), a fixed number per iteration of that
image, so an image's codes do not depend on its batch. The cache keeps the columns every image has accepted; each
forward runs each image's window at that image's own cache columns (the fused backend; the transformers backend, whose
cache has one length, re-feeds from the slowest image's codes), eagerly (no CUDA graphs).

    codes = CodeSampler(model, vocab).generate(prompts, 256, SamplingConfig(cfg_scale=5.0, spec_window=16), uncond)
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from llm.fused import attention_bias, round_up
from llm.sampler import (
    CACHE_ALIGN,
    CodeSampler,
    SamplingConfig,
    apply_cfg,
    image_stream,
    inverse_cdf,
    left_pad,
    open_uniforms,
    restrict_to_codes,
    target_probs,
)

JACOBI_STREAM = 1  # the speculative draws of an image: SeedSequence((IMAGE_STREAM, seed, image, JACOBI_STREAM))


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor, accept_u: torch.Tensor,
           draw_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule over each image's window of drafts: draft j (drawn from q[:, j]) is accepted
    when u_j q_j(d_j) < p_j(d_j), in order, until the first rejection; the code after the accepted ones is drawn from
    the residual max(0, p - q) at the rejected position, or from p after a fully accepted window (q taken as 0 there).

    Args:
        p: (B, W + 1, K) target distributions of the window's positions and the one after it.
        q, drafts: (B, W, K) proposal distributions and (B, W) the drafts drawn from them.
        lengths: (B,) drafts that count per image (the rest lie past the image's last code).
        accept_u, draw_u: (B, W) and (B,) uniforms in (0, 1).

    Returns:
        (taken, drawn): (B,) drafts accepted and the code drawn after them.
    """
    size = p.shape[-1]
    window = drafts.shape[1]
    ratio_ok = accept_u * q.gather(-1, drafts[..., None]).squeeze(-1) < p[:, :window].gather(
        -1, drafts[..., None]).squeeze(-1)
    counted = torch.arange(window, device=drafts.device)[None] < lengths[:, None]
    taken = (ratio_ok & counted).long().cumprod(1).sum(1)  # (B,)
    at = taken[:, None, None].expand(-1, 1, size)
    rejected_q = q.gather(1, at.clamp(max=window - 1)).squeeze(1) * (taken < lengths)[:, None]
    target = p.gather(1, at).squeeze(1)
    residual = (target - rejected_q).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target)
    return taken, inverse_cdf(residual, draw_u)


def jacobi_generate(sampler: CodeSampler, rows: list[list[int]], batch: int, num_tokens: int, cfg: SamplingConfig,
                    image_ids: list[int], return_logits: bool):
    """`CodeSampler.generate` with cfg.spec_window > 0: `rows` its validated conditional then unconditional model
    inputs (`CodeSampler._rows`), `batch` the number of images."""
    vocab, device, window = sampler.vocab, sampler.device, cfg.spec_window
    size, offset = vocab.codebook_size, vocab.code_offset
    opened = fused_windows if cfg.backend == "fused" else hf_windows
    forward, prefilled = opened(sampler, rows, num_tokens, window)
    streams = [image_stream(cfg.seed, image, JACOBI_STREAM) for image in image_ids]
    # seq[b, 1 + i]: code i of image b as a vocabulary id after <|image_start|>; column N + 1 takes the writes
    # of positions past the end
    seq = torch.full((batch, num_tokens + 2), vocab.image_start_id, dtype=torch.long, device=device)
    trace = torch.zeros(batch, num_tokens + 2, size, device=device) if return_logits else None
    done = torch.zeros(batch, dtype=torch.long, device=device)  # codes accepted per image
    uniform = torch.full((size,), 1.0 / size, device=device)
    proposals = uniform.expand(batch, window, size)  # q of each draft
    drafts = inverse_cdf(proposals, draws(streams, range(batch), window, device))
    steps = torch.arange(window + 1, device=device)
    sampler.forwards = int(prefilled)
    accepted = [0] * batch
    groups = len(rows) // batch  # 2 with CFG: the unconditional rows run the same windows
    while active := [b for b in range(batch) if accepted[b] < num_tokens]:
        lengths = (num_tokens - done).clamp(max=window)  # drafts each image verifies
        # each image's window: its last code (or <|image_start|>), then its drafts; column j predicts code done + j
        tokens = torch.cat([seq.gather(1, done[:, None]), drafts + offset], 1)
        real = steps[None] <= lengths[:, None]
        tokens = tokens.masked_fill(~real, vocab.pad_id)
        logits = forward(done.repeat(groups), tokens.repeat(groups, 1), real.repeat(groups, 1), seq, active)
        sampler.forwards += 1
        logits = logits.float()
        if groups > 1:
            logits = apply_cfg(logits[:batch], logits[batch:], cfg.cfg_scale)  # (B, window + 1, K)
        p = target_probs(logits, cfg)

        u = draws(streams, active, 2 * window + 1, device)
        taken, drawn = verify(p, proposals, drafts, lengths, u[:, :window], u[:, window])
        position = done[:, None] + steps
        keep = (steps[None] <= taken[:, None]) & (position < num_tokens)
        column = torch.where(keep, position + 1, num_tokens + 1)
        values = torch.cat([drafts, drawn[:, None]], 1).scatter(1, taken[:, None], drawn[:, None])
        seq.scatter_(1, column, values + offset)
        if trace is not None:
            trace.scatter_(1, column[..., None].expand(-1, -1, size), logits)

        # the next window: the model's prediction where this forward made one, else the initial proposal
        new_done = (done + taken + 1).clamp(max=num_tokens)
        ahead = new_done[:, None] - done[:, None] + steps[:window]  # window column predicting each new draft
        if cfg.spec_init == "uniform":
            initial = uniform.expand(batch, window, size)
        else:  # the prediction past the last draft
            initial = p.gather(1, lengths[:, None, None].expand(-1, 1, size)).expand(-1, window, -1)
        predicted = p.gather(1, ahead.clamp(max=window)[..., None].expand(-1, -1, size))
        proposals = torch.where((ahead <= lengths[:, None])[..., None], predicted, initial)
        drafts = inverse_cdf(proposals, u[:, window + 1 :])
        done = new_done
        accepted = done.tolist()
    codes = seq[:, 1 : num_tokens + 1] - offset
    return (codes, trace[:, 1 : num_tokens + 1]) if return_logits else codes

def draws(streams: list[np.random.Generator], images, n: int, device: torch.device) -> torch.Tensor:
    """(B, n) uniforms: n fresh draws from each listed image's stream, zeros for the others."""
    out = np.zeros((len(streams), n))
    for b in images:
        out[b] = open_uniforms(streams[b], n)
    return torch.from_numpy(out).to(device)

def prompt_columns(sampler: CodeSampler, rows: list[list[int]], extra: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts (R, P), their first real columns (R,), and which of P + `extra` cache columns hold
    real tokens (the prompt's, then every code column)."""
    ids, starts = left_pad(rows, sampler.vocab.pad_id, sampler.device)
    valid = torch.cat([torch.arange(ids.shape[1], device=sampler.device)[None] >= starts[:, None],
                       torch.ones(len(ids), extra, dtype=torch.bool, device=sampler.device)], 1)
    return ids, starts, valid

def fused_windows(sampler: CodeSampler, rows: list[list[int]], num_tokens: int, window: int):
    """(forward, prefilled) for speculative decoding on the fused decoder: the prompts but their last token
    (<|image_start|>) prefilled; forward(done, tokens, real, seq, active) runs each row's window of W + 1 tokens
    (R, W + 1) after its `done` accepted codes, at its own cache columns (stale columns past them masked), and
    returns the code logits after each token, (R, W + 1, K); `real` False marks a padding token that nothing
    attends to. `seq` and `active` are unused here."""
    dec = sampler.fused_decoder()
    ids, starts, valid = prompt_columns(sampler, rows, num_tokens + window + 1)
    n_rows, width = ids.shape
    length = round_up(width + num_tokens + window + 1, CACHE_ALIGN)
    if dec.ensure_rope(length):
        sampler.caches.clear()
    cache = sampler.kv_cache(n_rows, length)

    def run(first: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Tokens (R, T) at columns first + 0 .. T - 1 of each row, attending its real columns below `first`."""
        steps = tokens.shape[1]
        index = torch.arange(steps, device=sampler.device)
        kv_len = int(first.max()) + steps
        offset = torch.arange(kv_len, device=sampler.device)[None] - first[:, None]  # (R, S): column - first
        window_real = real.gather(1, offset.clamp(0, steps - 1)) & (offset >= 0)  # a real window column
        allowed = (((offset < 0) & valid[:, :kv_len])[:, None]  # (R, T, S)
                   | window_real[:, None] & (offset[:, None] <= index[None, :, None])
                   | (offset[:, None] == index[None, :, None]))
        positions = (first[:, None] + index[None] - starts[:, None]).clamp_min(0)
        return dec.forward(tokens, positions, first[:, None] + index[None],
                           attention_bias(allowed[:, None], dec.param.dtype), cache, kv_len=kv_len, every=True)

    def forward(done, tokens, real, seq, active) -> torch.Tensor:
        return run(width - 1 + done, tokens, real)

    if width > 1:
        run(torch.zeros(n_rows, dtype=torch.long, device=sampler.device), ids[:, :-1], valid[:, : width - 1])
    return forward, width > 1

def hf_windows(sampler: CodeSampler, rows: list[list[int]], num_tokens: int, window: int):
    """`fused_windows` on the transformers model: its DynamicCache holds one length for every row, so it is cut
    back to the codes every active image has accepted, and an image ahead of the slowest feeds its further
    accepted codes again before its window."""
    ids, starts, valid = prompt_columns(sampler, rows, num_tokens)
    n_rows, width = ids.shape
    cache = DynamicCache(config=sampler.model.config)

    def run(column: int, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        if cache.get_seq_length() > column:
            cache.crop(column - cache.get_seq_length())  # the number of columns to drop, negated
        positions = (column + torch.arange(tokens.shape[1], device=sampler.device)[None] - starts[:, None])
        out = sampler.model(input_ids=tokens, attention_mask=torch.cat([valid[:, :column], real], 1).long(),
                         position_ids=positions.clamp_min(0), cache=cache, use_cache=True)
        return restrict_to_codes(out.logits, sampler.vocab)

    def forward(done, tokens, real, seq, active) -> torch.Tensor:
        groups = len(done) // len(seq)
        low = int(done[active].min())  # every active image has accepted this many codes
        lengths = real.sum(1)  # window tokens per row
        fed = done - low + lengths  # its accepted codes from `low` - 1 on, then its drafts
        steps = int(fed[active].max())
        position = low - 1 + torch.arange(steps, device=sampler.device)  # code index each column holds
        from_seq = position[None] < done[:, None]
        j = (position[None] - done[:, None] + 1).clamp(0, tokens.shape[1] - 1)  # its window column
        fed_tokens = torch.where(from_seq, seq.repeat(groups, 1)[:, (position + 1).clamp(max=seq.shape[1] - 1)],
                                 tokens.gather(1, j))
        fed_real = from_seq | (real.gather(1, j) & (position[None] >= done[:, None] - 1))
        logits = run(width - 1 + low, fed_tokens.masked_fill(~fed_real, sampler.vocab.pad_id), fed_real)
        at = (done - low)[:, None] + torch.arange(tokens.shape[1], device=sampler.device)
        return logits.gather(1, at.clamp(max=steps - 1)[..., None].expand(-1, -1, logits.shape[-1]))

    if width > 1:
        run(0, ids[:, :-1], valid[:, : width - 1])
    return forward, width > 1
