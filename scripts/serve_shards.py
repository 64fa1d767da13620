"""Serve a folder over HTTP on the loopback address with an added per-request latency and a bandwidth cap (a stand-in
for an object store: data/serve.py), until Ctrl-C; the data benchmark runs its server this way, in a process of its
own.

    python scripts/serve_shards.py runs/shards --latency-ms 20 --mbit-s 200
"""

from __future__ import annotations

import argparse
import threading

from data.serve import ShardServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the folder to serve")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    parser.add_argument("--mbit-s", type=float, default=0.0, help="bandwidth cap per request (0: none)")
    args = parser.parse_args()
    with ShardServer(args.root, args.latency_ms / 1000, args.mbit_s) as server:
        print(f"serving {args.root} at {server.url}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
