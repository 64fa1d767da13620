"""The DeepSpeed engine of a trainer: its JSON built from the config dataclasses (so batch size, precision and ZeRO
stage are defined once), torch AdamW with per-group learning rates, and the warmup + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from common.config import ConfigError, merge_dicts
from common.distributed import unlink_deepspeed_shm


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay from `lr` to `min_lr`; gradient clipping by global norm."""

    lr: float = 3e-4
    min_lr: float = 1e-4
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    grad_clip: float = 1.0


@dataclass
class DeepSpeedConfig:
    """The part of the DeepSpeed JSON a user chooses; the JSON itself is built by `deepspeed_json`.

    Args:
        zero_stage: 0-3. bf16: train in bfloat16 (master weights fp32). micro_batch_size: per GPU/process.
        grad_accum_steps: micro-batches per optimizer step. extra: merged into the JSON last (expert settings).
        compile: torch.compile the trained model through its engine (`engine.compile()`; the first steps are slow).
    """

    zero_stage: int = 2
    bf16: bool = True
    micro_batch_size: int = 32
    grad_accum_steps: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    compile: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the trained weights compute in."""
        return torch.bfloat16 if self.bf16 else torch.float32


def deepspeed_json(ds: DeepSpeedConfig, optim: OptimConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config, derived from the dataclasses so batch size, precision and ZeRO stage live in one place."""
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0-3, got {ds.zero_stage}")
    config = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "train_batch_size": ds.micro_batch_size * ds.grad_accum_steps * world_size,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": ds.bf16},
        "zero_optimization": {"stage": ds.zero_stage, "overlap_comm": torch.cuda.is_available(),
                              "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return merge_dicts(config, ds.extra)


def lr_lambda(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base lr at `step`: linear warmup from 0, then cosine to min_lr / lr at `total_steps`."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    floor = optim.min_lr / optim.lr if optim.lr else 0.0  # lr 0 (frozen run): any multiplier gives 0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(module: torch.nn.Module, groups: list[dict], optim: OptimConfig, total_steps: int,
                 ds_json: dict[str, Any], compile: bool = False) -> Any:
    """A DeepSpeed engine over `module` with torch AdamW (per-group lr; a group's optional "name" labels its logged
    lr) and the warmup-cosine schedule reaching min_lr at `total_steps` of this engine's own steps; `compile`
    torch.compiles the module through the engine."""
    import deepspeed

    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, optim, total_steps))
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_json)
    unlink_deepspeed_shm()
    if compile:
        engine.compile()
    return engine


def learning_rates(engine: Any, label: str = "lr") -> dict[str, float]:
    """The current learning rate of each named parameter group: `label` for the group named "base" (or the first
    unnamed one), `label_<name>` for the others."""
    out: dict[str, float] = {}
    for group in engine.optimizer.param_groups:
        name = group.get("name", "base")
        out.setdefault(label if name == "base" else f"{label}_{name}", float(group["lr"]))
    return out
