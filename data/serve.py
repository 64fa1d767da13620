"""A folder served over HTTP on the loopback address, with an added per-request latency and a bandwidth cap: a
stand-in for an object store in the data benchmark and the tests (nothing outside this machine is reachable).

    with ShardServer("runs/shards", latency_s=0.02, mbit_s=200) as server:
        dataset = ShardDataset(f"{server.url}/shardindex.json")

    python scripts/serve_shards.py runs/shards --latency-ms 20 --mbit-s 200      # the same, until Ctrl-C

It runs on aiohttp's event loop in a thread of its own: an object store's CPU is not the reader's, and on the
benchmark's machine the server shares the reader's cores, so it should take as little of them as it can (a
thread per connection, as `http.server`, cost 15-20% more CPU per small request, measured in turn against the same
reader).
"""

from __future__ import annotations

import asyncio
import collections
import html
import os
import posixpath
import threading
import weakref
from pathlib import Path
from typing import IO
from urllib.parse import unquote

from aiohttp import web

BLOCK = 64 << 10  # bytes sent at once under the bandwidth cap


class ShardServer:
    """Serve `root` on 127.0.0.1 (a free port) in a background thread; a context manager.

    Args:
        root: the folder.
        latency_s: added before every response.
        mbit_s: bandwidth cap per request in Mbit/s (0: none).
        fail: URL paths ("/000001.tar") answered with 503 Service Unavailable.
        idle_s: a kept-alive connection idle this long is closed (None: never), as object stores do.

    `requests` counts the requests per "METHOD /path" ("GET /000001.tar"; the request target as sent, so a request
    meant for a proxy counts under its absolute URL and is answered 404) and, under "connections", the connections
    that sent any (HTTP/1.1: a client may send many requests on one). A folder's URL without its final slash is
    redirected to it; with it, the folder is listed.
    """

    def __init__(self, root: str | Path, latency_s: float = 0.0, mbit_s: float = 0.0, fail: tuple[str, ...] = (),
                 idle_s: float | None = None):
        self.root, self.latency_s, self.bytes_per_s = str(root), latency_s, mbit_s * 1e6 / 8
        self.fail = frozenset(fail)
        self.requests: collections.Counter[str] = collections.Counter()
        self._connections: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        app = web.Application()
        app.router.add_get("/{path:.*}", self._answer)  # and HEAD
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     keepalive_timeout=1e9 if idle_s is None else idle_s)
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024).start())
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ShardServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?")[0]
        self.requests[f"{request.method} {path}"] += 1
        if request.transport is not None and request.transport not in self._connections:
            self._connections.add(request.transport)
            self.requests["connections"] += 1
        start = asyncio.get_running_loop().time() + self.latency_s  # when the answer's first byte may leave
        if path in self.fail:
            answer = web.Response(status=503, text="unavailable")
        elif not path.startswith("/"):  # an absolute URL, meant for a proxy
            answer = web.Response(status=404, text="not found")
        else:
            target = os.path.join(self.root, posixpath.normpath(unquote(path)).lstrip("/"))  # ".." stops at the root
            try:
                file = open(target, "rb")
            except IsADirectoryError:
                answer = self._folder(path, target)
            except OSError:
                answer = web.Response(status=404, text="not found")
            else:
                with file:
                    return await self._file(request, file, start)
        await self._until(start, 0)
        return answer

    async def _file(self, request: web.Request, file: IO[bytes], start: float) -> web.StreamResponse:
        """The file's bytes, each block sent when the bandwidth cap (from `start`) allows its last byte; a file of one
        block in one write with the headers (a small shard's answer: one wait, one write)."""
        size = os.fstat(file.fileno()).st_size
        block = file.read(BLOCK) if request.method == "GET" else b""
        await self._until(start, len(block))
        if len(block) == size or request.method != "GET":
            return web.Response(body=block, headers={"Content-Length": str(size)})
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        sent = 0
        while block:
            await response.write(block)
            sent += len(block)
            block = file.read(BLOCK)
            await self._until(start, sent + len(block))
        await response.write_eof()
        return response

    async def _until(self, start: float, sent: int) -> None:
        """Wait until `sent` bytes of an answer may have left: the latency, then the bandwidth cap, from `start`."""
        wait = start + (sent / self.bytes_per_s if self.bytes_per_s else 0.0) - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)

    @staticmethod
    def _folder(path: str, target: str) -> web.Response:
        """The redirect to a folder's URL with its final slash, or the folder's listing."""
        if not path.endswith("/"):
            return web.Response(status=301, headers={"Location": path + "/"})
        names = sorted(e.name + "/" * e.is_dir() for e in os.scandir(target))
        items = "".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>' for n in names)
        return web.Response(text=f"<html><body><h1>Directory listing for {html.escape(path)}</h1><ul>{items}</ul>"
                                 "</body></html>", content_type="text/html")
