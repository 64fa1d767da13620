"""The autoregressive generator's trainer and its config (`ARGenTrainer`, `ARGenTrainConfig`): what train/ar_gen.py
runs, whose docstring states the recipe."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import ConfigError
from common.distributed import DistInfo, barrier
from data.codes import CHUNK_SIZE, CodeDataset, ensure_manifest, extract_codes
from data.images import build_image_dataset
from data.sequences import CaptionCodeSequences, collate_sequences
from data.shard_cache import ShardOptions
from data.transforms import ImageTransform
from llm.generator import LMConfig, build_lm, save_text_side
from llm.sampler import recommended_settings, save_recommended
from tokenizer import VQRAE
from train.config import DebugConfig, RunConfig, require_paths
from train.engine import DeepSpeedConfig, OptimConfig, build_engine, deepspeed_json
from train.exports import GENERATOR_META, TEXT_SIDE, export_generator
from train.loop import TrainLoop
from train.run_folder import prepare_run_dir
from train.samples import SampleGrid, SampleSection

log = logging.getLogger("vqrae")
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "ar_gen"


@dataclass
class GenDataConfig:
    """Args: codes: a directory of extracted codes; vqrae: the VQRAE export they came from; images: when `codes`
    does not exist yet, extract it from these images first (chunks of chunk_size images, batches of
    extract_batch_size; indexed shards read with `shards`); caption_dropout: probability of the unconditional prompt."""

    codes: str = ""
    vqrae: str = ""
    images: str = ""
    caption_dropout: float = 0.1
    chunk_size: int = CHUNK_SIZE
    extract_batch_size: int = 64
    shards: ShardOptions = field(default_factory=ShardOptions)


@dataclass
class ARGenTrainConfig:
    """Everything `train/ar_gen.py` reads (yaml sections and `key=value` paths follow the field names)."""

    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    data: GenDataConfig = field(default_factory=GenDataConfig)
    sample: SampleSection = field(default_factory=SampleSection)
    debug: DebugConfig = field(default_factory=DebugConfig)


def ensure_codes(cfg: ARGenTrainConfig, vqrae: VQRAE, info: DistInfo) -> Path:
    """The code directory; with data.images set, its missing chunks are extracted first (every rank takes its share;
    complete chunks are kept, so an interrupted extraction resumes)."""
    codes = Path(cfg.data.codes)
    if not cfg.data.images:
        return codes
    dataset = build_image_dataset(cfg.data.images, ImageTransform(vqrae.config.encoder.image_size, "center"),
                                  shards=cfg.data.shards)
    if info.is_main:
        codes.mkdir(parents=True, exist_ok=True)
        ensure_manifest(codes, cfg.data.vqrae, vqrae.config, cfg.data.images, len(dataset), cfg.data.chunk_size)
    barrier()
    counts = extract_codes(vqrae.to(info.device).eval(), dataset, codes, chunk_size=cfg.data.chunk_size,
                           batch_size=cfg.data.extract_batch_size, rank=info.rank, world=info.world_size,
                           progress=info.is_main)
    barrier()
    log.info("extracted codes of %d images to %s (%d unreadable skipped, this rank)", counts["images"], codes,
             counts["skipped"])
    return codes


class ARGenTrainer(TrainLoop):
    """Next-code prediction of a causal LM with an expanded vocabulary on caption + code sequences."""

    def __init__(self, cfg: ARGenTrainConfig, info: DistInfo):
        super().__init__(cfg.run, cfg.debug, cfg.deepspeed.grad_accum_steps, info)
        self.cfg = cfg
        if not cfg.data.vqrae:
            raise ConfigError("data.vqrae must name the VQRAE export whose codes the LM learns")
        require_paths({"data.vqrae": cfg.data.vqrae, "lm.pretrained": cfg.lm.pretrained,
                       "data.images": cfg.data.images,
                       "data.codes": "" if cfg.data.images else cfg.data.codes})
        prepare_run_dir(cfg, self.out_dir, info)
        self.vqrae = VQRAE.from_pretrained(cfg.data.vqrae).eval()
        codes = CodeDataset(ensure_codes(cfg, self.vqrae, info))
        model, self.tokenizer, self.vocab = build_lm(cfg.lm, self.vqrae, cfg.run.seed, cfg.deepspeed.dtype)
        if cfg.lm.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.hf_config = model.config.to_dict()
        self.fmt = cfg.lm.sequence_format.pinned(self.tokenizer.chat_template)
        self.sequences = CaptionCodeSequences(codes, self.tokenizer, self.vocab, self.fmt, cfg.data.caption_dropout,
                                              cfg.run.seed)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
        groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        ds_json = deepspeed_json(cfg.deepspeed, cfg.optim, info.world_size)
        self.engine = build_engine(model, groups, cfg.optim, cfg.run.steps, ds_json, cfg.deepspeed.compile)
        self.engines = {"model": self.engine}
        self.resume()
        self.loader = self.make_loader(self.sequences, functools.partial(collate_sequences, pad_id=self.vocab.pad_id),
                                       cfg.deepspeed.micro_batch_size)
        self.samples = SampleGrid(cfg.sample, self.tokenizer, self.vocab, self.fmt, self.vqrae)
        log.info("generator: %s, %d codes x %d tokens/image, %d sequences, step %d of %d",
                 model.config.model_type, self.vocab.codebook_size, codes.num_tokens, len(codes),
                 self.state["step"], cfg.run.steps)

    def micro_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        ids, labels, mask = (batch[k].to(self.info.device, non_blocking=True)
                             for k in ("input_ids", "labels", "attention_mask"))
        out = self.engine(input_ids=ids, attention_mask=mask, labels=labels)
        with torch.no_grad():  # next-code accuracy over the supervised positions
            target = labels[:, 1:]
            mask = target != -100
            correct = (out.logits[:, :-1].argmax(-1) == target) & mask
            accuracy = correct.sum().float() / mask.sum().clamp_min(1)
        return out.loss, {"token_accuracy": accuracy, "dropped_captions": batch["dropped"]}

    def write_samples(self, step: int) -> None:
        path = self.out_dir / "samples" / f"step_{step:08d}.png" if self.info.is_main else None
        self.samples.write(self.engine.module, path, self.cfg.deepspeed.zero_stage == 3)

    def checkpoint_files(self) -> dict:
        meta = {"hf_config": self.hf_config, "vqrae": str(Path(self.cfg.data.vqrae).resolve())}
        return {GENERATOR_META: lambda p: p.write_text(json.dumps(meta, indent=2)),
                TEXT_SIDE: self.save_text_side}

    def save_text_side(self, directory: Path) -> None:
        """The text side of a checkpoint, with the sampling settings the samples are drawn with (the export's
        recommendation)."""
        save_text_side(directory, self.tokenizer, self.vocab, self.fmt)
        save_recommended(directory, recommended_settings(self.cfg.sample.sampling))

    def finish(self, checkpoint: Path) -> None:
        if self.info.is_main:
            export_generator(checkpoint, self.out_dir / "export")
            log.info("exported %s", self.out_dir / "export")
