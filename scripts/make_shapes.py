"""Export the shapes world (data/shapes.py) to disk, or write its held-out GenEval prompt file.

    python scripts/make_shapes.py --out runs/shapes64 --num 100000 --size 64 --seed 0 --format both
    python scripts/make_shapes.py --geneval-prompts data/shapes_geneval_prompts.jsonl

Re-running with the same arguments skips every file already complete; other settings in the same folder are refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root first

from data.shapes import HELDOUT_SEED, PROMPTS_PER_TASK, write_geneval_prompts
from data.shapes_export import export_world


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and export. Args: argv: arguments (default sys.argv[1:])."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--num", type=int, default=1000, help="number of samples (indices 0 .. num-1)")
    parser.add_argument("--size", type=int, default=64, help="image side: a multiple of 8 in [32, 256]")
    parser.add_argument("--seed", type=int, default=0, help="world seed (training splits use 0, 1, ...)")
    parser.add_argument("--format", choices=("folder", "shards", "both"), default="folder")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--geneval-prompts", type=Path, help="write the held-out GenEval prompt file here instead")
    parser.add_argument("--prompts-per-task", type=int, default=PROMPTS_PER_TASK)
    parser.add_argument("--prompts-seed", type=int, default=HELDOUT_SEED, help="seed in the held-out namespace")
    args = parser.parse_args(argv)
    try:
        if args.geneval_prompts is not None:
            write_geneval_prompts(args.geneval_prompts, args.prompts_per_task, args.prompts_seed)
            print(f"wrote {args.geneval_prompts}")
        elif args.out is None:
            parser.error("--out is required (or --geneval-prompts)")
        else:
            export_world(args.out, args.num, image_size=args.size, seed=args.seed, fmt=args.format,
                         shard_size=args.shard_size)
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
