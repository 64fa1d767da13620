"""HTTP GET on keep-alive connections (data.http) against the loopback server: one connection per thread and host,
a connection the server closed while idle replaced, redirects followed on the same connection, errors raised with
their status, a forked process on its own connection, a proxy honoured through urllib; a group of requests sent at
once on kept connections, with the same redirects, errors and replaced connections."""

import multiprocessing as mp
import threading
import time
import urllib.error

import pytest

from data.http import http_get, http_get_all
from data.serve import ShardServer


@pytest.fixture
def folder(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.bin").write_bytes(bytes([i]) * (1000 + i))
    (tmp_path / "sub").mkdir()
    return tmp_path


def _get(url: str) -> bytes:
    with http_get(url, timeout_s=10) as response:
        return response.read()


def test_each_thread_keeps_one_connection_per_host(folder):
    with ShardServer(folder) as server:
        assert [_get(f"{server.url}/{i}.bin") for i in range(4)] == [bytes([i]) * (1000 + i) for i in range(4)]
        assert server.requests["connections"] == 1
        threads = [threading.Thread(target=lambda: [_get(f"{server.url}/{i}.bin") for i in range(4)]) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert server.requests["connections"] == 4 and server.requests["GET /2.bin"] == 4
        with http_get(f"{server.url}/3.bin", 10) as response:
            assert response.read(10) == bytes([3]) * 10  # not read to its end: this connection is not kept
        assert _get(f"{server.url}/0.bin") == bytes([0]) * 1000
        assert server.requests["connections"] == 5
        with http_get(f"{server.url}/1.bin", 10, keep_alive=False) as response:
            assert response.read() == bytes([1]) * 1001
        assert server.requests["connections"] == 6


def test_a_connection_closed_by_the_server_is_replaced(folder):
    with ShardServer(folder, idle_s=0.2) as server:
        assert _get(f"{server.url}/0.bin") == bytes([0]) * 1000
        time.sleep(0.5)  # the server has closed the kept connection
        assert _get(f"{server.url}/1.bin") == bytes([1]) * 1001
        assert server.requests["connections"] == 2 and server.requests["GET /1.bin"] == 1


def test_redirects_are_followed_and_errors_raised(folder):
    with ShardServer(folder, fail=("/2.bin",)) as server:
        assert b"Directory listing" in _get(f"{server.url}/sub")  # 301 to /sub/
        assert server.requests["GET /sub"] == server.requests["GET /sub/"] == 1
        with pytest.raises(urllib.error.HTTPError, match="503") as err:
            _get(f"{server.url}/2.bin")
        assert err.value.code == 503
        with pytest.raises(urllib.error.HTTPError, match="404"):
            _get(f"{server.url}/missing.bin")
        assert _get(f"{server.url}/3.bin") == bytes([3]) * 1003
        assert server.requests["connections"] == 1  # kept through the redirect and the errors (bodies read)


def _reader(bodies: dict[str, bytes], fail: str = ""):
    def read(url: str, response) -> None:
        if url == fail:
            raise ValueError("unreadable")
        bodies[url] = response.read()
    return read


def test_a_group_is_sent_at_once_on_connections_kept_for_the_next(folder):
    with ShardServer(folder, latency_s=0.3) as server:
        urls = [f"{server.url}/{i}.bin" for i in range(4)]
        bodies: dict[str, bytes] = {}
        start = time.perf_counter()
        assert http_get_all(urls, 10, _reader(bodies)) == {}
        assert time.perf_counter() - start < 0.9  # one after another: 4 x 0.3 s
        assert list(bodies.items()) == [(u, bytes([i]) * (1000 + i)) for i, u in enumerate(urls)]  # in order
        assert server.requests["connections"] == 4
        assert http_get_all(urls[::-1], 10, _reader(bodies)) == {} and _get(urls[0]) == bytes([0]) * 1000
        assert server.requests["connections"] == 4 and server.requests["GET /0.bin"] == 3


def test_a_group_follows_redirects_reports_failures_and_replaces_closed_connections(folder):
    with ShardServer(folder, fail=("/2.bin",), idle_s=0.2) as server:
        url = f"{server.url}/{{}}".format
        assert _get(url("0.bin")) == bytes([0]) * 1000
        time.sleep(0.5)  # the server has closed the kept connection
        bodies: dict[str, bytes] = {}
        names = ["0.bin", "sub", "2.bin", "missing.bin", "3.bin", "1.bin"]
        failed = http_get_all([url(n) for n in names], 10, _reader(bodies, fail=url("3.bin")))
        assert {u: getattr(e, "code", str(e)) for u, e in failed.items()} == \
            {url("2.bin"): 503, url("missing.bin"): 404, url("3.bin"): "unreadable"}
        assert bodies[url("0.bin")] == bytes([0]) * 1000 and bodies[url("1.bin")] == bytes([1]) * 1001
        assert b"Directory listing" in bodies[url("sub")]  # 301 to /sub/
        assert server.requests["GET /0.bin"] == 2 and server.requests["GET /sub/"] == 1


def _child(url: str, queue) -> None:
    queue.put(_get(url))


def test_a_forked_process_opens_its_own_connection(folder):
    with ShardServer(folder) as server:
        assert _get(f"{server.url}/0.bin") == bytes([0]) * 1000
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child, args=(f"{server.url}/1.bin", queue))
        child.start()
        assert queue.get(timeout=30) == bytes([1]) * 1001
        child.join(timeout=30)
        assert _get(f"{server.url}/2.bin") == bytes([2]) * 1002  # the parent's connection is intact
        assert server.requests["connections"] == 2


def test_a_configured_proxy_carries_the_request(folder, monkeypatch):
    with ShardServer(folder) as proxy, ShardServer(folder) as server:
        monkeypatch.setenv("http_proxy", proxy.url)
        monkeypatch.setenv("no_proxy", "")
        with pytest.raises(urllib.error.HTTPError, match="404"):  # the proxy gets the absolute URL: not a file
            _get(f"{server.url}/0.bin")
        assert proxy.requests[f"GET {server.url}/0.bin"] == 1 and server.requests["connections"] == 0
        failed = http_get_all([f"{server.url}/1.bin"], 10, _reader({}))
        assert [e.code for e in failed.values()] == [404]
        assert proxy.requests[f"GET {server.url}/1.bin"] == 1 and server.requests["connections"] == 0
