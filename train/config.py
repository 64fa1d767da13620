"""The config sections every trainer shares and the trainers' command line:

    deepspeed train/<phase>.py [--config FILE.yaml] [key=value ...]

Dataclass defaults <- the yaml (any subset) <- `key=value` overrides; unknown keys and wrong types are one-line
errors (exit status 2). `--local_rank` (DeepSpeed's launcher) is accepted; the rank comes from the environment.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml

from common.cli import reported_errors
from common.config import ConfigError, load_config
from train.guard import NonFiniteLossError

T = TypeVar("T")
PREPARE_COMMAND = "python scripts/prepare_world.py"  # writes the CPU default's data and foundation models
DEMO_COMMAND = "bash scripts/cpu_demo.sh"  # runs the CPU default's phases in order


def require_paths(paths: dict[str, str]) -> None:
    """Refuse, in one line, a config key naming a local path that does not exist (remote URLs and brace patterns
    are the data readers' to check); the line names the commands that write the CPU default's inputs.

    Args:
        paths: config key -> its value (empty values are not checked).
    """
    for key, value in paths.items():
        if value and "://" not in value and "{" not in value and not Path(value).exists():
            raise FileNotFoundError(f"{key}={value} not found (on the CPU default, `{PREPARE_COMMAND}` writes the data "
                                    f"and the pretrained SigLIP and Qwen3, `{DEMO_COMMAND}` every phase's output in "
                                    f"order; or point {key} at your own)")


@dataclass
class RunConfig:
    """Args:
    output_dir: run folder (config, checkpoints, exports, samples, TensorBoard); reused by resume.
    steps: optimizer steps to train. seed: global seed (data order, crops, noise).
    log_every / ckpt_every / sample_every: intervals in optimizer steps (0 disables).
    keep_checkpoints: most recent complete checkpoints kept.
    resume: "auto" (latest complete checkpoint in output_dir, else start fresh), "none", or a checkpoint path.
    max_bad_steps: consecutive non-finite-loss micro-steps tolerated before training stops with an error.
    num_workers: DataLoader worker processes per rank; -1: this rank's share of the machine's cores (at most 8).
    tensorboard / wandb_project: loggers.
    """

    output_dir: str = "runs/default"
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500
    resume: str = "auto"
    max_bad_steps: int = 20
    num_workers: int = -1
    tensorboard: bool = True
    wandb_project: str = ""


@dataclass
class DebugConfig:
    """Args: nan_steps: fault injection for testing the trainers' guards: micro-steps whose loss is replaced by NaN;
    kill_at_step: fault injection for resume tests: every rank SIGKILLs itself after this optimizer step (0: never);
    sample_log: every rank writes the dataset indices of each micro-batch it reads, a line per micro-batch, to
    OUTPUT/samples/rank_RRRRR.txt (a resumed run first drops the lines after its checkpoint), to audit what a run
    read."""

    nan_steps: tuple[int, ...] = ()
    kill_at_step: int = 0
    sample_log: bool = False


def parse_config(cfg_cls: type[T], argv: Sequence[str] | None, default_config: Path, description: str) -> T:
    """`script.py [--config FILE.yaml] [key=value ...]`; no arguments -> `default_config`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help=f"yaml config (default {default_config})")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.steps=100")
    args = parser.parse_args(argv)
    return read_config(cfg_cls, args.config or default_config, args.overrides)


def read_config(cfg_cls: type[T], path: Path, overrides: Sequence[str] = ()) -> T:
    """A config dataclass from a yaml file (e.g. a run folder's resolved config.yaml) and overrides."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid yaml: {' '.join(str(err).split())}") from None
    return load_config(cfg_cls, data, overrides)


def run_entry_point(main: Callable[[], None]) -> None:
    """Run a trainer's main(); expected failures (bad config or input, missing files, a diverged loss) end with one
    clear line on stderr and exit status 2 instead of a traceback."""
    with reported_errors(ValueError, FileNotFoundError, NonFiniteLossError):
        main()
