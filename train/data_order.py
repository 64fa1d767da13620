"""The resumable data order every trainer reads: an endless stream of micro-batches fixed by (seed, epoch), cut
into ranks, that a resumed run continues exactly where the interrupted one stopped. Datasets of indexed shards
(`data.shards.ShardDataset`) are read shard-locally: each rank takes whole shards, a window at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from common.config import ConfigError
from common.distributed import DistInfo, default_num_workers
from data.shard_cache import ShardOptions


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Micro-batches of dataset indices for one rank, in an order fixed by (seed, epoch), starting anywhere.

    Epoch e is a permutation of range(n) seeded by seed + e, cut into global batches of micro_batch * world_size;
    rank r takes its slice of each. The stream is infinite (epochs follow each other), and `start` skips that many
    of this rank's micro-batches, so a resumed run reads exactly what the uninterrupted run would have read.
    Items are (epoch, index) pairs, so datasets seed their per-sample randomness by epoch even in prefetching workers.
    """

    def __init__(self, n: int, micro_batch: int, rank: int, world_size: int, seed: int, start: int = 0):
        if n < micro_batch * world_size:
            raise ConfigError(f"dataset of {n} samples is smaller than one global batch ({micro_batch} x {world_size})")
        self.n, self.micro_batch, self.rank, self.world = n, micro_batch, rank, world_size
        self.seed, self.start = seed, start
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

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, indices in self.batches():
            yield [(epoch, i) for i in indices]


class ShardLocalBatchSampler(ResumableBatchSampler):
    """Micro-batches of one rank that read whole shards, `window` shards at a time, in an order fixed by (seed, epoch).

    Epoch e permutes the shards (seeded by (seed, e)) and deals them to the ranks in turn (rank r takes shards
    r, r + world, ...), so no sample is read by two ranks; each rank then reads its shards `window` at a time, the
    samples of a window in a random order (seeded by (seed, e, r)). Every rank stops the epoch after the same number
    of micro-batches (the smallest rank share; the rest of each share is dropped that epoch), so the ranks stay in
    step. `start` skips that many micro-batches, as in `ResumableBatchSampler`.

    `read_ahead(shards)`, when given, is called once with the shards of each window, in order, as soon as a
    micro-batch is handed out (a DataLoader's sampler runs ahead of its workers) that lies in one of the `ahead`
    windows before it or whose last sample comes at most `ahead_samples` samples before the window's first, so remote
    shards arrive before they are read; it changes nothing in the order.
    """

    def __init__(self, lengths: list[int], window: int, micro_batch: int, rank: int, world_size: int, seed: int,
                 start: int = 0, read_ahead: Callable[[list[int]], None] | None = None,
                 ahead: int = ShardOptions.read_ahead, ahead_samples: int = ShardOptions.read_ahead_samples):
        if len(lengths) < world_size:
            raise ConfigError(f"{len(lengths)} shards cannot be dealt to {world_size} ranks: each rank reads whole "
                              "shards (write smaller shards)")
        self.lengths, self.window = np.asarray(lengths, dtype=np.int64), window
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.micro_batch, self.rank, self.world, self.seed, self.start = micro_batch, rank, world_size, seed, start
        self.read_ahead, self.ahead, self.ahead_samples = read_ahead, ahead, ahead_samples
        if min(self._shares(0)) < micro_batch:
            raise ConfigError(f"a rank's share of the shards holds fewer samples than one micro-batch ({micro_batch})")

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))

    def _shares(self, epoch: int) -> list[int]:
        order = self._order(epoch)
        return [int(self.lengths[order[r::self.world]].sum()) for r in range(self.world)]

    def epoch_batches(self, epoch: int) -> int:
        """Micro-batches per rank in `epoch`."""
        return min(self._shares(epoch)) // self.micro_batch

    def batches(self) -> Iterator[tuple[int, list[int]]]:
        epoch, offset = 0, self.start
        while offset >= (per_epoch := self.epoch_batches(epoch)):
            offset -= per_epoch
            epoch += 1
        while True:
            mine = self._order(epoch)[self.rank::self.world]
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            windows = [np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in mine[w:w + self.window]])
                       for w in range(0, len(mine), self.window)]
            samples = np.concatenate([rng.permutation(w) for w in windows]).tolist()
            ends = np.cumsum([len(w) for w in windows])  # a window's end in `samples`
            announced = 0  # windows passed to read_ahead so far
            for b in range(offset, self.epoch_batches(epoch)):
                if self.read_ahead is not None:  # this batch's window, and the windows ahead of it by either rule
                    last = (b + 1) * self.micro_batch - 1  # this batch's last sample
                    current = int(np.searchsorted(ends, last, side="right"))
                    reach = int(np.searchsorted(ends, min(last + self.ahead_samples, ends[-1] - 1), side="right"))
                    for w in range(max(announced, current), min(max(current + self.ahead, reach) + 1, len(windows))):
                        self.read_ahead(mine[w * self.window:(w + 1) * self.window].tolist())
                        announced = w + 1
                yield epoch, samples[b * self.micro_batch:(b + 1) * self.micro_batch]
            epoch, offset = epoch + 1, 0


def resumable_loader(dataset: Any, collate_fn: Callable, micro_batch_size: int, info: DistInfo, seed: int,
                     start: int = 0, num_workers: int = -1) -> torch.utils.data.DataLoader:
    """This rank's endless stream of micro-batches of `dataset`, skipping the first `start` (a resumed run's count).

    Args:
        num_workers: DataLoader workers; -1: `common.distributed.default_num_workers` for this world size.
    """
    if hasattr(dataset, "shard_lengths"):  # indexed shards: read shard-locally
        sampler: ResumableBatchSampler = ShardLocalBatchSampler(
            dataset.shard_lengths, dataset.window, micro_batch_size, info.rank, info.world_size, seed, start=start,
            read_ahead=getattr(dataset, "read_ahead", None), ahead=dataset.options.read_ahead,
            ahead_samples=dataset.options.read_ahead_samples)
    else:
        sampler = ResumableBatchSampler(len(dataset), micro_batch_size, info.rank, info.world_size, seed, start=start)
    workers = default_num_workers() if num_workers < 0 else num_workers
    # its own generator: starting the iterator must not draw from the global RNG, which a resume restores
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers,
                                       pin_memory=info.device.type == "cuda",  # for non_blocking copies
                                       generator=torch.Generator().manual_seed(seed))
