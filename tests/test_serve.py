"""The loopback stand-in for an object store (data.serve): its added latency and bandwidth cap, the answers to HEAD
requests, and the files of one and of several blocks served whole."""

import http.client
import time

from data.serve import BLOCK, ShardServer


def _exchange(server: ShardServer, method: str, path: str) -> tuple[float, http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
    start = time.perf_counter()
    conn.request(method, path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return time.perf_counter() - start, response, body


def test_latency_and_bandwidth_cap(tmp_path):
    small, large = b"s" * 1000, bytes(range(256)) * (3 * BLOCK // 256 + 7)  # one block; four, the last one short
    (tmp_path / "small.bin").write_bytes(small)
    (tmp_path / "large.bin").write_bytes(large)
    latency, mbit_s = 0.15, 8.0  # 1 MB/s: the large file's 197 KB take 0.2 s
    with ShardServer(tmp_path, latency_s=latency, mbit_s=mbit_s) as server:
        for path, data in (("/small.bin", small), ("/large.bin", large)):
            took, response, body = _exchange(server, "GET", path)
            assert response.status == 200 and body == data
            assert int(response.getheader("Content-Length")) == len(data)
            least = latency + len(data) / (mbit_s * 1e6 / 8)
            assert least <= took < least + 0.15, (path, took, least)
            took, response, body = _exchange(server, "HEAD", path)
            assert response.status == 200 and body == b"" and int(response.getheader("Content-Length")) == len(data)
            assert latency <= took < latency + 0.15
        took, response, _ = _exchange(server, "GET", "/missing.bin")
        assert response.status == 404 and latency <= took
    with ShardServer(tmp_path) as server:  # neither: answered at once
        took, response, body = _exchange(server, "GET", "/large.bin")
        assert body == large and took < 0.1
