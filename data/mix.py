"""Two training tasks in one stream: understanding conversations and caption -> codes sequences, mixed at a fixed
ratio, for the unified model (train/unified.py).

An epoch of the mix has M samples, round(ratio * M) of them generation sequences and the rest conversations, M as
large as lets neither dataset repeat within the epoch; epoch e takes each dataset's next slice (cyclically), so
successive epochs cover all of both. Items are keyed (epoch, index) like every dataset the resumable sampler reads,
each task's dataset receiving its own (epoch, index) key, and carry "task": "und" or "gen".
"""

from __future__ import annotations

from typing import Any

import torch


class TaskMix(torch.utils.data.Dataset):
    """Args: und: the conversation dataset; gen: the caption -> codes sequences; ratio: the share of generation
    sequences in (0, 1)."""

    def __init__(self, und: torch.utils.data.Dataset, gen: torch.utils.data.Dataset, ratio: float):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"the generation share must be in (0, 1), got {ratio} (train a specialist for 0 or 1)")
        if not len(und) or not len(gen):
            raise ValueError(f"both tasks need samples: {len(und)} conversations, {len(gen)} sequences")
        self.datasets, self.ratio = {"und": und, "gen": gen}, ratio
        self.length = int(min(len(und) / (1 - ratio), len(gen) / ratio))
        self.counts = {"gen": round(ratio * self.length)}
        self.counts["und"] = self.length - self.counts["gen"]

    def __len__(self) -> int:
        return self.length

    def locate(self, epoch: int, index: int) -> tuple[str, int]:
        """(task, index in that task's dataset) of the mix's item `index` in `epoch`."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} outside the mix of {self.length}")
        task, offset = ("gen", index) if index < self.counts["gen"] else ("und", index - self.counts["gen"])
        n = len(self.datasets[task])
        return task, (epoch * self.counts[task] + offset) % n

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        task, inner = self.locate(epoch, index)
        return {**self.datasets[task][(epoch, inner)], "task": task}
