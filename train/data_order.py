"""The resumable data order every trainer reads: an endless stream of micro-batches fixed by (seed, epoch), cut
into ranks, that a resumed run continues exactly where the interrupted one stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from common.config import ConfigError
from common.distributed import DistInfo, default_num_workers


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


def resumable_loader(dataset: Any, collate_fn: Callable, micro_batch_size: int, info: DistInfo, seed: int,
                     start: int = 0, num_workers: int = -1) -> torch.utils.data.DataLoader:
    """This rank's endless stream of micro-batches of `dataset`, skipping the first `start` (a resumed run's count).

    Args:
        num_workers: DataLoader workers; -1: `common.distributed.default_num_workers` for this world size.
    """
    sampler = ResumableBatchSampler(len(dataset), micro_batch_size, info.rank, info.world_size, seed, start=start)
    workers = default_num_workers() if num_workers < 0 else num_workers
    # its own generator: starting the iterator must not draw from the global RNG, which a resume restores
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers,
                                       pin_memory=info.device.type == "cuda",  # for non_blocking copies
                                       generator=torch.Generator().manual_seed(seed))
