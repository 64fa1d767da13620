"""Webdataset tar shards on local disk, over HTTP(S), or anywhere fsspec reaches (s3://, gs://, ...), indexed once.

Start-up reads one file, the shard index (wids' format, `{"wids_version": 1, "shardlist": [{"url", "nsamples",
"filesize"}, ...]}`, as `widsindex create` or `scripts/index_shards.py` writes it), so it costs O(shards), not
O(samples). Samples are then addressed by a global index like any map-style dataset, which keeps the trainers'
exact, resumable data order (`train.data_order.ShardLocalBatchSampler` reads shards in windows, so a rank reads
mostly sequentially). A remote shard is copied whole into a local cache when the data order reaches the window
before its own (read-ahead; a window's small HTTP(S) shards as one group of requests), or when one of its samples is
read (one download per machine: the processes of a node share the cache under a file lock); its tar headers are
scanned there once per process, its members read by byte offset and grouped into samples by wids' rule, and cached
shards are evicted least-recently-used past a size budget.

A shard that cannot be fetched is retried with exponential backoff, then skipped (its samples return None and are
counted by `collate_images` as skipped) after `ShardOptions.retries` tries; a corrupt shard, or one whose sample
count disagrees with the index, is skipped the same way. A warning names each.

    dataset = ShardDataset("s3://bucket/shards/shardindex.json", ImageTransform(256, "random"), seed=0)
    dataset = ShardDataset("https://host/shards/{000000..009999}.tar")   # the index next to them: shardindex.json
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tarfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import braceexpand
import fsspec
import numpy as np
from wids import wids as wids_core  # group_by_key, splitname: the grouping of members into samples
from wids.wids_specs import urldir, urlmerge

from common.files import write_atomic
from common.http import http_get, http_get_all
from data.images import (
    SHARD_INDEX,
    TAR_IMAGE_EXTS,
    ImageDataset,
    SkipSample,
    Transform,
)
from data.keys import epoch_and_index
from data.tar_files import member_meta, read_exactly, scan_tar

logger = logging.getLogger(__name__)

INDEX_KIND = "wids-shard-index-v1"


@dataclass
class ShardOptions:
    """How shards are fetched, cached and ordered.

    Args:
        window: shards read together; samples are shuffled within a window (larger: better mixing, more cache).
        cache_dir: where remote shards are copied ("": $VQRAE_SHARD_CACHE, else ~/.cache/vqrae/shards).
        cache_gb: cache budget; least recently used shards are deleted past it (a shard in use stays readable).
        retries: tries per shard before it is skipped.
        backoff_s: the wait after the first failed try; it doubles after each further one (at most 60 s).
        timeout_s: an HTTP(S) try fails when the connection or a read waits longer than this.
        max_open: open shard readers kept per process.
        read_ahead: windows fetched ahead of the one being read (by the process running the data order).
        fetch_threads: threads fetching at once, ahead and for one micro-batch, each a shard or a group (per process).
        keep_alive: reuse each fetch thread's HTTP(S) connections to a host (off: a new connection per shard).
        group_mb: HTTP(S) shards of a known size are requested together by one thread, up to this many MB and
            `fetch_threads` shards a group (`common.http.http_get_all`: one wait and one thread woken per group, which
            is most of a small shard's fetch cost); larger shards, and every shard without keep_alive or on another
            scheme, are fetched one per thread. 0: every shard alone.
    """

    window: int = 8
    cache_dir: str = ""
    cache_gb: float = 50.0
    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 300.0
    max_open: int = 16
    read_ahead: int = 2
    fetch_threads: int = 16
    keep_alive: bool = True
    group_mb: float = 4.0

    def __post_init__(self):
        if min(self.window, self.retries, self.max_open, self.fetch_threads) < 1 or self.read_ahead < 0:
            raise ValueError(f"window, retries, max_open and fetch_threads must be >= 1 and read_ahead >= 0, got "
                             f"{self.window}, {self.retries}, {self.max_open}, {self.fetch_threads}, {self.read_ahead}")
        if self.cache_gb <= 0 or self.backoff_s < 0 or self.timeout_s <= 0 or self.group_mb < 0:
            raise ValueError("cache_gb and timeout_s must be > 0, backoff_s and group_mb >= 0")

    def cache_path(self) -> Path:
        return Path(self.cache_dir or os.environ.get("VQRAE_SHARD_CACHE", "") or
                    Path.home() / ".cache" / "vqrae" / "shards")


def _check_size(actual: int, size: int) -> None:
    if size >= 0 and actual != size:
        raise ValueError(f"{actual} bytes, the index says {size}")


def _same_file(file: Any, path: Path) -> bool:
    """Whether the open `file` is still the file at `path` (not renamed away or replaced)."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


class ShardUnavailable(OSError):
    """A shard that could not be fetched after every try."""


def is_remote(url: str) -> bool:
    """True for a URL with a scheme other than file:// (fetched into the cache rather than read in place)."""
    return urlparse(url).scheme not in ("", "file") and not os.path.exists(url)


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file://") else url


def expand_urls(spec: str) -> list[str]:
    """Shard URLs named by a brace pattern ("s3://b/{000000..000099}.tar"), a comma-free single URL or path."""
    return list(braceexpand.braceexpand(spec))


def is_http(url: str) -> bool:
    return urlparse(url).scheme in ("http", "https")


def _open(url: str, options: ShardOptions) -> contextlib.AbstractContextManager[IO[bytes]]:
    """A binary read stream of `url`, as a context manager: a local path or file:// URL opened in place, HTTP(S)
    through the standard library on keep-alive connections (`common.http`; a connection per request through urllib
    cost a third of fsspec's CPU per request, and keep-alive halves the server's, measured by scripts/bench_data.py),
    every other scheme through fsspec (s3:// needs s3fs, gs:// gcsfs, ...)."""
    if not is_remote(url):
        return open(local_path(url), "rb")
    if is_http(url):
        return http_get(url, options.timeout_s, keep_alive=options.keep_alive)
    return fsspec.open(url, "rb").open()


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
    with _open(url, options) as stream:
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
        with _open(index_url, ShardOptions()) as stream:
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
# The shard cache


class ShardCache:
    """Local copies of remote shards: fetched once per machine (a file lock serialises the processes), retried with
    backoff, evicted least-recently-used past the budget. Local shards are used in place.

    The budget is kept by a scan of the cache folder, which each process repeats after it has added 1/64 of the
    budget since its last scan (a scan per download would cost O(cached shards) each), so the folder may pass the
    budget by that much per downloading process between scans. The eviction order is the files' modification
    times, which a use of a shard moves forward when it is more than TOUCH_S old.
    """

    SCAN_SHARE = 64
    TOUCH_S = 60.0  # a cached shard's use moves it in the eviction order to this precision (a write per read costs)

    def __init__(self, options: ShardOptions):
        self.options = options
        self.root = options.cache_path()
        self._unscanned: int | None = None  # bytes this process added since its last scan (None: no scan yet)
        self._pid, self._guard = os.getpid(), threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_guard"} | {"_pid": -1}  # a new lock over there

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _guard=threading.Lock())

    def path(self, url: str) -> Path:
        digest = hashlib.sha1(url.encode()).hexdigest()[:16]
        return self.root / f"{digest}-{os.path.basename(urlparse(url).path) or 'shard.tar'}"

    def cached(self, url: str) -> bool:
        """True for a local shard, or a remote one whose copy is in the cache."""
        return not is_remote(url) or self.path(url).exists()

    def get(self, url: str, size: int = -1, retries: int | None = None) -> str:
        """A readable local file holding shard `url` (checked against the index's byte size when known).

        Args:
            retries: tries before giving up (default: options.retries).

        Raises:
            ShardUnavailable: after the last failed try.
        """
        tries = retries or self.options.retries
        if not is_remote(url):
            return self._retry(url, lambda: self._check_local(local_path(url), size), tries)
        dest = self.path(url)
        with contextlib.suppress(FileNotFoundError):
            if time.time() - dest.stat().st_mtime > self.TOUCH_S:
                os.utime(dest)  # its place in the eviction order
            return str(dest)
        with self._claim(dest, wait=True) as file:
            if file is not None:
                self._retry(url, lambda: self._download(url, file, dest, size), tries)
                self._added(dest)
        return str(dest)

    def fetch_all(self, urls: list[str], sizes: list[int]) -> None:
        """Fetch these remote shards into the cache, one try each, the HTTP(S) ones together when keep_alive is on
        (`http_get_all`: one wait and one thread woken for the lot). A shard that another process or thread is
        fetching meanwhile is left to it, a failed one to `get`, which retries."""
        with contextlib.ExitStack() as claims:
            claimed = {}
            for url, size in zip(urls, sizes):
                dest = self.path(url)
                if not dest.exists() and (file := claims.enter_context(self._claim(dest, wait=False))) is not None:
                    claimed[url] = (file, dest, size)

            def fill(url: str, src: IO[bytes]) -> None:
                file, dest, size = claimed[url]
                self._fill(src, file, dest, size)
                self._added(dest)

            together = [u for u in claimed if self.options.keep_alive and is_http(u)]
            if together:
                http_get_all(together, self.options.timeout_s, fill)
            for url in claimed.keys() - set(together):
                with contextlib.suppress(Exception), _open(url, self.options) as src:
                    fill(url, src)

    @contextlib.contextmanager
    def _claim(self, dest: Path, wait: bool) -> Iterator[IO[bytes] | None]:
        """The partial download of `dest`, locked: this process's to fill and rename into place, or None when the
        shard is in place already (or, unless `wait`, when another process or thread holds the lock). The lock makes
        one download per machine; the partial file is the lock, so none is left behind per shard."""
        self.root.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f".{dest.name}.part")
        while True:
            with open(part, "a+b") as file:
                try:
                    fcntl.flock(file, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another one is fetching it
                    yield None
                    return
                try:
                    ours = _same_file(file, part)
                    if dest.exists():
                        if ours:  # a file no download needs: made by a process that came after the rename
                            os.unlink(part)
                        yield None
                        return
                    if ours:
                        yield file
                        return
                finally:  # explicitly: a process forked meanwhile holds a copy of this descriptor, and closing
                    fcntl.flock(file, fcntl.LOCK_UN)  # ours alone would leave the lock held by that copy
            # the file we waited on was renamed into place or removed meanwhile: lock the one at `part` now

    def _added(self, dest: Path) -> None:
        if self._pid != os.getpid():  # a forked copy: a lock held by another thread at the fork stays held
            self._pid, self._guard, self._unscanned = os.getpid(), threading.Lock(), None
        with self._guard:
            self._unscanned = None if self._unscanned is None else self._unscanned + dest.stat().st_size
            if self._unscanned is None or self._unscanned > self.options.cache_gb * 2**30 / self.SCAN_SHARE:
                self._evict(keep=dest)
                self._unscanned = 0

    def _retry(self, url: str, attempt: Any, tries: int) -> Any:
        wait = self.options.backoff_s
        for n in range(1, tries + 1):
            try:
                return attempt()
            except Exception as err:  # each store's client raises its own kinds: all are a failed try
                last = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
                if n < tries:
                    logger.info("shard %s: try %d of %d failed (%s); retrying in %.1f s", url, n, tries, last, wait)
                    time.sleep(wait)
                    wait = min(2 * wait, 60.0)
        raise ShardUnavailable(f"{url}: {tries} tries failed, last: {last}")

    @staticmethod
    def _check_local(path: str, size: int) -> str:
        _check_size(os.path.getsize(path), size)  # FileNotFoundError for a missing shard
        return path

    def _download(self, url: str, file: IO[bytes], dest: Path, size: int) -> None:
        with _open(url, self.options) as src:
            self._fill(src, file, dest, size)

    @staticmethod
    def _fill(src: IO[bytes], file: IO[bytes], dest: Path, size: int) -> None:
        """Copy `src` into the claimed partial `file` and rename it to `dest`; a short or failed copy leaves the
        partial file empty."""
        file.seek(0)
        file.truncate()
        try:
            shutil.copyfileobj(src, file, 1 << 20)
            file.flush()
            _check_size(os.fstat(file.fileno()).st_size, size)  # a short read is a failed try
        except BaseException:
            file.truncate(0)  # nothing half-fetched stays on disk
            raise
        os.replace(file.name, dest)

    def _evict(self, keep: Path) -> None:
        files = []
        for entry in os.scandir(self.root):
            if entry.is_file() and not entry.name.startswith("."):  # not the locks and partial downloads
                with contextlib.suppress(FileNotFoundError):  # another process may evict it meanwhile
                    stat = entry.stat()
                    files.append((stat.st_mtime, stat.st_size, entry.path))
        total, budget = sum(size for _, size, _ in files), self.options.cache_gb * 2**30
        for _, size, path in sorted(files):
            if total <= budget:
                break
            if path != str(keep):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # processes that have it open keep reading it
                total -= size


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
        remote = [s for s in shards if is_remote(self.urls[s]) and s not in self._failed]
        return [self._threads().submit(self._cache.fetch_all, [self.urls[s] for s in group],
                                       [self.shard_sizes[s] for s in group]) for group in self._groups(remote)]

    def read_ahead(self, shards: list[int]) -> list[Future]:
        """Start fetching these remote shards into the cache in the background (one try each: a failure is retried,
        with backoff, by the reader that needs the shard); the fetches' futures. Called by the data order in the
        process that runs it."""
        futures = self._fetch(shards)
        for future in futures:
            future.add_done_callback(lambda f: f.exception())  # consumed: the reader reports failures
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
