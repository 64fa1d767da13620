"""Command-line conventions shared by every entry point: expected failures end with one `error: ...` line, and the
device / dtype options mean the same everywhere."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@contextlib.contextmanager
def reported_errors(*kinds: type[Exception]) -> Iterator[None]:
    """For command-line entry points: an expected failure ends the program with one `error: ...` line on stderr and
    exit status 2 instead of a traceback.

    Args:
        kinds: the exception types that count as expected (default: FileNotFoundError and ValueError, which covers
            ConfigError: bad configuration, arguments or input files).
    """
    expected = kinds or (FileNotFoundError, ValueError)
    try:
        yield
    except expected as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_arguments(parser: argparse.ArgumentParser, dtype: str = "fp32") -> None:
    """--device (default: cuda when available) and --dtype (fp32 / bf16; read back with `dtype_of`)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device())
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=dtype, help=f"model precision (default {dtype})")


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a --dtype value."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
