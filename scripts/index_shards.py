"""Write the shard index the trainers start from (wids' format, the same as `widsindex create`): every shard read
once, its samples counted. Run it once per dataset; the trainers then start in O(shards).

    python scripts/index_shards.py '/data/laion/{000000..009999}.tar'                  # -> /data/laion/shardindex.json
    python scripts/index_shards.py 's3://bucket/shards/{000000..009999}.tar' -o shardindex.json --threads 64
    #   then upload shardindex.json next to the shards (or pass its path as the dataset)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common.cli import reported_errors
from data.images import SHARD_INDEX
from data.shard_cache import expand_urls, is_remote
from data.shards import write_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="shard paths, URLs or brace patterns, in order")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help=f"the index file (default: {SHARD_INDEX} in the local shards' folder)")
    parser.add_argument("--threads", type=int, default=16, help="shards read at once")
    args = parser.parse_args()
    with reported_errors():
        urls = [u for spec in args.shards for u in expand_urls(spec)]
        if args.out is None:
            if is_remote(urls[0]):
                raise ValueError("remote shards: pass --out (the index is written locally; upload it next to them)")
            args.out = Path(os.path.dirname(urls[0]) or ".") / SHARD_INDEX
        index = write_index(urls, args.out, threads=args.threads)
        total = sum(s["nsamples"] for s in index["shardlist"])
        print(f"{args.out}: {len(urls)} shards, {total} samples")


if __name__ == "__main__":
    main()
