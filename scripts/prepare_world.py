"""The CPU default's prepare step: write the shapes world to disk and pretrain its foundation models (a SigLIP and a
Qwen3) on it; every later phase reads what this writes (world/prepare.py has the layout).

    python scripts/prepare_world.py                    # data, then siglip, then lm; a step whose output exists is skipped
    python scripts/prepare_world.py data               # one or more steps by name
    python scripts/prepare_world.py siglip.run.steps=500 out=runs/world-small   # key=value overrides
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from common.cli import reported_errors
from train.config import read_config
from world.prepare import DEFAULT_CONFIG, STEPS, PrepareConfig, prepare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="STEP | key=value",
                        help=f"steps to run ({', '.join(STEPS)}; default all) and config overrides")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"yaml config (default {DEFAULT_CONFIG})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args(argv)  # steps, overrides and options in any order
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    steps = tuple(a for a in args.items if "=" not in a) or STEPS
    with reported_errors():
        cfg = read_config(PrepareConfig, args.config, [a for a in args.items if "=" in a])
        prepare(cfg, steps, progress=not args.no_progress)


if __name__ == "__main__":
    main()
