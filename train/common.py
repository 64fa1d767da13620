"""What every trainer shares: command line + config, distributed setup, the DeepSpeed JSON built from the config,
run folder, learning-rate schedule, resumable data order, atomic checkpoints, EMA, logging, non-finite guard.

Trainers (train/tokenizer.py, train/ar_gen.py) only wire these together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
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
    """

    zero_stage: int = 2
    bf16: bool = True
    micro_batch_size: int = 32
    grad_accum_steps: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


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
    return _merge(config, ds.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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


def run_entry_point(main: Any) -> None:
    """Run a trainer's main(); expected failures (bad config, missing files, diverged loss) end with one clear
    line on stderr and exit code 2 instead of a traceback."""
    with reported_errors(ConfigError, FileNotFoundError, NonFiniteLossError):
        main()


# ----------------------------------------------------------------------------------------------------------------
# Distributed


@dataclass
class DistInfo:
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


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def is_checkpoint(path: Path) -> bool:
    """A complete checkpoint folder: its trainer_state.json is written last."""
    return (path / "trainer_state.json").is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints/step_* folders of a run folder, oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*") if is_checkpoint(p))


class Checkpointer:
    """Atomic checkpoints in output_dir/checkpoints/step_XXXXXXXX.

    Every rank writes its DeepSpeed shards into a temporary folder; after a barrier rank 0 writes trainer_state.json
    and renames the folder, so a folder named step_* is always complete. `latest()` ignores anything else.
    """

    def __init__(self, output_dir: Path, info: DistInfo, keep: int):
        self.output_dir, self.root = output_dir, output_dir / "checkpoints"
        self.info, self.keep = info, keep

    def latest(self) -> Path | None:
        done = complete_checkpoints(self.output_dir)
        return done[-1] if done else None

    def save(self, step: int, engines: dict[str, Any], state: dict[str, Any],
             files: dict[str, Any] | None = None) -> Path:
        """Args: engines: name -> DeepSpeed engine (collective: every rank calls this); state: json-able trainer
        state; files: name -> callable(path) run on rank 0 to write extra files (e.g. EMA weights)."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(tmp), tag=name)
        barrier()
        if self.info.is_main:
            for name, write in (files or {}).items():
                write(tmp / name)
            with atomic_write(tmp / "trainer_state.json") as f:
                json.dump({**state, "step": step}, f, indent=2)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = complete_checkpoints(self.output_dir)
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from for `run.resume` ("auto", "none", or a path)."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not is_checkpoint(path):
            raise FileNotFoundError(f"run.resume={resume}: not a complete checkpoint (no trainer_state.json)")
        return path

    @staticmethod
    def load(path: Path, engines: dict[str, Any]) -> dict[str, Any]:
        """Load every engine's shards (model, optimizer, scheduler) and return the trainer state."""
        for name, engine in engines.items():
            load_path, _ = engine.load_checkpoint(str(path), tag=name)
            if load_path is None:
                raise FileNotFoundError(f"checkpoint {path} has no DeepSpeed state for '{name}'")
        return json.loads((path / "trainer_state.json").read_text())


def consolidated_state_dict(checkpoint: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 module state dict of engine `tag` in a checkpoint folder, on CPU, whatever the ZeRO stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = checkpoint / tag
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} has no '{tag}' folder")
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):  # ZeRO 1-3: fp32 master weights live in the shards
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
    module = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


# ----------------------------------------------------------------------------------------------------------------
# EMA, logging, guards


class EMA:
    """fp32 exponential moving average of named parameters: shadow = d * shadow + (1 - d) * param, with the usual
    warmup d = min(decay, (1 + step) / (10 + step)) so that short runs are not dominated by their first weights.

    Build it before `deepspeed.initialize` (it copies the fp32 weights); set `zero3` afterwards so updates gather the
    partitioned parameters.
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float, zero3: bool = False):
        self.decay, self.zero3 = decay, zero3
        self.params = named_params
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        context = contextlib.nullcontext()
        if self.zero3:
            import deepspeed

            context = deepspeed.zero.GatheredParameters(list(self.params.values()), modifier_rank=None)
        with context:
            for k, p in self.params.items():
                self.shadow[k].lerp_(p.detach().float(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}...")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])


class MetricLogger:
    """Rank-0 logging to a tqdm bar, TensorBoard (optional), W&B (optional) and metrics.jsonl in the run folder."""

    def __init__(self, output_dir: Path, info: DistInfo, total_steps: int, start_step: int, tensorboard: bool,
                 wandb_project: str = "", config: Any = None):
        self.enabled = info.is_main
        self.bar = self.tb = self.wandb = None
        self.jsonl = output_dir / "metrics.jsonl"
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tb"))
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=str(output_dir), config=to_dict(config), resume="allow")

    def advance(self, steps: int = 1, postfix: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def build_engine(module: torch.nn.Module, groups: list[dict], optim: OptimConfig, total_steps: int,
                 ds_json: dict[str, Any]) -> Any:
    """A DeepSpeed engine over `module` with torch AdamW (per-group lr) and the warmup-cosine schedule."""
    import deepspeed

    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, optim, total_steps))
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_json)
    return engine


class TrainLoop:
    """The loop every trainer shares: resumable data stream, non-finite guard, gradient accumulation, logging,
    periodic samples and atomic checkpoints, resume, and a final checkpoint + export.

    A subclass sets `self.engine` (the main DeepSpeed engine), `self.engines` (all engines to checkpoint) and
    `self.loader` (built with `start=self.state["micro_batches"]`, so call `self.resume()` first), and implements
    `micro_step(batch) -> (loss, metrics)` (forward only; None skips the batch). Optional hooks:
    `after_backward`, `after_step`, `write_samples`, `checkpoint_files`, `load_checkpoint_files`, `extra_state`,
    `finish`.
    """

    def __init__(self, run: RunConfig, debug: DebugConfig, grad_accum_steps: int, info: DistInfo):
        self.run_cfg, self.debug, self.grad_accum, self.info = run, debug, grad_accum_steps, info
        self.out_dir = Path(run.output_dir)
        self.checkpointer = Checkpointer(self.out_dir, info, run.keep_checkpoints)
        self.state: dict[str, Any] = {"step": 0, "micro_batches": 0, "attempts": 0, "skipped_images": 0,
                                      "skipped_nonfinite": 0}
        self.engine: Any = None
        self.engines: dict[str, Any] = {}
        self.loader: Any = None

    # hooks ----------------------------------------------------------------------------------------------------
    def micro_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]] | None:
        raise NotImplementedError

    def after_backward(self, batch: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Runs after every successful micro-step's backward and engine.step (e.g. a discriminator update)."""

    def after_step(self, step: int) -> None:
        """Runs after every optimizer step (e.g. an EMA update)."""

    def write_samples(self, step: int) -> None:
        """Every run.sample_every steps, on every rank (ZeRO-3 forwards are collective)."""

    def checkpoint_files(self) -> dict[str, Any]:
        """name -> callable(path) writing extra files into a checkpoint (rank 0)."""
        return {}

    def load_checkpoint_files(self, path: Path) -> None:
        """Read what `checkpoint_files` wrote."""

    def extra_state(self) -> dict[str, Any]:
        """json-able state saved with every checkpoint (restored into self.state)."""
        return {}

    def finish(self, checkpoint: Path) -> None:
        """After the final checkpoint (every rank), e.g. export on rank 0."""

    # loop -----------------------------------------------------------------------------------------------------
    def make_loader(self, dataset: Any, collate_fn: Any, micro_batch_size: int) -> torch.utils.data.DataLoader:
        """This rank's endless, resumable stream of micro-batches of `dataset` (call after `resume`)."""
        sampler = ResumableBatchSampler(len(dataset), micro_batch_size, self.info.rank, self.info.world_size,
                                        self.run_cfg.seed, start=self.state["micro_batches"])
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                           num_workers=self.run_cfg.num_workers)

    def resume(self) -> None:
        """Load the checkpoint chosen by run.resume (engines, extra files, counters); call before building the
        data loader."""
        path = self.checkpointer.resolve(self.run_cfg.resume)
        if path is None:
            return
        self.state.update(Checkpointer.load(path, self.engines))
        self.load_checkpoint_files(path)
        log.info("resumed from %s (step %d)", path, self.state["step"])
        if self.info.is_main:
            truncate_metrics(self.out_dir / "metrics.jsonl", self.state["step"])

    def save(self) -> Path:
        return self.checkpointer.save(self.state["step"], self.engines, {**self.state, **self.extra_state()},
                                      self.checkpoint_files())

    def fit(self, total_steps: int, config: Any = None) -> None:
        st, run = self.state, self.run_cfg
        guard = NonFiniteGuard(run.max_bad_steps, st["skipped_nonfinite"])
        logger = MetricLogger(self.out_dir, self.info, total_steps, st["step"], run.tensorboard, run.wandb_project,
                              config)
        good_micro, data = 0, iter(self.loader)
        try:
            while st["step"] < total_steps:
                batch = next(data)
                st["micro_batches"] += 1
                st["skipped_images"] += batch.get("skipped", 0)
                result = self.micro_step(batch)
                if result is None:
                    continue
                loss, metrics = result
                st["attempts"] += 1
                if st["attempts"] in self.debug.nan_steps:
                    loss = loss * float("nan")
                ok = guard.ok(loss)
                st["skipped_nonfinite"] = guard.skipped
                if not ok:
                    continue
                self.engine.backward(loss)
                self.engine.step()
                self.after_backward(batch, metrics)
                good_micro += 1
                if good_micro % self.grad_accum:
                    continue
                st["step"] += 1
                step = st["step"]
                self.after_step(step)
                scalars = {k: float(v) for k, v in metrics.items()} | {"loss": float(loss.detach()),
                                                                       "lr": self.engine.get_lr()[0]}
                logger.advance(1, {k: scalars[k] for k in ("loss", "code_usage") if k in scalars})
                if run.log_every and step % run.log_every == 0:
                    logger.log(step, scalars | {"skipped_images": st["skipped_images"],
                                                "skipped_nonfinite": guard.skipped})
                if run.sample_every and step % run.sample_every == 0:
                    self.write_samples(step)
                if run.ckpt_every and step % run.ckpt_every == 0:
                    self.save()
        finally:
            logger.close()
        latest = self.checkpointer.latest()
        if latest is None or latest.name != f"step_{st['step']:08d}":
            latest = self.save()
        self.finish(latest)
        barrier()
        log.info("done: step %d (skipped %d unreadable images, %d non-finite micro-steps)", st["step"],
                 st["skipped_images"], guard.skipped)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines logged after `step` (by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
    with atomic_write(path) as f:
        f.writelines(lines)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite losses."""


class NonFiniteGuard:
    """Decides, identically on every rank, whether a micro-step's loss is finite; counts skips; raises after
    `max_consecutive` non-finite micro-steps in a row."""

    def __init__(self, max_consecutive: int, skipped: int = 0):
        self.max_consecutive, self.skipped, self.consecutive = max_consecutive, skipped, 0

    def ok(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach().float()).all().to(torch.float32).reshape(1)
        finite = all_reduce(finite, dist.ReduceOp.MIN)
        if bool(finite.item()):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            raise NonFiniteLossError(
                f"loss was non-finite for {self.consecutive} consecutive micro-steps ({self.skipped} in total); "
                "lower the learning rate, check the data, or raise run.max_bad_steps"
            )
        log.warning("non-finite loss: micro-step skipped (%d skipped so far)", self.skipped)
        return False
