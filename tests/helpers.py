"""Shared by the tests that launch subprocesses."""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


def trainer_env() -> dict[str, str]:
    """A trainer run as a test launches it: DeepSpeed on the CPU, the repository on the path, one OpenMP thread."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def logged_losses(out: Path) -> dict[int, float]:
    """step -> loss of every line a run logged to OUT/metrics.jsonl."""
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def run_fresh_process(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh process outside any launcher (it sets up its own one-process group): DeepSpeed on
    the CPU, the repository on the path, one OpenMP thread, no launcher variables inherited; output captured."""
    env = trainer_env()
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


def assert_resume_is_uninterrupted(script: Path, argv: Callable[[Path], list[str]], tmp_path: Path, steps: int = 6,
                                   ckpt_every: int = 3, kill_at: int = 4) -> None:
    """A run of `script` killed (SIGKILL, every rank, `debug.kill_at_step`) past its checkpoint and run again logs
    the uninterrupted run's loss at every step and exports the same tensors (every safetensors file of export/).

    Args:
        argv: the run's arguments for an output folder (a stage's whole command line but the step settings).
    """
    settings = [f"run.steps={steps}", f"run.ckpt_every={ckpt_every}", "run.log_every=1"]
    outs = {name: tmp_path / name for name in ("uninterrupted", "resumed")}

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *argv(out), *settings, *extra], cwd=REPO,
                              env=trainer_env(), capture_output=True, text=True, timeout=900)

    proc = run(outs["uninterrupted"])
    assert proc.returncode == 0, failure_report(proc)
    proc = run(outs["resumed"], f"debug.kill_at_step={kill_at}")
    assert proc.returncode == -signal.SIGKILL, failure_report(proc)
    assert (outs["resumed"] / "checkpoints" / f"step_{ckpt_every:08d}").is_dir()
    assert not (outs["resumed"] / "export").exists()
    proc = run(outs["resumed"])
    assert proc.returncode == 0, failure_report(proc)
    assert "resumed from" in proc.stdout + proc.stderr
    reference, resumed = logged_losses(outs["uninterrupted"]), logged_losses(outs["resumed"])
    assert sorted(reference) == sorted(resumed) == list(range(1, steps + 1))
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step
    files = sorted(p.relative_to(outs["uninterrupted"]) for p in (outs["uninterrupted"] / "export").rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(outs["resumed"]) for p in (outs["resumed"] / "export").rglob("*.safetensors"))
    for file in files:
        a, b = load_file(outs["uninterrupted"] / file), load_file(outs["resumed"] / file)
        assert a.keys() == b.keys(), file
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{file}: {key}")
