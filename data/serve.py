"""A folder served over HTTP on the loopback address, with an added per-request latency and a bandwidth cap: a
stand-in for an object store in the data benchmark and the tests (nothing outside this machine is reachable).

    with ShardServer("runs/shards", latency_s=0.02, mbit_s=200) as server:
        dataset = ShardDataset(f"{server.url}/shardindex.json")

    python -m data.serve runs/shards --latency-ms 20 --mbit-s 200      # until Ctrl-C
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as object stores
    disable_nagle_algorithm = True  # headers and body go out in separate writes: Nagle would hold the body back
    latency_s = 0.0
    bytes_per_s = 0.0  # per request; 0: no cap
    fail: frozenset[str] = frozenset()  # paths answered with 503
    requests: collections.Counter[str]  # requests per "METHOD /path"; "connections": connections accepted

    def setup(self) -> None:
        self.requests["connections"] += 1
        super().setup()

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def send_head(self):  # type: ignore[override]
        path = self.path.split("?")[0]
        self.requests[f"{self.command} {path}"] += 1
        time.sleep(self.latency_s)
        if path in self.fail:
            self.send_error(503, "unavailable")
            return None
        try:  # a file is answered here, without the type and modification-date headers that no shard reader uses
            file = open(self.translate_path(self.path), "rb")  # (their lookups are ~10% of a request's server CPU)
        except OSError:  # a folder (its listing, or the redirect to its name with a slash), a missing file
            return super().send_head()
        self.send_response(200)
        self.send_header("Content-Length", str(os.fstat(file.fileno()).st_size))
        self.end_headers()
        return file

    def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
        chunk = 64 << 10
        start, sent = time.monotonic(), 0
        while block := source.read(chunk):
            sent += len(block)
            if self.bytes_per_s:  # a block leaves when the cap allows its last byte
                ahead = sent / self.bytes_per_s - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            outputfile.write(block)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # socketserver's 5 drops the SYNs of a burst of parallel fetches: 1 s retransmit stalls


class ShardServer:
    """Serve `root` on 127.0.0.1 (a free port) in a background thread; a context manager.

    Args:
        root: the folder.
        latency_s: added before every response.
        mbit_s: bandwidth cap per request in Mbit/s (0: none).
        fail: URL paths ("/000001.tar") answered with 503 Service Unavailable.
        idle_s: a kept-alive connection idle this long is closed (None: never), as object stores do.

    `requests` counts the requests per "METHOD /path" ("GET /000001.tar") and, under "connections", the connections
    accepted (HTTP/1.1: a client may send many requests on one).
    """

    def __init__(self, root: str | Path, latency_s: float = 0.0, mbit_s: float = 0.0, fail: tuple[str, ...] = (),
                 idle_s: float | None = None):
        self.requests: collections.Counter[str] = collections.Counter()
        handler = type("Handler", (_Handler,), {"latency_s": latency_s, "bytes_per_s": mbit_s * 1e6 / 8,
                                                "fail": frozenset(fail), "requests": self.requests,
                                                "timeout": idle_s})
        self.httpd = _Server(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ShardServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--mbit-s", type=float, default=0.0)
    args = parser.parse_args()
    with ShardServer(args.root, args.latency_ms / 1000, args.mbit_s) as server:
        print(f"serving {args.root} at {server.url}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
