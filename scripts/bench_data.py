"""Benchmark the training data path: indexed shards (data/shards.py) against today's local tar reader, on local disk
and served over loopback HTTP with an added per-request latency and a bandwidth cap, with 1 and 2 ranks.

    python scripts/bench_data.py                                       # 10,000 x 10 and 1,000 x 100 images (32 px)
    python scripts/bench_data.py --layouts 1000x10 --latency-ms 50     # smaller, slower store

Each case runs its ranks as concurrent processes, each reading its own shard of the trainers' data order
(`train.data_order.resumable_loader`, micro-batches of --batch, --workers DataLoader workers) from a cache of its own
under --out (all are removed at the end, not between cases: deleting a case's thousands of cached shards slowed the
next case's file creation on this machine's disk; the defaults need about 15 GB free there). Measured per case: time
to the first batch (dataset construction included: today's reader scans every tar header first) and images/s over
the next --batches micro-batches of every rank together. Every case runs --repeats times, in rounds; each figure is
the median, and a case's images/s against the indexed local reader's is the median of its rounds' ratios to the same
round's local run (runs made minutes apart, so the machine's drift cancels more than in a ratio of medians), with
their range. Baselines in the same run: today's reader on local disk ("scan"), the indexed reader on local disk for
the HTTP cases' share, and over HTTP with a new connection per shard (`ShardOptions(keep_alive=False)`) and with kept
connections but a thread per shard (`ShardOptions(group_mb=0)`) against the default's groups of requests on kept
connections.
"CPU ms/image" is the CPU time of the ranks and their DataLoader workers per image read (not the server's). Then, per
layout, the CPU cost of one shard's fetch, for the reader and for the server (in a process of its own): 2,000 shards
fetched as the read-ahead does, --window shards a call (`ShardDataset.read_ahead`: one group of requests per call for
small shards, see `ShardOptions.group_mb`), on ShardOptions.fetch_threads threads.
The data is written once under --out (the shapes world, resumable) and kept. The server shares this machine's cores
with the readers (a real object store does not).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import multiprocessing as mp
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import torch

from common.distributed import DistInfo
from data.images import SHARD_INDEX, build_image_dataset, collate_images
from data.serve import ShardServer
from data.shard_cache import ShardOptions
from data.shards import ShardDataset, write_index
from data.transforms import ImageTransform
from train.data_order import resumable_loader
from world.export import export_world

LOCAL = "indexed, local"  # the case every images/s is compared with
FETCHES = [("a connection per shard", {"keep_alive": False, "group_mb": 0.0}),  # (name, ShardOptions fields)
           ("kept connections, a thread per shard", {"keep_alive": True, "group_mb": 0.0}),
           ("kept connections, a group per window", {"keep_alive": True, "group_mb": ShardOptions.group_mb})]


def _rank(spec: str, kind: str, rank: int, world: int, args: argparse.Namespace, cache: str, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    mp.set_start_method("fork", force=True)  # DataLoader workers as under a launcher (a spawned rank would spawn them)
    start = time.perf_counter()
    dataset = build_image_dataset(f"{kind}:{spec}", ImageTransform(32, "center"),
                                  shards=ShardOptions(cache_dir=cache, window=args.window, read_ahead=args.read_ahead,
                                                      read_ahead_samples=args.read_ahead_samples,
                                                      keep_alive=args.keep_alive, group_mb=args.group_mb))
    loader = resumable_loader(dataset, collate_images, args.batch, DistInfo(rank, world, rank, torch.device("cpu")),
                              seed=0, num_workers=args.workers)
    batches = iter(loader)
    next(batches)
    first = time.perf_counter() - start
    processes = [psutil.Process(), *psutil.Process().children()]  # this rank and its DataLoader workers
    cpu = sum(_cpu_s(p) for p in processes)
    begin, images = time.perf_counter(), 0
    for _, batch in zip(range(args.batches), batches):
        images += batch["pixel_values"].shape[0]
    out.put((first, images, time.perf_counter() - begin, sum(_cpu_s(p) for p in processes) - cpu))


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run_case(spec: str, kind: str, world: int, args: argparse.Namespace) -> dict[str, float]:
    """(seconds to the first batch, slowest rank; images/s of all ranks together)."""
    ctx = mp.get_context("spawn")
    queue, cache = ctx.Queue(), tempfile.mkdtemp(prefix="case-", dir=args.caches)
    procs = [ctx.Process(target=_rank, args=(spec, kind, r, world, args, cache, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    first = max(r[0] for r in results)
    rate = sum(r[1] for r in results) / max(r[2] for r in results)
    return {"first_batch_s": first, "images_per_s": rate, "cpu_ms_per_image": 1e3 * sum(r[3] for r in results) /
            sum(r[1] for r in results)}


def request_cost(folder: Path, options: dict[str, Any], args: argparse.Namespace, shards: int = 2000
                 ) -> tuple[float, float]:
    """CPU ms per shard of the reader's fetches (`ShardDataset.read_ahead`, a window at a time, as the data order
    calls it, --read-ahead + 1 windows in flight) and of the server, which runs here in a process of its own."""
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "serve_shards.py"), str(folder),
                               "--latency-ms", str(args.latency_ms), "--mbit-s", str(args.mbit_s)],
                              stdout=subprocess.PIPE, text=True)
    cache = tempfile.mkdtemp(prefix="fetches-", dir=args.caches)
    try:
        url = server.stdout.readline().split(" at ")[-1].strip()
        dataset = ShardDataset(f"{url}/{SHARD_INDEX}", options=ShardOptions(cache_dir=cache, **options))
        shards, served = min(shards, len(dataset.urls)), psutil.Process(server.pid)
        mine, theirs = time.process_time(), _cpu_s(served)
        in_flight: collections.deque[list[Future]] = collections.deque()
        for w in range(0, shards, args.window):  # the window being read and the read-ahead's: in flight at once
            in_flight.append(dataset.read_ahead(list(range(w, min(w + args.window, shards)))))
            while len(in_flight) > args.read_ahead or w + args.window >= shards and in_flight:
                for future in in_flight.popleft():
                    future.result()
        return 1e3 * (time.process_time() - mine) / shards, 1e3 * (_cpu_s(served) - theirs) / shards
    finally:
        server.terminate()
        server.wait()


def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every case's row and every fetch cost, layout by layout."""
    rows, costs = [], []
    for layout in args.layouts.split(","):
        shards, per_shard = (int(x) for x in layout.split("x"))
        world_dir = args.out / f"world-{shards}x{per_shard}"
        folder = world_dir / "shards"
        export_world(world_dir, shards * per_shard, image_size=32, fmt="shards", shard_size=per_shard)
        if not (folder / SHARD_INDEX).exists():
            write_index(sorted(glob.glob(str(folder / "*.tar"))), folder / SHARD_INDEX)
        size_mb = sum(p.stat().st_size for p in folder.glob("*.tar")) / 1e6
        print(f"{shards} shards x {per_shard} images ({size_mb:.0f} MB), micro-batch {args.batch}, "
              f"{args.batches} micro-batches timed per rank, window {args.window}, read-ahead {args.read_ahead} windows "
              f"and {args.read_ahead_samples} samples",
              flush=True)
        http_name = f"indexed, HTTP {args.latency_ms:g} ms + {args.mbit_s:g} Mbit/s"
        with ShardServer(folder, latency_s=args.latency_ms / 1000, mbit_s=args.mbit_s) as server:
            index = f"{server.url}/{SHARD_INDEX}"
            local = {"keep_alive": True, "group_mb": ShardOptions.group_mb}
            cases = [("scan (today's reader), local", str(folder), "tar", args.workers, local),
                     (LOCAL, str(folder), "shards", args.workers, local),
                     *[(f"{http_name}, {how}", index, "shards", args.workers, options) for how, options in FETCHES[:2]],
                     (http_name, index, "shards", args.workers, local),
                     (http_name, index, "shards", args.http_workers, local)]
            runs: dict[tuple[int, int], list[dict[str, float]]] = collections.defaultdict(list)
            for repeat in range(args.repeats):  # each round runs every case once: a drift of the machine hits all
                for world in (1, 2):
                    for c, (name, spec, kind, workers, options) in enumerate(cases):
                        settings = {**vars(args), "workers": workers, **options}
                        result = run_case(spec, kind, world, argparse.Namespace(**settings))
                        runs[world, c].append(result)
                        print(f"  {name:<80} ranks {world}  workers {workers}: first batch "
                              f"{result['first_batch_s']:7.2f} s, {result['images_per_s']:7.0f} images/s, "
                              f"{result['cpu_ms_per_image']:.3f} CPU ms/image (round {repeat + 1})", flush=True)
        local_case = next(i for i, case in enumerate(cases) if case[0] == LOCAL)
        for (world, c), results in runs.items():
            name, _, _, workers, _ = cases[c]
            bases = runs[world, local_case]  # round by round:
            ratios = [r["images_per_s"] / base["images_per_s"] for r, base in zip(results, bases)]
            rows.append({"layout": layout, "reader": name, "ranks": world, "workers": workers,
                         **{k: statistics.median(r[k] for r in results) for k in results[0]},
                         "vs_local": statistics.median(ratios), "vs_local_range": (min(ratios), max(ratios))})
        for how, options in FETCHES:
            client, served = (statistics.median(r) for r in zip(*(request_cost(folder, options, args)
                                                                   for _ in range(args.repeats))))
            costs.append({"layout": layout, "fetches": how, "reader_ms": client, "server_ms": served})
            print(f"  fetches, {how}: CPU ms per shard: reader {client:.2f}, server {served:.2f}", flush=True)
    return rows, costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_data"))
    parser.add_argument("--layouts", default="10000x10,1000x100",
                        help="datasets as SHARDSxIMAGES_PER_SHARD, comma-separated (the same images, cut differently)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=1000, help="micro-batches timed per rank")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of every case; the tables give each figure's median")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--http-workers", type=int, default=4, help="DataLoader workers per rank over HTTP")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--read-ahead", type=int, default=ShardOptions.read_ahead,
                        help="windows fetched ahead (ShardOptions.read_ahead)")
    parser.add_argument("--read-ahead-samples", type=int, default=ShardOptions.read_ahead_samples,
                        help="and samples fetched ahead (ShardOptions.read_ahead_samples)")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--mbit-s", type=float, default=100.0, help="bandwidth cap per request")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.caches = Path(tempfile.mkdtemp(prefix="caches-", dir=args.out))  # beside the data, as ~/.cache
    try:
        rows, costs = measure(args)
    finally:  # not between cases: deleting ~100 MB of small files slows the next case's file creation for a while
        shutil.rmtree(args.caches, ignore_errors=True)

    print("\n| shards x images | reader | ranks | workers/rank | first batch (s) | images/s | CPU ms/image "
          "| first batch vs scan | images/s vs indexed, local (rounds' range) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        scan = next(r for r in rows if r["layout"] == row["layout"] and r["ranks"] == row["ranks"] and
                    r["reader"].startswith("scan"))
        low, high = row["vs_local_range"]
        print(f"| {row['layout']} | {row['reader']} | {row['ranks']} | {row['workers']} | {row['first_batch_s']:.2f} "
              f"| {row['images_per_s']:.0f} | {row['cpu_ms_per_image']:.3f} "
              f"| {scan['first_batch_s'] / row['first_batch_s']:.1f}x faster "
              f"| {row['vs_local']:.0%} ({low:.0%}-{high:.0%}) |")
    print("\n| shards x images | fetches | reader CPU ms/shard | server CPU ms/shard |")
    print("|---|---|---|---|")
    for cost in costs:
        print(f"| {cost['layout']} | {cost['fetches']} | {cost['reader_ms']:.2f} "
              f"| {cost['server_ms']:.2f} |")
    (args.out / "bench_data.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                          "rows": rows, "request_cost": costs}, indent=2))


if __name__ == "__main__":
    main()
