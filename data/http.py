"""HTTP(S) GET over keep-alive connections: each thread keeps its open connections per host and reuses them, so a
stream of small downloads (shards of a few MB or less) pays one TCP (and TLS) handshake per connection rather than
one per file. Redirects are followed; a URL that a configured proxy ($http_proxy, $https_proxy, not $no_proxy; read
once per process and host:port) must carry goes through urllib instead, as does every request when keep-alive is off.
`http_get_all` sends a group of requests at once from one thread and reads the answers in turn: one wait for the
group, and one thread woken, instead of one per file.

    with http_get("https://host/shards/000000.tar", timeout_s=300) as response:
        shutil.copyfileobj(response, file)
    failed = http_get_all(urls, timeout_s=300, read=lambda url, response: ...)
"""

from __future__ import annotations

import collections
import contextlib
import functools
import http.client
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import IO
from urllib.parse import SplitResult, urljoin, urlsplit

USER_AGENT = "vqrae"
MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# what a server's close of an idle keep-alive connection looks like to the next request on it
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
Connection = http.client.HTTPConnection  # or its HTTPS subclass


class _Connections(threading.local):
    """This thread's open connections by (scheme, host:port), idle ones only; a process forked meanwhile starts with
    none of its parent's (they share the parent's sockets)."""

    def __init__(self):
        self.pid, self.open = os.getpid(), collections.defaultdict(list)

    def take(self, key: tuple[str, str]) -> Connection | None:
        if self.pid != os.getpid():
            self.pid, self.open = os.getpid(), collections.defaultdict(list)
        kept = self.open[key]
        return kept.pop() if kept else None

    def give(self, key: tuple[str, str], conn: Connection) -> None:
        self.open[key].append(conn)


_CONNECTIONS = _Connections()


def _proxied(url: str) -> bool:
    parts = urlsplit(url)
    return _proxied_host(parts.scheme, parts.netloc)


@functools.lru_cache(maxsize=1024)
def _proxied_host(scheme: str, netloc: str) -> bool:
    """Whether the environment's proxy settings send requests to this host:port through a proxy: read once per
    process and host:port (reading the environment costs more CPU than the request for a small download)."""
    return scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(netloc)


def _key(parts: SplitResult) -> tuple[str, str]:
    return parts.scheme, parts.netloc


def _connect(parts: SplitResult, timeout_s: float) -> Connection:
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return kind(parts.hostname, parts.port, timeout=timeout_s)


def _send(conn: Connection, parts: SplitResult) -> None:
    conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                 headers={"User-Agent": USER_AGENT})


def _request(url: str, timeout_s: float) -> tuple[tuple[str, str], Connection, http.client.HTTPResponse]:
    """One GET of `url` on this thread's connection to its host (a new one if there is none, or if the kept one
    was closed by the server meanwhile)."""
    parts = urlsplit(url)
    key = _key(parts)
    kept = _CONNECTIONS.take(key)
    for conn in (kept, None) if kept is not None else (None,):
        conn = conn or _connect(parts, timeout_s)
        try:
            _send(conn, parts)
            return key, conn, conn.getresponse()
        except STALE:
            conn.close()
            if conn is not kept:
                raise
        except BaseException:
            conn.close()
            raise
    raise AssertionError("unreachable")


def _follow(url: str, key: tuple[str, str], conn: Connection, response: http.client.HTTPResponse, timeout_s: float
            ) -> tuple[tuple[str, str], Connection, http.client.HTTPResponse]:
    """The 200 response to `url`, following the redirects `response` starts; the connections of the others are kept
    for the next request.

    Raises:
        urllib.error.HTTPError: a status other than 200 (after redirects).
    """
    for redirects in range(MAX_REDIRECTS + 1):
        if response.status == 200:
            return key, conn, response
        location = response.getheader("Location")
        response.read()  # to its end: the connection stays usable
        _CONNECTIONS.give(key, conn)
        if response.status not in REDIRECTS or not location:
            raise urllib.error.HTTPError(url, response.status, response.reason, response.headers, None)
        if redirects == MAX_REDIRECTS:
            break
        url = urljoin(url, location)
        if urlsplit(url).scheme not in ("http", "https") or _proxied(url):
            raise urllib.error.HTTPError(url, response.status, f"redirect to {url} not followed", response.headers,
                                         None)
        key, conn, response = _request(url, timeout_s)
    raise urllib.error.HTTPError(url, response.status, f"more than {MAX_REDIRECTS} redirects", response.headers, None)


def _done(key: tuple[str, str], conn: Connection, response: http.client.HTTPResponse) -> None:
    """Keep the connection for this thread's next request to the host if the body was read to its end."""
    if response.isclosed():
        _CONNECTIONS.give(key, conn)
    else:
        conn.close()


@contextlib.contextmanager
def http_get(url: str, timeout_s: float, keep_alive: bool = True) -> Iterator[IO[bytes]]:
    """The body of `url` as a read stream; the connection is kept for this thread's next request to the host when
    the body was read to its end.

    Args:
        url: an http:// or https:// URL.
        timeout_s: a connect or a read waiting longer than this fails.
        keep_alive: reuse connections (off: one connection per request, through urllib).

    Raises:
        urllib.error.HTTPError: a status other than 200 (after redirects).
    """
    if not keep_alive or _proxied(url):
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler())  # today's proxy settings, not the first
        with opener.open(request, timeout=timeout_s) as response:
            yield response
        return
    key, conn, response = _follow(url, *_request(url, timeout_s), timeout_s)
    try:
        yield response
    except BaseException:
        conn.close()
        raise
    _done(key, conn, response)


def http_get_all(urls: list[str], timeout_s: float, read: Callable[[str, IO[bytes]], None]) -> dict[str, Exception]:
    """GET every URL, the requests sent together (each on its own kept-alive connection of this thread) before any
    answer is read, and hand each body to `read(url, stream)`, in order; a URL a proxy must carry, or whose kept
    connection the server had closed, is fetched alone afterwards. For many small files: the thread waits once for
    the group and is woken once, where a thread per file would be woken once per file.

    Args:
        urls: http:// or https:// URLs.
        timeout_s: a connect or a read waiting longer than this fails.
        read: reads one body (to its end, or the connection is not kept).

    Returns:
        the failure of each URL that failed, by URL (an HTTPError for a status other than 200, what `read` raised).
    """
    failed: dict[str, Exception] = {}
    sent: list[tuple[str, tuple[str, str], Connection]] = []
    alone: list[str] = []

    def drop(url: str, conn: Connection, err: Exception) -> None:
        conn.close()
        if isinstance(err, STALE):  # a kept connection the server closed meanwhile: try again on a new one
            alone.append(url)
        else:
            failed[url] = err

    try:
        for url in urls:
            parts = urlsplit(url)
            if _proxied(url):
                alone.append(url)
                continue
            key = _key(parts)
            conn = _CONNECTIONS.take(key) or _connect(parts, timeout_s)
            try:
                _send(conn, parts)
            except Exception as err:
                drop(url, conn, err)
                continue
            sent.append((url, key, conn))
        while sent:
            url, key, conn = sent.pop(0)
            try:
                response = conn.getresponse()
            except Exception as err:
                drop(url, conn, err)
                continue
            try:
                key, conn, response = _follow(url, key, conn, response, timeout_s)
            except Exception as err:  # _follow kept or closed the connection
                failed[url] = err
                continue
            try:
                read(url, response)
            except BaseException as err:
                conn.close()
                if not isinstance(err, Exception):
                    raise
                failed[url] = err
                continue
            _done(key, conn, response)
    finally:
        for _, _, conn in sent:  # left unread by an exception that ends the group
            conn.close()
    for url in alone:
        try:
            with http_get(url, timeout_s) as response:
                read(url, response)
        except Exception as err:
            failed[url] = err
    return failed
