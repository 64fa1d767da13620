"""Why local tar shards have two readers: random access in each data order, by `data.images.TarShardDataset`
(a folder of tars without an index, every member's offset kept from a header scan at start-up) and by the indexed
`data.shards.ShardDataset` (one index file at start-up; a shard's headers scanned when the shard is opened, at most
`ShardOptions.max_open` shards open per process).

    python scripts/bench_tar_access.py                       # the CPU default's training shards (scripts/prepare_world.py)
    python scripts/bench_tar_access.py /data/shards --images 20000

Two orders, the ones `train.data_order` gives each reader: global (a permutation of the whole dataset, what a
folder of local tars gets) and shard-local (whole shards, a window at a time, what indexed shards get). Per reader
and order: construction time and milliseconds per image over --images samples (decoded and centre-cropped to 32
px, one process); every case runs --repeats times in rounds, each figure is the median, and the last column is the
median of each round's ratio to the same round's scanning reader in the same order.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common.cli import reported_errors
from data.images import TarShardDataset, resolve_shards
from data.shards import ShardDataset, write_index
from data.transforms import ImageTransform
from train.data_order import ResumableBatchSampler, ShardLocalBatchSampler

BATCH = 32


def order(dataset, kind: str, images: int) -> list[int]:
    """The first `images` sample indices of epoch 0 in the data order `kind` ("global" or "shard-local")."""
    if kind == "global":
        sampler = ResumableBatchSampler(len(dataset), BATCH, 0, 1, seed=0)
    else:
        lengths = getattr(dataset, "shard_lengths", None) or dataset.table_lengths
        sampler = ShardLocalBatchSampler(lengths, 8, BATCH, 0, 1, seed=0)
    out = []
    for _, batch in sampler.batches():
        out.extend(batch)
        if len(out) >= images:
            return out[:images]
    return out


def time_case(make, kind: str, images: int) -> tuple[float, float]:
    """(construction s, ms per image) of one reader in one order."""
    start = time.perf_counter()
    dataset = make()
    built = time.perf_counter() - start
    indices = order(dataset, kind, images)
    start = time.perf_counter()
    for i in indices:
        dataset[i]
    return built, 1e3 * (time.perf_counter() - start) / len(indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="?", default="runs/world/train/shards", help="a folder of local .tar shards")
    parser.add_argument("--images", type=int, default=4000, help="samples read per case")
    parser.add_argument("--repeats", type=int, default=3, help="rounds")
    args = parser.parse_args()
    with reported_errors():
        paths = [str(Path(p).resolve()) for p in resolve_shards(args.shards)]  # the index lives elsewhere
        transform = ImageTransform(32, mode="center")
        with tempfile.TemporaryDirectory() as tmp:
            index = Path(tmp) / "shardindex.json"
            written = write_index(paths, index, relative=False)
            lengths = [s["nsamples"] for s in written["shardlist"]]

            def scanned() -> TarShardDataset:
                dataset = TarShardDataset(paths, transform)
                dataset.table_lengths = lengths  # the shard sizes, for the shard-local order
                return dataset

            readers = {"scanning (TarShardDataset)": scanned,
                       "indexed (ShardDataset)": lambda: ShardDataset(str(index), transform)}
            rounds = []
            for _ in range(args.repeats):
                rounds.append({(r, k): time_case(make, k, args.images) for k in ("global", "shard-local")
                               for r, make in readers.items()})
    print(f"{len(paths)} shards, {sum(lengths)} samples; {args.images} images per case, median of {args.repeats}\n")
    print("| reader | order | construction (s) | ms/image | ms/image vs scanning, same order (rounds' range) |")
    print("|---|---|---:|---:|---|")
    for kind in ("global", "shard-local"):
        for reader in readers:
            cases = [r[(reader, kind)] for r in rounds]
            ratios = [r[(reader, kind)][1] / r[(next(iter(readers)), kind)][1] for r in rounds]
            print(f"| {reader} | {kind} | {statistics.median(c[0] for c in cases):.2f} | "
                  f"{statistics.median(c[1] for c in cases):.3f} | {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}x-{max(ratios):.2f}x) |")


if __name__ == "__main__":
    main()
