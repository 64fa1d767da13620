"""What every trainer shares, part 2: atomic checkpoints, EMA, logging, the non-finite guard, the DeepSpeed engine
and `TrainLoop`, the loop itself (part 1, train/common.py: config, command line, distributed setup, run folder,
schedule, data order).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data.atomic import atomic_write
from tokenizer.config import to_dict
from train.common import (
    DebugConfig,
    DistInfo,
    NonFiniteLossError,
    OptimConfig,
    ResumableBatchSampler,
    RunConfig,
    all_reduce,
    barrier,
    lr_lambda,
)

log = logging.getLogger("vqrae")

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
                 ds_json: dict[str, Any], compile: bool = False) -> Any:
    """A DeepSpeed engine over `module` with torch AdamW (per-group lr) and the warmup-cosine schedule; `compile`
    torch.compiles the module through the engine."""
    import deepspeed

    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, optim, total_steps))
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_json)
    if compile:
        engine.compile()
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
        """Forward one micro-batch: (loss, metrics to log), or None to skip it (e.g. every image was unreadable)."""
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
                                           num_workers=self.run_cfg.num_workers,
                                           pin_memory=self.info.device.type == "cuda")  # for non_blocking copies

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
        """Train until `total_steps` optimizer steps, from wherever `resume()` left the state: micro-steps with the
        non-finite guard and gradient accumulation, logging, samples, checkpoints, then a final checkpoint and
        `finish` (the export)."""
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
                scalars = {k: float(torch.as_tensor(v).detach()) for k, v in metrics.items()}
                scalars |= {"loss": float(loss.detach()), "lr": self.engine.get_lr()[0]}
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
