"""The run folder: the resolved config and run metadata written once, and the metrics every rank-0 step logs
(a tqdm bar, metrics.jsonl, TensorBoard, optionally W&B)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from common.config import to_dict
from common.distributed import DistInfo, barrier
from common.files import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines logged after `step` (by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
    with atomic_write(path) as f:
        f.writelines(lines)


def sample_log(output_dir: Path, rank: int, micro_batches: int) -> Any:
    """This rank's sample log (see `DebugConfig.sample_log`) open for appending, its lines after the first
    `micro_batches` dropped (read by a run that died after its last checkpoint)."""
    path = output_dir / "samples" / f"rank_{rank:05d}.txt"
    lines = path.read_text().splitlines(keepends=True)[:micro_batches] if path.is_file() else []
    with atomic_write(path) as f:
        f.writelines(lines)
    return open(path, "a", encoding="utf-8")


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
