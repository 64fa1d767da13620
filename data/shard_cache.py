"""Where shards come from: `ShardOptions`, the shard URLs (local paths, HTTP(S), anything fsspec reaches), their read
streams, and `ShardCache`, the local copies of remote shards that the processes of a machine share.

A remote shard is fetched whole, once per machine (the partial download is a file lock the other processes wait on),
alone or, for small HTTP(S) shards, in a group of requests from one thread (`ShardCache.fetch_all`); it is retried
with exponential backoff and evicted least-recently-used past a size budget. `data.shards` reads them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import braceexpand
import fsspec

from data.http import http_get, http_get_all

logger = logging.getLogger(__name__)


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
        read_ahead_samples: and at least this many samples ahead of those being read: where windows are small (many
            small shards), a window or two is read in less time than a fetch takes, and readers would wait on it.
        fetch_threads: threads fetching at once, ahead and for one micro-batch, each a shard or a group (per process).
        keep_alive: reuse each fetch thread's HTTP(S) connections to a host (off: a new connection per shard).
        group_mb: HTTP(S) shards of a known size are requested together by one thread, up to this many MB and
            `fetch_threads` shards a group (`data.http.http_get_all`: one wait and one thread woken per group, which
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
    read_ahead_samples: int = 1024
    fetch_threads: int = 16
    keep_alive: bool = True
    group_mb: float = 4.0

    def __post_init__(self):
        if min(self.window, self.retries, self.max_open, self.fetch_threads) < 1 or \
                min(self.read_ahead, self.read_ahead_samples) < 0:
            raise ValueError(f"window, retries, max_open and fetch_threads must be >= 1, read_ahead and "
                             f"read_ahead_samples >= 0, got {self.window}, {self.retries}, {self.max_open}, "
                             f"{self.fetch_threads}, {self.read_ahead}, {self.read_ahead_samples}")
        if self.cache_gb <= 0 or self.backoff_s < 0 or self.timeout_s <= 0 or self.group_mb < 0:
            raise ValueError("cache_gb and timeout_s must be > 0, backoff_s and group_mb >= 0")

    def cache_path(self) -> Path:
        return Path(self.cache_dir or os.environ.get("VQRAE_SHARD_CACHE", "") or
                    Path.home() / ".cache" / "vqrae" / "shards")


def _check_size(actual: int, size: int) -> None:
    if size >= 0 and actual != size:
        raise ValueError(f"{actual} bytes, the index says {size}")


def _same_file(file: Any, path: str) -> bool:
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


def open_url(url: str, options: ShardOptions) -> contextlib.AbstractContextManager[IO[bytes]]:
    """A binary read stream of `url`, as a context manager: a local path or file:// URL opened in place, HTTP(S)
    through the standard library on keep-alive connections (`data.http`; a connection per request through urllib
    cost a third of fsspec's CPU per request, and keep-alive halves the server's, measured by scripts/bench_data.py),
    every other scheme through fsspec (s3:// needs s3fs, gs:// gcsfs, ...)."""
    if not is_remote(url):
        return open(local_path(url), "rb")
    if is_http(url):
        return http_get(url, options.timeout_s, keep_alive=options.keep_alive)
    return fsspec.open(url, "rb").open()


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
        self._dests: dict[str, str | None] = {}  # see dest()
        self._pid, self._guard = os.getpid(), threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k != "_guard"}  # a new lock over there
        return state | {"_pid": -1, "_dests": {}}  # remembered paths are remade on use

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _guard=threading.Lock())

    def dest(self, url: str) -> str | None:
        """The cache file of shard `url`, None for a local shard (used in place); remembered, as a shard is asked for
        at each use."""
        try:
            return self._dests[url]
        except KeyError:
            dest = None
            if is_remote(url):
                digest = hashlib.sha1(url.encode()).hexdigest()[:16]
                dest = str(self.root / f"{digest}-{os.path.basename(urlparse(url).path) or 'shard.tar'}")
            self._dests[url] = dest
            return dest

    @staticmethod
    def partial(dest: str) -> str:
        """The partial download of cache file `dest`, which is also its download's lock."""
        folder, name = os.path.split(dest)
        return os.path.join(folder, f".{name}.part")

    def cached(self, url: str) -> bool:
        """True for a local shard, or a remote one whose copy is in the cache."""
        dest = self.dest(url)
        return dest is None or os.path.exists(dest)

    def get(self, url: str, size: int = -1, retries: int | None = None) -> str:
        """A readable local file holding shard `url` (checked against the index's byte size when known).

        Args:
            retries: tries before giving up (default: options.retries).

        Raises:
            ShardUnavailable: after the last failed try.
        """
        tries = retries or self.options.retries
        dest = self.dest(url)
        if dest is None:
            return self._retry(url, lambda: self._check_local(local_path(url), size), tries)
        with contextlib.suppress(FileNotFoundError):
            if time.time() - os.stat(dest).st_mtime > self.TOUCH_S:
                os.utime(dest)  # its place in the eviction order
            return dest
        with self._claim(dest, wait=True) as file:
            if file is not None:
                self._added(dest, self._retry(url, lambda: self._download(url, file, dest, size), tries))
        return dest

    def fetch_all(self, urls: list[str], sizes: list[int]) -> None:
        """Fetch these remote shards into the cache, one try each, the HTTP(S) ones together when keep_alive is on
        (`http_get_all`: one wait and one thread woken for the lot). A shard that another process or thread is
        fetching meanwhile is left to it, a failed one to `get`, which retries."""
        with contextlib.ExitStack() as claims:
            claimed = {}
            for url, size in zip(urls, sizes):
                dest = self.dest(url)
                if not os.path.exists(dest) and (file := claims.enter_context(self._claim(dest, wait=False))) is not None:
                    claimed[url] = (file, dest, size)

            def fill(url: str, src: IO[bytes]) -> None:
                file, dest, size = claimed[url]
                self._added(dest, self._fill(src, file, dest, size))

            together = [u for u in claimed if self.options.keep_alive and is_http(u)]
            if together:
                http_get_all(together, self.options.timeout_s, fill)
            for url in claimed.keys() - set(together):
                with contextlib.suppress(Exception), open_url(url, self.options) as src:
                    fill(url, src)

    @contextlib.contextmanager
    def _claim(self, dest: str, wait: bool) -> Iterator[IO[bytes] | None]:
        """The partial download of `dest`, locked: this process's to fill and rename into place, or None when the
        shard is in place already (or, unless `wait`, when another process or thread holds the lock). The lock makes
        one download per machine; the partial file is the lock, so none is left behind per shard."""
        part = self.partial(dest)
        while True:
            with self._open_part(part) as file:
                try:
                    fcntl.flock(file, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another one is fetching it
                    yield None
                    return
                try:
                    ours = _same_file(file, part)
                    if os.path.exists(dest):
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

    def _open_part(self, part: str) -> IO[bytes]:
        try:
            return open(part, "a+b")
        except FileNotFoundError:  # the folder, made at the first download (or removed since)
            self.root.mkdir(parents=True, exist_ok=True)
            return open(part, "a+b")

    def _added(self, dest: str, size: int) -> None:
        """Account for `size` bytes fetched into `dest`, evicting past the budget when due."""
        if self._pid != os.getpid():  # a forked copy: a lock held by another thread at the fork stays held
            self._pid, self._guard, self._unscanned = os.getpid(), threading.Lock(), None
        with self._guard:
            self._unscanned = None if self._unscanned is None else self._unscanned + size
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

    def _download(self, url: str, file: IO[bytes], dest: str, size: int) -> int:
        with open_url(url, self.options) as src:
            return self._fill(src, file, dest, size)

    @staticmethod
    def _fill(src: IO[bytes], file: IO[bytes], dest: str, size: int) -> int:
        """Copy `src` into the claimed partial `file` (opened for appending) and rename it to `dest`; its size. A short
        or failed copy leaves the partial file empty."""
        if file.seek(0, os.SEEK_END):  # what a process killed mid-download left (truncating an empty file costs)
            file.truncate(0)
        try:
            shutil.copyfileobj(src, file, 1 << 20)
            file.flush()
            fetched = os.fstat(file.fileno()).st_size
            _check_size(fetched, size)  # a short read is a failed try
        except BaseException:
            file.truncate(0)  # nothing half-fetched stays on disk
            raise
        os.replace(file.name, dest)
        return fetched

    def _evict(self, keep: str) -> None:
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
            if path != keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # processes that have it open keep reading it
                total -= size
