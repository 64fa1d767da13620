"""Atomic training checkpoints: every rank's DeepSpeed shards in a temporary folder, renamed once all are written,
so a folder named checkpoints/step_* is always complete; and the consolidated fp32 weights an export reads."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ConfigError
from common.distributed import DistInfo, barrier
from common.files import atomic_write

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
RNG_DIR = "rng"  # one file per rank: the random generators' states (dropout, noise)
log = logging.getLogger("vqrae")


def rng_state() -> dict[str, Any]:
    """This process's random generators (torch CPU and CUDA, numpy, python), in a form torch.load reads with
    weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def is_checkpoint(path: Path) -> bool:
    """A complete checkpoint folder."""
    return (path / STATE_FILE).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints/step_* folders of a run folder, oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*") if is_checkpoint(p))


def find_checkpoint(path: Path) -> Path:
    """A checkpoints/step_* folder as given, or the latest complete one of a run folder."""
    if is_checkpoint(path):
        return path
    done = complete_checkpoints(path)
    if not done:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run folder with complete checkpoints")
    return done[-1]


class Checkpointer:
    """Atomic checkpoints in output_dir/checkpoints/step_XXXXXXXX.

    Every rank writes its DeepSpeed shards into a temporary folder; after a barrier rank 0 writes trainer_state.json
    and renames the folder, so a folder named step_* is always complete. `latest()` ignores anything else.
    """

    def __init__(self, output_dir: Path, info: DistInfo, keep: int):
        self.output_dir, self.root = output_dir, output_dir / "checkpoints"
        self.info, self.keep = info, keep

    def latest(self) -> Path | None:
        done = complete_checkpoints(self.output_dir)
        return done[-1] if done else None

    def save(self, step: int, engines: dict[str, Any], state: dict[str, Any],
             files: dict[str, Callable[[Path], None]] | None = None) -> Path:
        """Args: engines: name -> DeepSpeed engine (collective: every rank calls this); state: json-able trainer
        state; files: name -> callable(path) run on rank 0 to write extra files (e.g. EMA weights)."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(tmp), tag=name)
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / RNG_DIR / f"rank_{self.info.rank:05d}.pt")
        barrier()
        if self.info.is_main:
            for name, write in (files or {}).items():
                write(tmp / name)
            with atomic_write(tmp / STATE_FILE) as f:
                json.dump({**state, "step": step}, f, indent=2)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = complete_checkpoints(self.output_dir)
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from for `run.resume` ("auto", "none", or a path)."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not is_checkpoint(path):
            raise FileNotFoundError(f"run.resume={resume}: not a complete checkpoint (no {STATE_FILE})")
        return path

    def load(self, path: Path, engines: dict[str, Any]) -> dict[str, Any]:
        """Load every engine's shards (model, optimizer, scheduler) and this rank's random generators; return the
        trainer state."""
        for name, engine in engines.items():
            if not (path / name).is_dir():  # DeepSpeed would fail an assert
                raise FileNotFoundError(f"checkpoint {path} has no DeepSpeed state for '{name}'")
            try:
                load_path, _ = engine.load_checkpoint(str(path), tag=name)
            except RuntimeError as e:  # missing / unexpected keys or shapes: another model or code version wrote it
                if "state_dict" not in str(e):
                    raise
                raise ConfigError(f"checkpoint {path} does not fit this run's '{name}' "
                                  f"({str(e).splitlines()[-1].strip()}): it was written by another model "
                                  "configuration or code version; set run.resume=none or a new run.output_dir") from e
            if load_path is None:
                raise FileNotFoundError(f"checkpoint {path} has no DeepSpeed state for '{name}'")
        rng = path / RNG_DIR / f"rank_{self.info.rank:05d}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=True))
        else:
            log.warning("checkpoint %s has no random-generator state for rank %d: dropout and noise will differ "
                        "from the interrupted run", path, self.info.rank)
        return json.loads((path / STATE_FILE).read_text())


def consolidated_state_dict(checkpoint: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 module state dict of engine `tag` in a checkpoint folder, on CPU, whatever the ZeRO stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = checkpoint / tag
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} has no '{tag}' folder")
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):  # ZeRO 1-3: fp32 master weights live in the shards
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
    module = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
