"""The training loop of the world's foundation models (world/siglip.py, world/lm.py): they stand in for models
pretrained elsewhere (SigLIP2, Qwen3), so a plain single-process PyTorch loop trains them, with the trainers'
AdamW + warmup-cosine schedule (`train.engine.OptimConfig`, `lr_lambda`).

Resumable and reproducible: step s draws its batch from a generator seeded by (seed, s) alone, and every
`ckpt_every` steps the model, the optimizer and the step go to WORK/checkpoint.pt, so a killed run continues where it
stopped and ends with the weights an uninterrupted one has. Losses go to WORK/metrics.jsonl; the finished model's
folder records its settings in pretraining.json (`RECORD`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from common.files import atomic_write
from train.engine import OptimConfig, lr_lambda

log = logging.getLogger("vqrae")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RECORD = "pretraining.json"  # in a pretrained model's folder: how it was made


@dataclass
class PretrainConfig:
    """Args:
    steps: optimizer steps. batch_size: samples per step. seed: seed of the initial weights and of every batch.
    ckpt_every: steps between resumable checkpoints. log_every: steps between logged losses.
    optim: AdamW and its schedule.
    """

    steps: int = 1000
    batch_size: int = 256
    seed: int = 0
    ckpt_every: int = 250
    log_every: int = 50
    optim: OptimConfig = field(default_factory=OptimConfig)


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of step `step`'s batch: a function of (seed, step) alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def pretrain(model: torch.nn.Module, loss_fn: Callable[[torch.Generator], tuple[torch.Tensor, dict[str, float]]],
             cfg: PretrainConfig, work_dir: Path, desc: str, progress: bool = True) -> torch.nn.Module:
    """Train `model` for cfg.steps AdamW steps, resuming from WORK/checkpoint.pt when there is one.

    Args:
        model: the model (fp32, on the CPU), freshly initialised from cfg.seed.
        loss_fn: the step's batch generator -> (loss, metrics to log); draws its batch from the generator only.
        cfg: steps, batch, seed, checkpointing and optimiser.
        work_dir: the run's checkpoint and metrics (created).
        desc: the progress bar's label.
        progress: show a tqdm bar.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.optim.lr, betas=cfg.optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg.optim, cfg.steps))
    start = 0
    checkpoint = work_dir / CHECKPOINT
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
        log.info("%s: resumed at step %d of %d", desc, start, cfg.steps)
    model.train()
    bar = tqdm(range(start, cfg.steps), desc=desc, unit="step", disable=not progress, initial=start, total=cfg.steps)
    began = time.time()
    for step in bar:
        loss, metrics = loss_fn(batch_generator(cfg.seed, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = {"step": done, "loss": loss.item(), **metrics, "lr": sched.get_last_lr()[0],
                   "seconds": round(time.time() - began, 1)}
            with open(work_dir / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if done % cfg.ckpt_every == 0 and done < cfg.steps:
            with atomic_write(checkpoint, "wb") as f:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "step": done}, f)
    return model.eval()
