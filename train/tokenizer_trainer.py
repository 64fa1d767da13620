"""The VQRAE tokenizer's trainer (`TokenizerTrainer`): stage 1 and stage 2 of train/tokenizer.py, whose docstring
states the recipe; its configs are in train/tokenizer_config.py."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.config import merge_dicts, to_dict
from common.distributed import DistInfo
from data.images import build_image_dataset, collate_images
from data.transforms import ImageTransform, make_grid_png
from tokenizer.discriminator import build_discriminator
from tokenizer.losses import build_lpips
from tokenizer.model import VQRAE
from tokenizer.objective import LeCAMState, discriminator_loss, generator_loss
from train.config import require_paths
from train.ema import EMA
from train.engine import build_engine, deepspeed_json
from train.exports import EMA_FILE, TOKENIZER_CONFIG, export_tokenizer
from train.loop import TrainLoop
from train.run_folder import prepare_run_dir
from train.tokenizer_config import TokenizerTrainConfig, resolve_init

log = logging.getLogger("vqrae")
def build_model(cfg: TokenizerTrainConfig) -> VQRAE:
    """Stage 1: the resolved model config, encoder from encoder_path if given. Stage 2: the stage-1 export."""
    if cfg.stage == 2:
        return VQRAE.from_pretrained(resolve_init(cfg.model.init_from))
    if cfg.model.encoder_path:
        return VQRAE.from_pretrained_encoder(cfg.model.vqrae, cfg.model.encoder_path)
    log.warning("model.encoder_path is empty: the encoder is RANDOMLY initialised (an ablation, not the recipe)")
    return VQRAE(cfg.model.vqrae)


def param_groups(model: VQRAE, cfg: TokenizerTrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only; the encoder (stage 2) at lr * encoder_lr_scale. Groups are
    named "base" and "encoder" for the logged learning rates."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (name.startswith("encoder."), p.ndim >= 2 and "pos_embed" not in name)
            groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": cfg.optim.weight_decay if decay else 0.0,
             "lr": cfg.optim.lr * (cfg.encoder_lr_scale if is_encoder else 1.0),
             "name": "encoder" if is_encoder else "base"}
            for (is_encoder, decay), ps in sorted(groups.items())]


def sample_batch(cfg: TokenizerTrainConfig, image_size: int) -> torch.Tensor:
    """The fixed images of the periodic reconstruction grid (eval set if given, else train set)."""
    dataset = build_image_dataset(cfg.data.eval or cfg.data.train, ImageTransform(image_size, "center"),
                                  shards=cfg.data.shards)
    samples = [dataset[i] for i in range(min(cfg.data.samples, len(dataset)))]
    return collate_images(samples)["pixel_values"]


# ----------------------------------------------------------------------------------------------------------------


class TokenizerTrainer(TrainLoop):
    """Stage 1 / stage 2 tokenizer training: one engine for VQRAE, one for the discriminator."""

    def __init__(self, cfg: TokenizerTrainConfig, info: DistInfo):
        super().__init__(cfg.run, cfg.debug, cfg.deepspeed.grad_accum_steps, info)
        self.cfg = cfg
        require_paths({"data.train": cfg.data.train, "data.eval": cfg.data.eval,
                       "model.encoder_path": cfg.model.encoder_path if cfg.stage == 1 else ""})
        model = build_model(cfg)
        cfg.model.encoder, cfg.model.quantizer, cfg.model.decoder = (model.config.encoder, model.config.quantizer,
                                                                     model.config.decoder)  # as built
        prepare_run_dir(cfg, self.out_dir, info)
        self.image_size = model.config.encoder.image_size
        self.patch = model.config.output_patch_size
        self.dtype = cfg.deepspeed.dtype
        self.teacher = None
        if cfg.stage == 1:
            model.freeze_encoder()
        else:  # T: a frozen copy of the encoder as it is at the start of stage 2
            self.teacher = copy.deepcopy(model.encoder).requires_grad_(False).eval().to(info.device, self.dtype)
        model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
        self.lpips = None
        if cfg.loss.lpips_weight > 0:
            self.lpips = build_lpips(cfg.loss.lpips_vgg_path or None, cfg.loss.allow_random_lpips).to(info.device)
        self.vqrae_config = to_dict(model.config)
        self.ema = EMA({n: p for n, p in model.named_parameters() if p.requires_grad}, cfg.ema_decay)
        ds_json = deepspeed_json(cfg.deepspeed, cfg.optim, info.world_size)
        self.engine = build_engine(model, param_groups(model, cfg), cfg.optim, cfg.run.steps, ds_json,
                                   cfg.deepspeed.compile)
        if self.teacher is not None and cfg.deepspeed.compile:
            self.teacher.compile()
        self.engines = {"model": self.engine}
        self.disc = None
        if cfg.loss.gan_weight > 0:
            # The discriminator runs at ZeRO <= 2: it is small, and replicated parameters let the generator's
            # backward pass run through it outside its own engine (a ZeRO-3 partition would be released by then).
            # Its schedule spans its own steps, from loss.disc_start to the end.
            d = build_discriminator(cfg.disc)
            d_json = merge_dicts(ds_json, {"zero_optimization": {"stage": min(cfg.deepspeed.zero_stage, 2)}})
            trainable = [p for p in d.parameters() if p.requires_grad]  # a DINO backbone stays frozen
            self.disc = build_engine(d, [{"params": trainable, "weight_decay": 0.0}], cfg.optim,
                                     max(1, cfg.run.steps - cfg.loss.disc_start), d_json)
            self.engines["disc"] = self.disc
        self.lecam = LeCAMState()
        self.resume()
        dataset = build_image_dataset(cfg.data.train, ImageTransform(self.image_size, cfg.data.crop, cfg.data.hflip),
                                      seed=cfg.run.seed, shards=cfg.data.shards)
        self.loader = self.make_loader(dataset, collate_images, cfg.deepspeed.micro_batch_size)
        self.grid_images = sample_batch(cfg, self.image_size).to(info.device, self.dtype)
        log.info("stage %d: %s encoder, %d images/step, step %d of %d", cfg.stage, model.config.encoder.model_type,
                 cfg.deepspeed.micro_batch_size * cfg.deepspeed.grad_accum_steps * info.world_size,
                 self.state["step"], cfg.run.steps)

    def micro_step(self, batch: dict) -> tuple[torch.Tensor, dict] | None:
        if batch["pixel_values"].shape[0] == 0:
            return None
        self.x = x = batch["pixel_values"].to(self.info.device, self.dtype, non_blocking=True)
        if self.disc is not None:
            self.disc.module.requires_grad_(False)
        self.out = self.engine(x)
        loss, parts = generator_loss(self.cfg.loss, self.out, x, self.state["step"], self.lpips, self.teacher,
                                     self.disc.module if self.disc is not None else None, self.patch,
                                     bf16=self.cfg.deepspeed.bf16)
        return loss, parts | self.out.metrics

    def after_backward(self, batch: dict, metrics: dict) -> None:
        if self.disc is None or self.state["step"] < self.cfg.loss.disc_start:
            return
        self.disc.module.requires_grad_(True)
        # self.x: this micro-batch, already on the device (micro_step moved it)
        d_loss, d_parts = discriminator_loss(self.cfg.loss, self.disc, self.x, self.out.reconstruction, self.lecam)
        self.disc.backward(d_loss)
        self.disc.step()
        metrics.update(d_parts)

    def after_step(self, step: int) -> None:
        self.ema.update(step)

    def write_samples(self, step: int) -> None:
        """Originals over reconstructions; every rank runs the forward (ZeRO-3 gathers collectively)."""
        self.engine.eval()
        with torch.no_grad():
            rec = self.engine(self.grid_images).reconstruction
        self.engine.train()
        if self.info.is_main:
            path = self.out_dir / "samples" / f"step_{step:08d}.png"
            make_grid_png([self.grid_images.float().cpu(), rec.float().clamp(-1, 1).cpu()], path, min_cell=128)

    def checkpoint_files(self) -> dict:
        return {EMA_FILE: lambda p: save_file(self.ema.state_dict(), str(p)),
                TOKENIZER_CONFIG: lambda p: p.write_text(json.dumps(self.vqrae_config, indent=2))}

    def load_checkpoint_files(self, path: Path) -> None:
        self.ema.load_state_dict(load_file(str(path / EMA_FILE)))
        self.lecam = LeCAMState(*self.state.get("lecam", (0.0, 0.0)))

    def extra_state(self) -> dict:
        return {"lecam": [self.lecam.real, self.lecam.fake], "stage": self.cfg.stage}

    def finish(self, checkpoint: Path) -> None:
        if self.info.is_main:
            export_tokenizer(checkpoint, self.out_dir / "export", weights="ema")
            log.info("exported %s", self.out_dir / "export")
