"""Indexed shards, local and served over loopback HTTP: the index, start-up that reads no shard, samples equal to
the local tar reader's, one download per shard per machine, small HTTP shards fetched in groups, the shard-local
order (ranks and workers disjoint, windows, the same order for the same seed), a killed reader resumed without a
sample seen twice or skipped, corrupt members and shards, an unreachable shard retried then skipped, the cache budget
and its eviction order."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError
from common.distributed import DistInfo
from data.images import TarShardDataset, build_image_dataset, collate_images
from data.serve import ShardServer
from data.shard_cache import ShardCache, ShardOptions, ShardUnavailable
from data.shards import ShardDataset, read_index, write_index
from data.transforms import ImageTransform
from train.data_order import ShardLocalBatchSampler, resumable_loader
from world.export import export_world

SHARDS, PER_SHARD = 8, 6
CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The shapes world as 8 tar shards of 6 samples, with its index."""
    root = tmp_path_factory.mktemp("world")
    export_world(root, SHARDS * PER_SHARD, image_size=32, fmt="shards", shard_size=PER_SHARD, progress=False)
    folder = root / "shards"
    write_index(sorted(str(p) for p in folder.glob("*.tar")), folder / "shardindex.json", threads=2)
    return folder


def _copy(folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def _keys(dataset, indices):
    return [dataset[i]["meta"]["__key__"] for i in indices]


def test_index_lists_every_shard_relative_with_its_samples_and_bytes(shards):
    index = json.loads((shards / "shardindex.json").read_text())
    assert index["wids_version"] == 1
    names = sorted(p.name for p in shards.glob("*.tar"))
    assert [s["url"] for s in index["shardlist"]] == names  # relative: the folder can move
    for entry in index["shardlist"]:
        with tarfile.open(shards / entry["url"]) as tar:
            keys = {m.name.split(".")[0] for m in tar if m.isfile()}
        assert entry["nsamples"] == len(keys) == PER_SHARD
        assert entry["filesize"] == os.path.getsize(shards / entry["url"])


@pytest.mark.parametrize("blocks", [17, 18, 19])  # data blocks: the end-of-archive blocks in one record or across two
def test_index_counts_a_shards_bytes_to_its_end(tmp_path, blocks):
    from data.shards import count_samples
    from data.tar_files import write_tar_shard

    path = tmp_path / "000000.tar"
    write_tar_shard(path, [("a.json", b"x" * 512 * blocks)])
    assert count_samples(str(path)) == (1, os.path.getsize(path))
    with ShardServer(tmp_path) as server:  # a stream that cannot tell its position
        assert count_samples(f"{server.url}/000000.tar") == (1, os.path.getsize(path))


def test_samples_equal_the_local_tar_readers(shards):
    transform = ImageTransform(32, "center")
    indexed, scanned = ShardDataset(shards, transform), TarShardDataset(shards, transform)
    assert len(indexed) == len(scanned) == SHARDS * PER_SHARD
    for i in range(len(indexed)):
        a, b = indexed[i], scanned[i]
        assert a["meta"]["__key__"] == b["meta"]["__key__"]
        assert a["caption"] == b["caption"] and a["caption"].startswith("a photo")
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)
        assert {k: v for k, v in a["meta"].items() if k != "__shard__"} == \
            {k: v for k, v in b["meta"].items() if k != "__shard__"}


def test_start_up_reads_the_index_only(shards, tmp_path):
    folder = _copy(shards, tmp_path)
    for tar in folder.glob("*.tar"):
        tar.unlink()  # no shard left: building the dataset must not need one
    dataset = ShardDataset(folder, options=ShardOptions(retries=1))
    assert len(dataset) == SHARDS * PER_SHARD
    assert dataset.shard_lengths == [PER_SHARD] * SHARDS
    assert dataset[0] is None  # its shard is missing: skipped


def test_kinds_are_inferred_and_a_missing_index_is_named(shards, tmp_path):
    assert isinstance(build_image_dataset(shards), ShardDataset)  # a folder holding shardindex.json
    assert isinstance(build_image_dataset(str(shards / "shardindex.json")), ShardDataset)
    some = build_image_dataset(str(shards / "{000002..000004}.tar"))
    assert isinstance(some, ShardDataset) and len(some) == 3 * PER_SHARD
    assert some[0]["meta"]["__key__"] == f"{2 * PER_SHARD:08d}"
    bare = _copy(shards, tmp_path)
    (bare / "shardindex.json").unlink()
    assert isinstance(build_image_dataset(bare), TarShardDataset)  # no index: today's scan
    with pytest.raises(FileNotFoundError, match=r"no shard index at .*index_shards\.py"):
        build_image_dataset(str(bare / "{000000..000001}.tar"))
    with pytest.raises(ValueError, match="not in the index"):
        build_image_dataset(str(shards / "{000007..000008}.tar"))


def test_http_shards_are_the_local_samples_and_each_is_fetched_once(shards, tmp_path):
    local = ShardDataset(shards, ImageTransform(32, "center"))
    options = ShardOptions(cache_dir=str(tmp_path / "cache"))
    with ShardServer(shards, latency_s=0.005) as server:
        remote = ShardDataset(f"{server.url}/shardindex.json", ImageTransform(32, "center"), options=options)
        assert remote.urls[0] == f"{server.url}/000000.tar"
        loader = torch.utils.data.DataLoader(remote, batch_size=5, num_workers=2, collate_fn=collate_images)
        batches = list(loader)
        again = ShardDataset(f"{server.url}/shardindex.json", options=options)[7]  # a new reader: the cache
    pixels = torch.cat([b["pixel_values"] for b in batches])
    torch.testing.assert_close(pixels, torch.stack([local[i]["pixel_values"] for i in range(len(local))]))
    assert [k for b in batches for k in (m["__key__"] for m in b["meta"])] == _keys(local, range(len(local)))
    assert again["meta"]["__key__"] == local[7]["meta"]["__key__"]
    gets = {p: n for p, n in server.requests.items() if p.startswith("GET") and p.endswith(".tar")}
    assert gets == {f"GET /{i:06d}.tar": 1 for i in range(SHARDS)}  # two workers, two readers: one download each


def test_a_worker_forked_after_the_read_ahead_fetches_on_threads_of_its_own(shards, tmp_path):
    with ShardServer(shards) as server:
        dataset = ShardDataset(f"{server.url}/shardindex.json", ImageTransform(32, "center"),
                               options=ShardOptions(cache_dir=str(tmp_path)))
        assert all(f.result() is None for f in dataset.read_ahead([0, 1]))  # the parent's fetch threads exist
        keys = [2 * PER_SHARD, 3 * PER_SHARD, 4 * PER_SHARD]  # three shards not in the cache: fetched in the worker
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[keys], num_workers=1, collate_fn=collate_images,
                                             multiprocessing_context="fork", timeout=30)
        batch = next(iter(loader))
    assert [m["__key__"] for m in batch["meta"]] == [f"{k:08d}" for k in keys]


def test_read_ahead_left_pending_at_the_end_is_dropped_quietly(shards, tmp_path, caplog):
    with ShardServer(shards, latency_s=0.3) as server:
        dataset = ShardDataset(f"{server.url}/shardindex.json",
                               options=ShardOptions(cache_dir=str(tmp_path), fetch_threads=1, group_mb=0))
        futures = dataset.read_ahead([0, 1, 2])  # one thread: the second and third wait
        time.sleep(0.1)
        with caplog.at_level("ERROR"):
            dataset.__del__()  # as when a run ends with fetches ahead still queued
            futures[0].result()
        assert [f.cancelled() for f in futures] == [False, True, True]
    assert not [r for r in caplog.records if r.name == "concurrent.futures"], caplog.text


def _race(url: str, cache: str, barrier) -> None:
    dataset = ShardDataset(url, options=ShardOptions(cache_dir=cache))
    barrier.wait()
    with ThreadPoolExecutor(4) as pool:  # four threads of each process after every shard at once, two of them a group
        groups = [pool.submit(dataset._cache.fetch_all, dataset.urls, dataset.shard_sizes) for _ in range(2)]
        assert all(pool.map(dataset._local, [s for s in range(SHARDS) for _ in range(2)]))
        assert [g.result() for g in groups] == [None, None]


def test_racing_processes_and_threads_fetch_each_shard_once(shards, tmp_path):
    ctx = torch.multiprocessing.get_context("fork")
    with ShardServer(shards, latency_s=0.02) as server:
        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=_race, args=(f"{server.url}/shardindex.json", str(tmp_path), barrier))
                 for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0, 0, 0]
    assert {p: n for p, n in server.requests.items() if p.endswith(".tar")} == \
        {f"GET /{i:06d}.tar": 1 for i in range(SHARDS)}
    assert sorted(p.name.split("-", 1)[1] for p in tmp_path.iterdir()) == [f"{i:06d}.tar" for i in range(SHARDS)]


@pytest.mark.parametrize("group_mb,count", [(0.0, 8), (0.03, 8), (0.07, 4), (1.0, 3)])  # shards of 30,720 bytes
def test_small_http_shards_are_fetched_in_groups_within_the_budget(shards, tmp_path, group_mb, count):
    with ShardServer(shards) as server:
        dataset = ShardDataset(f"{server.url}/shardindex.json",
                               options=ShardOptions(cache_dir=str(tmp_path), group_mb=group_mb, fetch_threads=3))
        order = [5, 0, 3, 1, 7, 2, 6, 4]
        groups = dataset._groups(order)
        assert [s for g in groups for s in g] == order
        budget, size = group_mb * 1e6, lambda g: sum(dataset.shard_sizes[s] for s in g)
        assert all(len(g) == 1 or (len(g) <= 3 and size(g) <= budget) for g in groups)
        assert all(len(g) == 3 or size(g) + dataset.shard_sizes[h[0]] > budget for g, h in zip(groups, groups[1:]))
        assert len(groups) == count
        for group in groups:  # on this thread, one after another
            dataset._cache.fetch_all([dataset.urls[s] for s in group], [dataset.shard_sizes[s] for s in group])
        assert sorted(p.name.split("-", 1)[1] for p in tmp_path.iterdir()) == [f"{i:06d}.tar" for i in range(SHARDS)]
        assert server.requests["connections"] == max(len(g) for g in groups)  # a group's connections, then kept
        for options in (ShardOptions(keep_alive=False), ShardOptions(group_mb=1.0)):  # a connection per shard; local
            dataset = ShardDataset(f"{server.url}/shardindex.json" if not options.keep_alive else shards,
                                   options=options)
            assert dataset._groups(order) == [[s] for s in order]


def test_shard_order_is_disjoint_windowed_and_seeded():
    lengths = [5, 7, 6, 9, 4, 8, 6, 5, 7]
    offsets = np.cumsum([0] + lengths)
    shard_of = {i: int(np.searchsorted(offsets, i, side="right")) - 1 for i in range(offsets[-1])}

    def epoch0(rank, world, seed=1, window=2):
        sampler = ShardLocalBatchSampler(lengths, window, 3, rank, world, seed)
        n = sampler.epoch_batches(0)
        out = []
        for _, (epoch, indices) in zip(range(n), sampler.batches()):
            assert epoch == 0
            out.append(indices)
        return out

    for world in (1, 2, 3):
        per_rank = [[i for b in epoch0(r, world) for i in b] for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # the ranks stay in step
        for r in range(world):
            assert len(set(per_rank[r])) == len(per_rank[r])
            for q in range(r):
                assert not {shard_of[i] for i in per_rank[r]} & {shard_of[i] for i in per_rank[q]}  # whole shards
        # a rank's samples come window by window: each window's shards are read before the next window's
        order = [shard_of[i] for i in per_rank[0]]
        first_seen = list(dict.fromkeys(order))
        for w in range(0, len(first_seen), 2):
            window = set(first_seen[w:w + 2])
            at = [k for k, s in enumerate(order) if s in window]
            assert all(s in window for s in order[at[0]:at[-1] + 1])
    assert epoch0(0, 2) == epoch0(0, 2) and epoch0(0, 2) != epoch0(0, 2, seed=2)
    single = [i for b in epoch0(0, 1, window=len(lengths)) for i in b]
    assert sorted(single) == sorted(set(single)) and len(single) == sum(lengths) // 3 * 3
    with pytest.raises(ConfigError, match="cannot be dealt"):
        ShardLocalBatchSampler(lengths[:2], 2, 1, 0, 3, 0)
    assert ShardLocalBatchSampler([3, 3], 1, 3, 1, 2, 0).epoch_batches(0) == 1  # a share of one micro-batch is enough
    with pytest.raises(ConfigError, match="fewer samples than one micro-batch"):
        ShardLocalBatchSampler([2, 3], 1, 3, 0, 2, 0)


def test_shard_order_reads_ahead_each_window_once_in_order():
    lengths = [5, 7, 6, 9, 4, 8, 6, 5, 7, 6]
    offsets = np.cumsum([0] + lengths)
    for ahead, samples, world in ((0, 0, 1), (1, 0, 1), (2, 0, 2), (0, 14, 1), (1, 20, 1), (0, 5, 2), (2, 30, 2)):
        calls = []
        sampler = ShardLocalBatchSampler(lengths, 2, 3, 0, world, seed=4, read_ahead=calls.append, ahead=ahead,
                                         ahead_samples=samples)
        seen = []  # (shards of the batch, windows announced when it was yielded)
        for _, (_, indices) in zip(range(sampler.epoch_batches(0)), sampler.batches()):
            seen.append(([int(np.searchsorted(offsets, i, side="right")) - 1 for i in indices], len(calls)))
        first_seen = list(dict.fromkeys(s for shards, _ in seen for s in shards))
        windows = [set(first_seen[w:w + 2]) for w in range(0, len(first_seen), 2)]  # the last maybe cut short
        assert [set(c) for c in calls[:len(windows) - 1]] == windows[:-1]  # each window once, in reading order
        assert windows[-1] <= set(calls[len(windows) - 1]) and all(1 <= len(c) <= 2 for c in calls)
        assert len({s for c in calls for s in c}) == sum(map(len, calls))  # no shard announced twice
        starts = np.cumsum([0] + [sum(lengths[s] for s in c) for c in calls])  # each window's first sample
        for b, (shards, announced) in enumerate(seen):  # the batch's window, `ahead` after it, those it nearly reaches
            current = max(next(k for k, w in enumerate(windows) if s in w) for s in shards)
            near = int(np.sum(starts[:-1] <= 3 * b + 2 + samples))  # windows starting within `samples` of its end
            assert announced == min(max(current + 1 + ahead, near), len(calls)), (ahead, samples, world, b)


def test_resume_at_any_micro_batch_continues_the_stream():
    lengths = [5, 7, 6, 9, 4, 8, 6, 5, 7]
    full = ShardLocalBatchSampler(lengths, 3, 4, 1, 2, seed=5)
    stream = [b for _, b in zip(range(30), full.batches())]  # crosses epochs (6 micro-batches an epoch)
    assert full.epoch_batches(0) < 30
    for start in (1, 6, 13):
        resumed = ShardLocalBatchSampler(lengths, 3, 4, 1, 2, seed=5, start=start)
        assert [b for _, b in zip(range(30 - start), resumed.batches())] == stream[start:]


def test_workers_split_batches_without_overlap(shards):
    dataset = ShardDataset(shards, ImageTransform(32, "center"), options=ShardOptions(window=3))
    keys = {}
    for workers in (0, 2):
        loader = resumable_loader(dataset, collate_images, 4, CPU, seed=0, num_workers=workers)
        keys[workers] = [m["__key__"] for _, b in zip(range(12), loader) for m in b["meta"]]
    assert keys[2] == keys[0] and len(set(keys[0])) == len(keys[0]) == SHARDS * PER_SHARD


READER = """
import sys, torch
from common.distributed import DistInfo
from data.images import collate_images
from data.shard_cache import ShardOptions
from data.shards import ShardDataset
from data.transforms import ImageTransform
from train.data_order import resumable_loader
url, cache, start, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
dataset = ShardDataset(url, ImageTransform(32, "center"), options=ShardOptions(cache_dir=cache, window=2))
loader = resumable_loader(dataset, collate_images, 4, DistInfo(0, 1, 0, torch.device("cpu")), 7, start=start,
                          num_workers=2)
with open(out, "a") as f:
    for n, batch in zip(range(start, 12), loader):  # one epoch: 48 samples, 12 micro-batches
        f.write(" ".join(m["__key__"] for m in batch["meta"]) + "\\n")
        f.flush()
        if n == 4:
            print("ready", flush=True)
            torch.multiprocessing.Event().wait(60)  # killed here in the interrupted run
"""


def test_killed_reader_resumes_without_repeats_or_gaps(shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    with ShardServer(shards, latency_s=0.01) as server:
        url = f"{server.url}/shardindex.json"
        once, cut = tmp_path / "once.txt", tmp_path / "cut.txt"
        script = READER.replace("if n == 4", "if n == -1")
        subprocess.run([sys.executable, "-c", script, url, str(tmp_path / "c1"), "0", once], env=env, check=True,
                       timeout=120)
        child = subprocess.Popen([sys.executable, "-c", READER, url, str(tmp_path / "c2"), "0", cut], env=env,
                                 stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert child.stdout.readline().strip() == "ready"
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        done = len(cut.read_text().splitlines())  # the micro-batches a checkpoint would have counted
        assert done == 5
        subprocess.run([sys.executable, "-c", script, url, str(tmp_path / "c2"), str(done), cut], env=env,
                       check=True, timeout=120)
    seen = cut.read_text().split()
    assert sorted(seen) == sorted(once.read_text().split()) == [f"{i:08d}" for i in range(SHARDS * PER_SHARD)]
    assert len(seen) == len(set(seen))
    assert cut.read_text() == once.read_text()  # the same order too


def _rewrite_member(tar_path, member, data):
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, payload in members:
            payload = data if info.name == member else payload
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_corrupt_members_and_shards_are_skipped_and_counted(shards, tmp_path, caplog):
    folder = _copy(shards, tmp_path)
    _rewrite_member(folder / "000001.tar", f"{PER_SHARD + 2:08d}.png", b"not a png")  # one bad image
    (folder / "000003.tar").write_bytes(b"\0" * 100)  # a broken shard (not its indexed size, not a tar)
    dataset = ShardDataset(folder, ImageTransform(32, "center"), options=ShardOptions(retries=1))
    with caplog.at_level("WARNING"):
        batch = collate_images([dataset[i] for i in range(len(dataset))])
    assert batch["skipped"] == 1 + PER_SHARD
    assert batch["pixel_values"].shape[0] == SHARDS * PER_SHARD - 1 - PER_SHARD
    assert sum("skipping shard" in r.message and "000003.tar" in r.message for r in caplog.records) == 1


def test_a_partial_download_left_by_a_killed_process_is_replaced_in_one_try(shards, tmp_path):
    options = ShardOptions(cache_dir=str(tmp_path / "cache"), retries=1)
    cache = ShardCache(options)
    with ShardServer(shards) as server:
        urls = [f"{server.url}/{i:06d}.tar" for i in range(3)]
        for url in urls:  # the partial files (the locks) hold what a download killed midway had written
            part = Path(cache.partial(cache.dest(url)))
            part.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(b"x" * 700)
        assert cache.get(urls[0]) == cache.dest(urls[0])  # one try: a leftover would make it fail
        cache.fetch_all(urls[1:], [os.path.getsize(shards / f"{i:06d}.tar") for i in (1, 2)])
        assert all(cache.cached(url) for url in urls)
        assert all(server.requests[f"GET /{i:06d}.tar"] == 1 for i in range(3))
    for i, url in enumerate(urls):
        assert Path(cache.dest(url)).read_bytes() == (shards / f"{i:06d}.tar").read_bytes()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".part")]


def test_unreachable_shard_is_retried_with_backoff_then_skipped(shards, tmp_path):
    options = ShardOptions(cache_dir=str(tmp_path / "cache"), retries=3, backoff_s=0.05)
    with ShardServer(shards, fail=("/000002.tar",)) as server:
        dataset = ShardDataset(f"{server.url}/shardindex.json", options=options)
        start = time.monotonic()
        samples = [dataset[i] for i in range(len(dataset))]
        elapsed = time.monotonic() - start
        assert server.requests["GET /000002.tar"] == 3  # three tries, then never again in this process
        with pytest.raises(ShardUnavailable, match="000002.tar: 3 tries failed"):
            ShardCache(options).get(f"{server.url}/000002.tar")
    assert [s is None for s in samples] == [2 * PER_SHARD <= i < 3 * PER_SHARD for i in range(len(samples))]
    assert elapsed >= 0.05 + 0.1  # the waits double


def test_cache_keeps_to_its_budget(shards, tmp_path):
    size = os.path.getsize(shards / "000000.tar")
    options = ShardOptions(cache_dir=str(tmp_path / "cache"), cache_gb=2.5 * size / 2**30)
    with ShardServer(shards) as server:
        dataset = ShardDataset(f"{server.url}/shardindex.json", options=options)
        for shard in range(4):
            assert dataset[shard * PER_SHARD] is not None
            time.sleep(0.01)  # distinct modification times
    cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert cached == ["000002.tar", "000003.tar"]  # the two most recent fit in 2.5 shards


def test_a_use_moves_a_shard_in_the_eviction_order_once_it_is_older_than_touch_s(shards, tmp_path):
    cache = ShardCache(ShardOptions(cache_dir=str(tmp_path)))
    with ShardServer(shards) as server:
        old, recent = (Path(cache.get(f"{server.url}/{i:06d}.tar")) for i in (0, 1))
        now = time.time()
        os.utime(old, (now - 2 * cache.TOUCH_S,) * 2)
        os.utime(recent, (now - cache.TOUCH_S / 2,) * 2)
        assert [cache.get(f"{server.url}/{i:06d}.tar") for i in (0, 1)] == [str(old), str(recent)]
        assert server.requests["GET /000000.tar"] == server.requests["GET /000001.tar"] == 1
    assert old.stat().st_mtime >= now and recent.stat().st_mtime == pytest.approx(now - cache.TOUCH_S / 2)


def test_read_index_rejects_a_malformed_index(tmp_path):
    (tmp_path / "shardindex.json").write_text(json.dumps({"shardlist": [{"url": "a.tar"}]}))
    with pytest.raises(ValueError, match="lacks a 'shardlist'"):
        read_index(str(tmp_path))
    (tmp_path / "shardindex.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_index(str(tmp_path))


def test_dataset_pickles_for_spawned_workers(shards, tmp_path):
    dataset = ShardDataset(shards, ImageTransform(32, "center"), options=ShardOptions(cache_dir=str(tmp_path)))
    first = dataset[3]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=collate_images,
                                         multiprocessing_context="spawn")
    batch = next(iter(loader))
    torch.testing.assert_close(batch["pixel_values"][3], first["pixel_values"], rtol=0, atol=0)
