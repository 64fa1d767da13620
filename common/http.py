"""HTTP(S) GET over keep-alive connections: each thread keeps one open connection per host and reuses it, so a stream
of small downloads (shards of a few MB or less) pays one TCP (and TLS) handshake per host and thread rather than one
per file. Redirects are followed; a URL that a configured proxy ($http_proxy, $https_proxy, not $no_proxy; read
once per process and host:port) must carry goes through urllib instead, as does every request when keep-alive is off.

    with http_get("https://host/shards/000000.tar", timeout_s=300) as response:
        shutil.copyfileobj(response, file)
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import IO
from urllib.parse import urljoin, urlsplit

USER_AGENT = "vqrae"
MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# what a server's close of an idle keep-alive connection looks like to the next request on it
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
Connection = http.client.HTTPConnection  # or its HTTPS subclass


class _Connections(threading.local):
    """This thread's open connections by (scheme, host:port); a process forked meanwhile starts with none of its
    parent's (they share the parent's sockets)."""

    def __init__(self):
        self.pid, self.open = os.getpid(), {}

    def take(self, key: tuple[str, str]) -> Connection | None:
        if self.pid != os.getpid():
            self.pid, self.open = os.getpid(), {}
        return self.open.pop(key, None)

    def give(self, key: tuple[str, str], conn: Connection) -> None:
        old = self.open.pop(key, None)
        if old is not None:
            old.close()
        self.open[key] = conn


_CONNECTIONS = _Connections()


def _proxied(url: str) -> bool:
    parts = urlsplit(url)
    return _proxied_host(parts.scheme, parts.netloc)


@functools.lru_cache(maxsize=1024)
def _proxied_host(scheme: str, netloc: str) -> bool:
    """Whether the environment's proxy settings send requests to this host:port through a proxy: read once per
    process and host:port (reading the environment costs more CPU than the request for a small download)."""
    return scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(netloc)


def _request(url: str, timeout_s: float) -> tuple[tuple[str, str], Connection, http.client.HTTPResponse]:
    """One GET of `url` on this thread's connection to its host (a new one if there is none, or if the kept one
    was closed by the server meanwhile)."""
    parts = urlsplit(url)
    key = (parts.scheme, parts.netloc)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    kept = _CONNECTIONS.take(key)
    for conn in (kept, None) if kept is not None else (None,):
        if conn is None:
            kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = kind(parts.hostname, parts.port, timeout=timeout_s)
        try:
            conn.request("GET", target, headers={"User-Agent": USER_AGENT})
            return key, conn, conn.getresponse()
        except STALE:
            conn.close()
            if conn is not kept:
                raise
        except BaseException:
            conn.close()
            raise
    raise AssertionError("unreachable")


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
    for _ in range(MAX_REDIRECTS + 1):
        key, conn, response = _request(url, timeout_s)
        if response.status == 200:
            break
        location = response.getheader("Location")
        response.read()  # to its end: the connection stays usable
        _CONNECTIONS.give(key, conn)
        if response.status not in REDIRECTS or not location:
            raise urllib.error.HTTPError(url, response.status, response.reason, response.headers, None)
        url = urljoin(url, location)
        if urlsplit(url).scheme not in ("http", "https") or _proxied(url):
            raise urllib.error.HTTPError(url, response.status, f"redirect to {url} not followed", response.headers,
                                         None)
    else:
        raise urllib.error.HTTPError(url, response.status, f"more than {MAX_REDIRECTS} redirects", response.headers,
                                     None)
    try:
        yield response
    except BaseException:
        conn.close()
        raise
    if response.isclosed():  # read to its end
        _CONNECTIONS.give(key, conn)
    else:
        conn.close()
