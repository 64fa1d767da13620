"""Shared by the tests that launch subprocesses."""

from __future__ import annotations

import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def failure_report(proc: subprocess.CompletedProcess, chars: int = 4000) -> str:
    """The exit status, the first traceback of stderr (the cause, in a multi-process run: the other ranks' errors
    follow it) and the end of stderr."""
    err = proc.stderr or ""
    first = err.find("Traceback")
    head = err[first : first + chars] if first >= 0 else ""
    return f"exit status {proc.returncode}\n--- first traceback:\n{head}\n--- end of stderr:\n{err[-chars:]}"


def free_port() -> int:
    """A TCP port free on this machine now (for a launcher's --master_port; a fixed port can collide with a run
    still shutting down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fresh_process(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh process outside any launcher (it sets up its own one-process group): DeepSpeed on
    the CPU, the repository on the path, one OpenMP thread, no launcher variables inherited; output captured."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_script(path: str, argv: list[str]) -> None:
    """Run an entry script (a path under the repository) in this process as `python path *argv` would: its module
    runs as __main__, so tests call it the way users do instead of importing it (entry scripts are never imported)."""
    saved = sys.argv
    sys.argv = [str(REPO / path), *argv]
    try:
        runpy.run_path(str(REPO / path), run_name="__main__")
    finally:
        sys.argv = saved
