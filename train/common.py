"""What every trainer shares, part 1: command line + config, distributed setup, the DeepSpeed JSON built from the
config, run folder, learning-rate schedule, resumable data order. Part 2 (train/loop.py): atomic checkpoints, EMA,
logging, the non-finite guard and the training loop itself.

Trainers (train/tokenizer.py, train/ar_gen.py) only wire these together.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import yaml

from data.atomic import atomic_write
from tokenizer.config import ConfigError, apply_overrides, from_dict, reported_errors, to_dict

log = logging.getLogger("vqrae")
T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Config sections shared by trainers


@dataclass
class RunConfig:
    """Args:
    output_dir: run folder (config, checkpoints, exports, samples, TensorBoard); reused by resume.
    steps: optimizer steps to train. seed: global seed (data order, crops, noise).
    log_every / ckpt_every / sample_every: intervals in optimizer steps (0 disables).
    keep_checkpoints: most recent complete checkpoints kept.
    resume: "auto" (latest complete checkpoint in output_dir, else start fresh), "none", or a checkpoint path.
    max_bad_steps: consecutive non-finite-loss micro-steps tolerated before training stops with an error.
    num_workers: DataLoader worker processes per rank. tensorboard / wandb_project: loggers.
    """

    output_dir: str = "runs/default"
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500
    resume: str = "auto"
    max_bad_steps: int = 20
    num_workers: int = 2
    tensorboard: bool = True
    wandb_project: str = ""


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


@dataclass
class DebugConfig:
    """Fault injection for testing the trainers' guards: micro-steps whose loss is replaced by NaN."""

    nan_steps: tuple[int, ...] = ()


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


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `extra`, nested dicts merged key by key (a copy; neither input changes)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_config(cfg_cls: type[T], argv: Sequence[str] | None, default_config: Path, description: str) -> T:
    """`script.py [--config FILE.yaml] [key=value ...]`; no arguments -> `default_config`.

    The yaml holds any subset of the dataclass; `key=value` overrides it. `--local_rank` (DeepSpeed's launcher)
    is accepted and ignored (the rank comes from the environment).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=None, help=f"yaml config (default {default_config})")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.steps=100")
    args = parser.parse_args(argv)
    path = args.config or default_config
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    data = yaml.safe_load(path.read_text()) or {}
    return apply_overrides(from_dict(cfg_cls, data), args.overrides)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite losses."""


def run_entry_point(main: Any) -> None:
    """Run a trainer's main(); expected failures (bad config, missing files, diverged loss) end with one clear
    line on stderr and exit code 2 instead of a traceback."""
    with reported_errors(ConfigError, FileNotFoundError, NonFiniteLossError):
        main()


# ----------------------------------------------------------------------------------------------------------------
# Distributed


@dataclass
class DistInfo:
    """This process's place in the job: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU). Works under the `deepspeed`
    launcher, torchrun, and plain `python` (a one-process group is set up)."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not cuda:  # CPU processes on one machine share its cores; oversubscribed OpenMP threads stall each other
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce(value: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce when a process group exists; returns the tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=op)
    return value


def is_rank_zero() -> bool:
    """True in rank 0 of the process group, and in a process without one."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def setup_logging(info: DistInfo) -> None:
    level = logging.INFO if info.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{info.rank}] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------------------------------------
# Run folder


def git_sha() -> str:
    """HEAD of the repository, with "-dirty" when the tree has uncommitted changes; "unknown" outside git."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False)

    try:
        head, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def prepare_run_dir(cfg: Any, output_dir: Path, info: DistInfo) -> None:
    """Write the resolved config and run metadata (git SHA, command, world size) to the run folder (rank 0)."""
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(output_dir / "config.yaml") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        meta = {"git_sha": git_sha(), "argv": sys.argv, "world_size": info.world_size,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__}
        with atomic_write(output_dir / "run.json") as f:
            json.dump(meta, f, indent=2)
    barrier()


# ----------------------------------------------------------------------------------------------------------------
# Schedule, data order


def lr_lambda(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base lr at `step`: linear warmup from 0, then cosine to min_lr / lr at `total_steps`."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    floor = optim.min_lr / optim.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Micro-batches of dataset indices for one rank, in an order fixed by (seed, epoch), starting anywhere.

    Epoch e is a permutation of range(n) seeded by seed + e, cut into global batches of micro_batch * world_size;
    rank r takes its slice of each. The stream is infinite (epochs follow each other), and `start` skips that many
    of this rank's micro-batches, so a resumed run reads exactly what the uninterrupted run would have read.
    """

    def __init__(self, n: int, micro_batch: int, rank: int, world_size: int, seed: int, start: int = 0,
                 dataset: Any = None):
        if n < micro_batch * world_size:
            raise ConfigError(f"dataset of {n} samples is smaller than one global batch ({micro_batch} x {world_size})")
        self.n, self.micro_batch, self.rank, self.world = n, micro_batch, rank, world_size
        self.seed, self.start, self.dataset = seed, start, dataset
        self.per_epoch = n // (micro_batch * world_size)  # micro-batches per rank per epoch (remainder dropped)

    def __len__(self) -> int:
        return 1 << 62

    def batches(self) -> Iterator[tuple[int, list[int]]]:
        """(epoch, indices) for every micro-batch of this rank from `start` on."""
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for b in range(offset, self.per_epoch):
                lo = (b * self.world + self.rank) * self.micro_batch
                yield epoch, perm[lo : lo + self.micro_batch]
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        for epoch, indices in self.batches():
            yield [(epoch, i) for i in indices]
