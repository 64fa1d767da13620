"""Convert LLaVA data (a conversation json + its image folder) into indexed webdataset shards that the understanding
trainer reads from local disk, HTTP(S) or an object store (`data.train=...`): per sample the image file as it is and
its LLaVA sample as a json member (a text-only sample: the json member alone, in its place), then the shard index.
Resumable: complete shards are kept on a rerun.

    python scripts/llava_to_shards.py --conversations /data/llava/llava_v1_5_mix665k.json \\
        --image-root /data/llava/images --out /data/llava/shards-665k --shard-size 2000
    #   then: deepspeed train/understanding.py --config ... data.train=/data/llava/shards-665k
    #   (or copy the folder to s3://bucket/llava-665k/ and pass s3://bucket/llava-665k/shardindex.json)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import reported_errors
from data.llava import read_conversations, write_llava_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=Path, required=True, help="a LLaVA json file")
    parser.add_argument("--image-root", type=Path, required=True, help="the folder its image paths are relative to")
    parser.add_argument("--out", type=Path, required=True, help="output folder (shards, shardindex.json)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = parser.parse_args()
    with reported_errors():
        counts = write_llava_shards(read_conversations(args.conversations), args.image_root, args.out,
                                    args.shard_size)
        print(f"{args.out}: {counts['samples']} samples in {counts['shards']} shards"
              + (f" ({counts['text_only']} of them text-only)" if counts["text_only"] else "")
              + (f"; {counts['missing']} samples left out (image not found)" if counts["missing"] else ""))


if __name__ == "__main__":
    main()
