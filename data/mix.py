"""Two training tasks in one stream: understanding conversations and caption -> codes sequences, mixed at a fixed
ratio, for the unified model (train/unified.py).

An epoch of the mix has M samples, round(ratio * M) of them generation sequences and the rest conversations, M as
large as lets neither dataset repeat within the epoch; epoch e takes each dataset's next slice (cyclically), so
successive epochs cover all of both. Items are keyed (epoch, index) like every dataset the resumable sampler reads,
each task's dataset receiving its own (epoch, index) key, and carry "task": "und" or "gen".

Conversations read from indexed shards (`data.llava.ShardConversationDataset`) mix shard by shard instead
(`ShardTaskMix`), so the data order still reads them shard-locally and deals whole shards to the ranks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data.keys import epoch_and_index


def check_share(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"the generation share must be in (0, 1), got {ratio} (train a specialist for 0 or 1)")


class TaskMix(torch.utils.data.Dataset):
    """Args: und: the conversation dataset; gen: the caption -> codes sequences; ratio: the share of generation
    sequences in (0, 1)."""

    def __init__(self, und: torch.utils.data.Dataset, gen: torch.utils.data.Dataset, ratio: float):
        check_share(ratio)
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
        epoch, index = epoch_and_index(key)
        task, inner = self.locate(epoch, index)
        return {**self.datasets[task][(epoch, inner)], "task": task}


class ShardTaskMix(torch.utils.data.Dataset):
    """The mix over conversations in shards: mix shard s is conversation shard s (all of it, every epoch) followed by
    round(n_s * ratio / (1 - ratio)) generation sequences, the sequences' next slice in epoch e (cyclically, as in
    `TaskMix`). It exposes the shard layout (`shard_lengths`, `window`, `options`, `read_ahead`), so
    `train.data_order.ShardLocalBatchSampler` deals whole mix shards to the ranks and reads their conversations
    mostly sequentially; the sequences are a local random-access array.

    Args: und: a dataset with shard_lengths (`ShardConversationDataset`); gen: the caption -> codes sequences, at
    least as many as one pass needs (no sequence twice within an epoch); ratio: their share, in (0, 1).
    """

    def __init__(self, und: Any, gen: torch.utils.data.Dataset, ratio: float):
        check_share(ratio)
        self.und, self.gen, self.ratio = und, gen, ratio
        conversations = np.asarray(und.shard_lengths, dtype=np.int64)
        self.gen_lengths = np.rint(conversations * ratio / (1 - ratio)).astype(np.int64)
        self.counts = {"und": int(conversations.sum()), "gen": int(self.gen_lengths.sum())}
        if self.counts["gen"] > len(gen):
            raise ValueError(f"a pass over {self.counts['und']} conversations at generation share {ratio} needs "
                             f"{self.counts['gen']} caption -> codes sequences, there are {len(gen)}")
        self.shard_lengths = (conversations + self.gen_lengths).tolist()
        self.und_offsets = np.concatenate([[0], np.cumsum(conversations)])
        self.gen_offsets = np.concatenate([[0], np.cumsum(self.gen_lengths)])
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_lengths)])
        self.window, self.options = und.window, und.options

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read_ahead(self, shards: list[int]) -> None:
        self.und.read_ahead(shards)

    def locate(self, epoch: int, index: int) -> tuple[str, int]:
        """(task, index in that task's dataset) of the mix's item `index` in `epoch`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside the mix of {len(self)}")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        within = index - int(self.offsets[shard])
        conversations = int(self.und_offsets[shard + 1] - self.und_offsets[shard])
        if within < conversations:
            return "und", int(self.und_offsets[shard]) + within
        offset = int(self.gen_offsets[shard]) + within - conversations
        return "gen", (epoch * self.counts["gen"] + offset) % len(self.gen)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[Any]) -> list[dict[str, Any]]:
        """A micro-batch: its conversations fetched together (`ShardConversationDataset.__getitems__`, remote
        shards in parallel), its sequences one by one, in the keys' order."""
        located = [(epoch, *self.locate(epoch, index)) for epoch, index in map(epoch_and_index, keys)]
        und = [(epoch, i) for epoch, task, i in located if task == "und"]
        conversations = iter(self.und.__getitems__(und)) if und else iter(())
        return [{**(next(conversations) if task == "und" else self.gen[(epoch, i)]), "task": task}
                for epoch, task, i in located]
