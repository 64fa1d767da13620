"""Webdataset tar shards on local disk, over HTTP(S), or anywhere fsspec reaches (s3://, gs://, ...), indexed once.

Start-up reads one file, the shard index (wids' format, `{"wids_version": 1, "shardlist": [{"url", "nsamples",
"filesize"}, ...]}`, as `widsindex create` or `scripts/index_shards.py` writes it), so it costs O(shards), not
O(samples). Samples are then addressed by a global index like any map-style dataset, which keeps the trainers'
exact, resumable data order (`train.data_order.ShardLocalBatchSampler` reads shards in windows, so a rank reads
mostly sequentially). A remote shard is copied whole into a local cache when the data order reaches the window
before its own (read-ahead; a window's small HTTP(S) shards as one group of requests), or when one of its samples is
read (`data.shard_cache`: one download per machine, the processes of a node share the cache under a file lock,
least-recently-used shards evicted past a size budget); its tar headers are scanned there once per process, its
members read by byte offset and grouped into samples by wids' rule.

A shard that cannot be fetched is retried with exponential backoff, then skipped (its samples return None and are
counted by `collate_images` as skipped) after `ShardOptions.retries` tries; a corrupt shard, or one whose sample
count disagrees with the index, is skipped the same way. A warning names each.

    dataset = ShardDataset("s3://bucket/shards/shardindex.json", ImageTransform(256, "random"), seed=0)
    dataset = ShardDataset("https://host/shards/{000000..009999}.tar")   # the index next to them: shardindex.json
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tarfile
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from wids import wids as wids_core  # group_by_key, splitname: the grouping of members into samples
from wids.wids_specs import urldir, urlmerge

from common.files import write_atomic
from data.images import (
    SHARD_INDEX,
    TAR_IMAGE_EXTS,
    ImageDataset,
    SkipSample,
    Transform,
)
from data.keys import epoch_and_index
from data.shard_cache import ShardCache, ShardOptions, expand_urls, is_http, is_remote, local_path, open_url
from data.tar_files import member_meta, read_exactly, scan_tar

logger = logging.getLogger(__name__)

INDEX_KIND = "wids-shard-index-v1"


class _Counted:
    """A read stream that counts the bytes read through it (an HTTP response cannot tell its position)."""

    def __init__(self, stream: IO[bytes]):
        self.stream, self.bytes = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.bytes += len(data)
        return data


# ----------------------------------------------------------------------------------------------------------------
# The index


def count_samples(url: str, options: ShardOptions | None = None) -> tuple[int, int]:
    """(samples, bytes) of one shard, read once as a stream; samples are wids' groups of consecutive members that
    share a key, the grouping the reader uses."""
    options = options or ShardOptions()
    with open_url(url, options) as stream:
        counted = _Counted(stream)
        with tarfile.open(fileobj=counted, mode="r|") as tar:
            names = [m.name for m in tar if m.isfile()]
        while counted.read(1 << 20):  # the reader stops at the first end-of-archive block; the file goes on
            pass
    return len(wids_core.group_by_key(names)), counted.bytes


def write_index(urls: list[str], path: str | Path, threads: int = 16, relative: bool = True) -> dict[str, Any]:
    """Count the samples of every shard (threads in parallel) and write the index to `path` atomically.

    Args:
        urls: the shards, in their order.
        path: the index file; URLs inside the index's folder are written relative to it when `relative`.
        threads: shards read at once.
        relative: write URLs relative to the index's folder where possible (the folder can then move).
    """
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        counts = list(tqdm(pool.map(count_samples, urls), total=len(urls), desc="indexing shards", unit="shard"))
    base = str(Path(path).resolve().parent)
    listed = []
    for url, (nsamples, size) in zip(urls, counts):
        name = url
        if relative and not is_remote(url) and str(Path(local_path(url)).resolve().parent) == base:
            name = Path(url).name
        listed.append({"url": name, "nsamples": nsamples, "filesize": size})
    index = {"__kind__": INDEX_KIND, "wids_version": 1, "shardlist": listed}
    write_atomic(path, json.dumps(index, indent=1) + "\n")
    return index


def read_index(spec: str) -> tuple[list[str], list[int], list[int]]:
    """(urls, samples per shard, bytes per shard or -1) of the dataset named by `spec`: an index file (.json, local
    or remote), a local folder holding `shardindex.json`, or a shard URL / brace pattern whose folder holds it (then
    only the shards the pattern names, in its order)."""
    if spec.endswith(".json"):
        index_url, wanted = spec, None
    elif not is_remote(spec) and os.path.isdir(spec):
        index_url, wanted = os.path.join(spec, SHARD_INDEX), None
    else:
        wanted = expand_urls(spec)
        index_url = urlmerge(urldir(wanted[0]), SHARD_INDEX) if is_remote(wanted[0]) else \
            os.path.join(os.path.dirname(wanted[0]) or ".", SHARD_INDEX)
    try:
        with open_url(index_url, ShardOptions()) as stream:
            index = json.loads(stream.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard index at {index_url}: write one once with "
                                f"`python scripts/index_shards.py '{spec}'`") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"shard index {index_url} is not valid JSON ({err.msg})") from None
    shards = index.get("shardlist") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"url", "nsamples"} <= set(s) for s in shards):
        raise ValueError(f"shard index {index_url} lacks a 'shardlist' of {{'url', 'nsamples'}} entries")
    base = urldir(index_url) if is_remote(index_url) else os.path.dirname(os.path.abspath(index_url))
    resolve = (lambda u: urlmerge(base, u)) if is_remote(index_url) else \
        (lambda u: u if is_remote(u) or os.path.isabs(u) else os.path.join(base, u))
    entries = {resolve(s["url"]): s for s in shards}
    if wanted is not None:
        wanted = [resolve(u) if not is_remote(u) else u for u in wanted]
        missing = [u for u in wanted if u not in entries]
        if missing:
            raise ValueError(f"{len(missing)} shards of {spec} are not in the index {index_url} (first: {missing[0]})")
    urls = wanted if wanted is not None else list(entries)
    return urls, [int(entries[u]["nsamples"]) for u in urls], [int(entries[u].get("filesize", -1)) for u in urls]


# ----------------------------------------------------------------------------------------------------------------
# The dataset


@dataclass
class _OpenShard:
    """A local shard file open for reading: its descriptor, its members (name, data offset, size) and the members of
    each sample (wids' grouping)."""

    fd: int
    members: list[tuple[str, int, int]]
    groups: list[list[int]]


class ShardDataset(ImageDataset):
    """Samples of indexed webdataset tar shards, local or remote, by global index (shard order, then member order).

    A sample is wids' group of consecutive members sharing a key: one image member (png/jpg/jpeg/webp, in that
    priority), optional "txt" caption and "json" metadata; meta gets `__key__` and `__shard__`.

    Args:
        spec: the index file, a folder holding shardindex.json, or a shard URL / brace pattern (see `read_index`).
        transform: see `ImageDataset`.
        seed: see `ImageDataset`.
        options: fetching, caching and ordering (`ShardOptions`).
        image_optional: a sample without an image member is an item whose pixel_values is None (text-only LLaVA
            samples); by default it is unreadable, skipped and counted.
    """

    def __init__(self, spec: str | Path, transform: Transform | None = None, seed: int = 0,
                 options: ShardOptions | None = None, image_optional: bool = False):
        super().__init__(transform, seed)
        self.image_optional = image_optional
        self.options = options or ShardOptions()
        self.urls, self.shard_lengths, self.shard_sizes = read_index(str(spec))
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_lengths)]).astype(np.int64)
        self.window = self.options.window
        self._cache = ShardCache(self.options)
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()  # shard -> its local file, least recent first
        self._failed: set[int] = set()
        self._pool: ThreadPoolExecutor | None = None  # this process's fetches: read-ahead, a micro-batch's shards
        self._pool_pid = os.getpid()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # descriptors and threads mean nothing in another process
        state["_pool"] = None
        return state

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, sample within the shard) of global sample i."""
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return shard, i - int(self.offsets[shard])

    def _local(self, shard: int) -> str:
        """The local file of `shard` (fetched if remote); a shard that failed is reported once and skipped."""
        if shard in self._failed:
            raise SkipSample
        try:
            return self._cache.get(self.urls[shard], self.shard_sizes[shard])
        except OSError as err:
            self._skip(shard, err)

    def _skip(self, shard: int, err: Exception) -> None:
        self._failed.add(shard)
        logger.warning("skipping shard %s (%d samples): %s", self.urls[shard], self.shard_lengths[shard], err)
        raise SkipSample from None

    def _shard(self, shard: int) -> _OpenShard:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self._local(shard)
        try:
            members = scan_tar(path)
            groups = wids_core.group_by_key([name for name, _, _ in members])
            if len(groups) != self.shard_lengths[shard]:
                raise ValueError(f"{len(groups)} samples, the index says {self.shard_lengths[shard]}")
            opened = _OpenShard(os.open(path, os.O_RDONLY), members, groups)
        except (OSError, ValueError) as err:
            self._skip(shard, err)
        self._open[shard] = opened
        while len(self._open) > self.options.max_open:
            os.close(self._open.popitem(last=False)[1].fd)
        return opened

    def _threads(self) -> ThreadPoolExecutor:
        """This process's fetch threads (a forked DataLoader worker inherits the parent's pool without its threads:
        work handed to it would never run)."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=self.options.fetch_threads, thread_name_prefix="shard-fetch")
            self._pool_pid = os.getpid()
        return self._pool

    def _groups(self, shards: list[int]) -> list[list[int]]:
        """`shards` cut, in order, into the groups fetched together (see `ShardOptions.group_mb`)."""
        budget, groups, room = self.options.group_mb * 1e6, [], -1.0
        for s in shards:
            size = self.shard_sizes[s]
            together = budget > 0 and self.options.keep_alive and is_http(self.urls[s]) and 0 <= size <= budget
            if together and groups and len(groups[-1]) < self.options.fetch_threads and size <= room:
                groups[-1].append(s)
                room -= size
            else:
                groups.append([s])
                room = budget - size if together else -1.0
        return groups

    def _fetch(self, shards: list[int]) -> list[Future]:
        """Start fetching these shards (the remote ones not failed) into the cache on this process's fetch threads,
        a group per thread, one try each."""
        remote = [s for s in shards if self._cache.dest(self.urls[s]) is not None and s not in self._failed]
        return [self._threads().submit(self._cache.fetch_all, [self.urls[s] for s in group],
                                       [self.shard_sizes[s] for s in group]) for group in self._groups(remote)]

    def read_ahead(self, shards: list[int]) -> list[Future]:
        """Start fetching these remote shards into the cache in the background (one try each: a failure is retried,
        with backoff, by the reader that needs the shard); the fetches' futures. Called by the data order in the
        process that runs it."""
        futures = self._fetch(shards)
        for future in futures:
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # the reader reports failures
        return futures

    def __getitems__(self, keys: list[Any]) -> list[dict[str, Any] | None]:
        """A micro-batch (what DataLoader's batched fetch calls): the shards it needs are fetched in parallel first,
        so a batch spread over a window of remote shards waits for about one round trip, not one per shard."""
        needed = {self.locate(epoch_and_index(k)[1])[0] for k in keys}
        missing = sorted(s for s in needed if s not in self._open and s not in self._failed and
                         not self._cache.cached(self.urls[s]))
        if len(missing) > 1:
            for future in self._fetch(missing):
                with contextlib.suppress(Exception):  # a shard that failed is tried again, and reported, when read
                    future.result()
        return [self[k] for k in keys]

    def _read(self, i: int) -> tuple[bytes | None, str, dict[str, Any], str]:
        shard, j = self.locate(i)
        opened = self._shard(shard)
        parts: dict[str, bytes] = {}
        key = ""
        for member in opened.groups[j]:
            name, offset, size = opened.members[member]
            key, ext = wids_core.splitname(name)
            parts.setdefault(ext[1:].lower(), read_exactly(opened.fd, offset, size))
        name = f"{self.urls[shard]}:{key}"
        image_ext = next((e for e in TAR_IMAGE_EXTS if e in parts), None)
        if image_ext is None and not self.image_optional:
            raise ValueError("no png/jpg/jpeg/webp member")
        meta = member_meta(parts.get("json"))
        meta.update(__key__=key, __shard__=self.urls[shard])
        return parts.get(image_ext), parts.get("txt", b"").decode("utf-8").strip(), meta, name

    def __del__(self) -> None:
        for opened in getattr(self, "_open", {}).values():
            os.close(opened.fd)
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
