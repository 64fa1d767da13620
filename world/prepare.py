"""The prepare step of the CPU default: the shapes world written to disk, then its foundation models pretrained on
it, everything the later phases read, in the layouts real data and real checkpoints have:

    OUT/train/       20,000 images of world seed 0   image folder + captions.jsonl, tar shards, LLaVA json, questions
    OUT/val/            500 images of world seed 2   the same formats: for choosing sizes, steps and learning rates
    OUT/heldout/        500 images of world seed 1   the same formats: every reported number
    OUT/geneval_prompts.jsonl       held-out GenEval prompts (60 per task); geneval_prompts_val.jsonl: validation
    OUT/dpg/                        the DPG-style prompt set (prompts/, dpg_bench.csv)
    OUT/siglip/                     the vision foundation model: a SigLIP checkpoint folder (world/siglip.py)
    OUT/qwen3/                      the language model: a Qwen3 causal-LM folder (world/lm.py)
    OUT/data.json                   the data's settings (written last); siglip/ and qwen3/ hold pretraining.json

    python scripts/prepare_world.py                  # every step; each is skipped when its output exists
    python scripts/prepare_world.py data             # one step: data, siglip or lm

A step's output appears whole or not at all; a step made with other settings is refused rather than mixed; the
pretraining steps resume from OUT/.work/ when killed.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from common.config import to_dict
from common.files import ensure_settings, write_atomic
from world.dpg import write_dpg_bench
from world.export import export_llava, export_world
from world.lm import LMPretrainConfig, pretrain_lm
from world.pretrain import RECORD
from world.shapes import HELDOUT_SEED, write_geneval_prompts
from world.siglip import SiglipPretrainConfig, pretrain_siglip

log = logging.getLogger("vqrae")
STEPS = ("data", "siglip", "lm")
SPLITS = ("train", "val", "heldout")
DATA_DONE = "data.json"
SIGLIP_DIR = "siglip"
LM_DIR = "qwen3"
PROMPTS = "geneval_prompts.jsonl"
VAL_PROMPTS = "geneval_prompts_val.jsonl"
DPG_DIR = "dpg"
DEFAULT_CONFIG = Path(__file__).with_name("prepare.yaml")  # the CPU default
WORK_DIR = ".work"


@dataclass
class SplitSection:
    """One split of the world: `samples` images of world seed `seed`."""

    samples: int = 500
    seed: int = 0


@dataclass
class PrepareConfig:
    """Everything `scripts/prepare_world.py` reads (key=value paths follow the field names; the CPU default's values
    are world/prepare.yaml's).

    Args:
        out: the folder it writes. image_size: the world's image side (the tokenizer's input size).
        shard_size: images per tar shard. train / val / heldout: the splits (seeds distinct: no image is shared).
        prompts_per_task, val_prompts_per_task: GenEval prompts per task of the held-out set (prompt seed 0) and of the
            validation set (prompt seed 1). dpg_prompts: prompts of the DPG-style set.
        siglip, lm: the foundation models and their pretraining.
    """

    out: str = "runs/world"
    image_size: int = 32
    shard_size: int = 1000
    train: SplitSection = field(default_factory=SplitSection)
    val: SplitSection = field(default_factory=SplitSection)
    heldout: SplitSection = field(default_factory=SplitSection)
    prompts_per_task: int = 60
    val_prompts_per_task: int = 40
    dpg_prompts: int = 120
    siglip: SiglipPretrainConfig = field(default_factory=SiglipPretrainConfig)
    lm: LMPretrainConfig = field(default_factory=LMPretrainConfig)

    def __post_init__(self) -> None:
        seeds = [getattr(self, s).seed for s in SPLITS]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"the splits need distinct world seeds, got train/val/heldout {seeds}")


def step_settings(cfg: PrepareConfig, step: str) -> dict:
    """What a step's output is made from: the data settings, and for a pretraining step its own section too."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "siglip", "lm")}
    return data if step == "data" else {"data": data, step: to_dict(getattr(cfg, step))}


def settings_record(cfg: PrepareConfig, step: str) -> Path:
    """Where a finished step records `step_settings` (the data step's completion marker; a model folder's file)."""
    out = Path(cfg.out)
    return {"data": out / DATA_DONE, "siglip": out / SIGLIP_DIR / RECORD, "lm": out / LM_DIR / RECORD}[step]


def write_data(cfg: PrepareConfig, progress: bool = True) -> Path:
    """Every split in every format, the GenEval prompt files and the DPG-style set; OUT/data.json (its settings)
    last."""
    out = Path(cfg.out)
    for name in SPLITS:
        split = getattr(cfg, name)
        export_world(out / name, split.samples, cfg.image_size, split.seed, "both", cfg.shard_size, progress)
        export_llava(out / name, split.samples, cfg.image_size, split.seed, progress)
    write_geneval_prompts(out / PROMPTS, cfg.prompts_per_task, HELDOUT_SEED)
    write_geneval_prompts(out / VAL_PROMPTS, cfg.val_prompts_per_task, HELDOUT_SEED + 1)
    write_dpg_bench(out / DPG_DIR, cfg.dpg_prompts, image_size=cfg.image_size)
    write_atomic(out / DATA_DONE, json.dumps(step_settings(cfg, "data"), indent=2) + "\n")
    return out / DATA_DONE


def prepare(cfg: PrepareConfig, steps: tuple[str, ...] = STEPS, progress: bool = True) -> None:
    """Run `steps` in order. A step whose output exists is skipped if it was made with these settings and refused
    otherwise (delete it to redo it); a pretraining step resumes from its work folder, made with these settings."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown prepare step(s) {unknown}; the steps are {', '.join(STEPS)}")
    out = Path(cfg.out)
    for step in STEPS:
        if step not in steps:
            continue
        settings, record = step_settings(cfg, step), settings_record(cfg, step)
        if record.exists():
            ensure_settings(record, settings, write=False)
            log.info("prepare %s: %s exists, skipped", step, record.parent if step != "data" else record)
            continue
        if step != "data":
            ensure_settings(settings_record(cfg, "data"), step_settings(cfg, "data"), write=False)
            if not settings_record(cfg, "data").exists():
                raise FileNotFoundError(f"prepare {step} reads the world's data: run the data step first "
                                        "(python scripts/prepare_world.py data)")
        log.info("prepare %s", step)
        work = out / WORK_DIR / step
        if step == "data":
            write_data(cfg, progress)
            continue
        ensure_settings(work / "settings.json", settings)  # resume only what these settings started
        if step == "siglip":
            pretrain_siglip(out / "train", out / SIGLIP_DIR, cfg.siglip, cfg.image_size, work, settings, progress)
        else:
            pretrain_lm(out / "train", out / LM_DIR, cfg.lm, cfg.train.seed, work, settings, progress)
        shutil.rmtree(work)  # the step's resumable state, no longer needed
