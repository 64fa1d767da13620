"""`TrainLoop`, the loop every trainer runs: resumable data stream, non-finite guard, gradient accumulation,
logging, periodic samples, atomic checkpoints and resume, then a final checkpoint and the export. A trainer
subclasses it and fills in the hooks; everything else it needs is in the modules of this package."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.config import ConfigError
from common.distributed import DistInfo, all_reduce, barrier, init_distributed, setup_logging, shutdown
from train.checkpoint import Checkpointer
from train.config import DebugConfig, RunConfig, parse_config
from train.data_order import resumable_loader
from train.engine import learning_rates
from train.guard import NonFiniteGuard
from train.run_folder import MetricLogger, sample_log, truncate_metrics

log = logging.getLogger("vqrae")


class TrainLoop:
    """The loop every trainer shares: resumable data stream, non-finite guard, gradient accumulation, logging,
    periodic samples and atomic checkpoints, resume, and a final checkpoint + export.

    A subclass sets `self.engine` (the main DeepSpeed engine), `self.engines` (all engines to checkpoint) and
    `self.loader` (built with `start=self.state["micro_batches"]`, so call `self.resume()` first), and implements
    `micro_step(batch) -> (loss, metrics)` (forward only; None skips the batch, on every rank when on one). Optional
    hooks: `after_backward`, `after_step`, `write_samples`, `checkpoint_files`, `load_checkpoint_files`,
    `extra_state`, `skip_counts`, `finish`.

    Skip counts (`skip_counts`) are kept per rank and logged, checkpointed and reported as sums over the ranks; a
    resumed run gives the checkpoint's sums to rank 0 and starts the others from 0.
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
        """Forward one micro-batch: (loss, metrics to log), or None to skip it (e.g. every image was unreadable); a
        skip on one rank skips the micro-step on every rank, so under ZeRO-3 (whose forward gathers parameters
        collectively) a trainer must run a forward on every rank instead (a row with nothing supervised)."""
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
        """json-able state saved with every checkpoint (restored into self.state); called on every rank."""
        return {}

    def skip_counts(self) -> dict[str, int]:
        """This rank's counts of what it skipped, by name (the same names on every rank)."""
        return {"skipped_images": self.state["skipped_images"]}

    def summed_skip_counts(self) -> dict[str, int]:
        """`skip_counts` summed over the ranks (collective: every rank calls it)."""
        local = self.skip_counts()
        names = sorted(local)
        totals = all_reduce(torch.tensor([local[n] for n in names], dtype=torch.float64, device=self.info.device))
        return {n: int(v) for n, v in zip(names, totals.tolist())}

    def finish(self, checkpoint: Path) -> None:
        """After the final checkpoint (every rank), e.g. export on rank 0."""

    # loop -----------------------------------------------------------------------------------------------------
    def make_loader(self, dataset: Any, collate_fn: Any, micro_batch_size: int) -> torch.utils.data.DataLoader:
        """This rank's endless, resumable stream of micro-batches of `dataset` (call after `resume`)."""
        return resumable_loader(dataset, collate_fn, micro_batch_size, self.info, self.run_cfg.seed,
                                start=self.state["micro_batches"], num_workers=self.run_cfg.num_workers)

    def learning_rates(self) -> dict[str, float]:
        """The logged learning rates: every named group of the main engine ("lr", "lr_<group>") and the first group
        of every other engine ("lr_<engine>")."""
        out = learning_rates(self.engine)
        for name, engine in self.engines.items():
            if engine is not self.engine:
                out[f"lr_{name}"] = float(engine.optimizer.param_groups[0]["lr"])
        return out

    def resume(self) -> None:
        """Load the checkpoint chosen by run.resume (engines, extra files, counters); call before building the
        data loader."""
        path = self.checkpointer.resolve(self.run_cfg.resume)
        if path is None:
            return
        self.state.update(self.checkpointer.load(path, self.engines))
        if not self.info.is_main:  # the checkpoint holds sums over the ranks: rank 0 carries them on
            self.state["skipped_images"] = 0
        self.load_checkpoint_files(path)
        log.info("resumed from %s (step %d)", path, self.state["step"])
        if self.info.is_main:
            truncate_metrics(self.out_dir / "metrics.jsonl", self.state["step"])

    def save(self) -> Path:
        summed = {"skipped_images": self.summed_skip_counts()["skipped_images"]}
        return self.checkpointer.save(self.state["step"], self.engines,
                                      {**self.state, **self.extra_state(), **summed}, self.checkpoint_files())

    def fit(self, total_steps: int, config: Any = None) -> None:
        """Train until `total_steps` optimizer steps, from wherever `resume()` left the state: micro-steps with the
        non-finite guard and gradient accumulation, logging, samples, checkpoints, then a final checkpoint and
        `finish` (the export)."""
        st, run = self.state, self.run_cfg
        guard = NonFiniteGuard(run.max_bad_steps, st["skipped_nonfinite"])
        logger = MetricLogger(self.out_dir, self.info, total_steps, st["step"], run.tensorboard, run.wandb_project,
                              config)
        good_micro, data = 0, iter(self.loader)
        seen = sample_log(self.out_dir, self.info.rank, st["micro_batches"]) if self.debug.sample_log else None
        try:
            while st["step"] < total_steps:
                batch = next(data)
                st["micro_batches"] += 1
                if seen is not None:
                    if "indices" not in batch:
                        raise ConfigError("debug.sample_log needs batches that carry dataset indices (image trainers)")
                    seen.write(" ".join(map(str, batch["indices"].tolist())) + "\n")
                    seen.flush()
                st["skipped_images"] += batch.get("skipped", 0)
                result = self.micro_step(batch)
                skipped = all_reduce(torch.tensor([float(result is None)], device=self.info.device),
                                     dist.ReduceOp.MAX)
                if skipped.item():  # on any rank: every rank skips it, so all stay in step
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
                scalars |= {"loss": float(loss.detach()), **self.learning_rates()}
                logger.advance(1, {k: scalars[k] for k in ("loss", "code_usage") if k in scalars})
                if run.log_every and step % run.log_every == 0:
                    logger.log(step, scalars | self.summed_skip_counts() | {"skipped_nonfinite": guard.skipped})
                if run.sample_every and step % run.sample_every == 0:
                    self.write_samples(step)
                if run.ckpt_every and step % run.ckpt_every == 0:
                    self.save()
                if step == self.debug.kill_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            logger.close()
            if seen is not None:
                seen.close()
        latest = self.checkpointer.latest()
        if latest is None or latest.name != f"step_{st['step']:08d}":
            latest = self.save()
        self.finish(latest)
        barrier()
        log.info("done: step %d (skipped %d unreadable images, %d non-finite micro-steps)", st["step"],
                 self.summed_skip_counts()["skipped_images"], guard.skipped)


def run_trainer(trainer: type[TrainLoop], cfg_cls: type, default_config: Path, description: str,
                argv: list[str] | None = None) -> None:
    """A trainer's whole main(): the command line (`train.config.parse_config`), the process group (one is set up
    under plain python), rank-tagged logging, the global seed, then `trainer(cfg, info).fit(cfg.run.steps, cfg)`;
    a finished run leaves the process group before the interpreter exits (its communication threads, torn down by
    interpreter exit instead, can abort a finished multi-process run: "terminate called without an active
    exception", exit status 250, seen once in the two-process ZeRO-3 test)."""
    cfg = parse_config(cfg_cls, argv, default_config, description)
    info = init_distributed(always=True)
    setup_logging(info)
    torch.manual_seed(cfg.run.seed)
    trainer(cfg, info).fit(cfg.run.steps, cfg)
    shutdown()
