"""Dataset keys. The resumable sampler (`train.data_order`) asks a dataset for (epoch, index) pairs, so prefetching
workers never read an item with the wrong epoch's randomness; a bare index (a plain DataLoader, a test) is read as
the dataset's current epoch (0 unless the dataset says otherwise)."""

from __future__ import annotations


def epoch_and_index(key: int | tuple[int, int], epoch: int = 0) -> tuple[int, int]:
    """(epoch, index) of a key: the pair itself, or a bare index with `epoch`."""
    return key if isinstance(key, tuple) else (epoch, key)
