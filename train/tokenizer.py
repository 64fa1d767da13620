"""Two-stage VQRAE tokenizer training under DeepSpeed ZeRO.

    deepspeed train/tokenizer.py                                       # CPU default: tiny, stage 1, shapes world
    deepspeed train/tokenizer.py --config train/configs/tokenizer/tiny-stage2.yaml
    deepspeed --num_gpus 8 train/tokenizer.py --config train/configs/tokenizer/siglip2-stage1.yaml \
        model.encoder_path=/ckpt/siglip2-so400m-patch16-256 loss.lpips_vgg_path=/ckpt/vgg16-397923af.pth \
        data.train=/data/shards run.output_dir=runs/siglip2-stage1

Stage 1: encoder frozen; quantizer + decoder learn L2 + LPIPS + lambda_G * adaptive * GAN + VQ.
Stage 2: starts from a stage-1 export (model.init_from); the encoder trains too (its own lr scale) with
lambda_d * ||E(X) - T(X)||^2 to T, a frozen copy of the encoder taken at the start of stage 2.
The run folder holds config.yaml, run.json (git SHA), metrics.jsonl, tb/, samples/, checkpoints/, export/.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data.images import build_image_dataset, collate_images
from data.transforms import ImageTransform, make_grid_png
from tokenizer.config import ConfigError, VQRAEConfig, from_dict, get_preset, to_dict
from tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from tokenizer.losses import (
    adaptive_gan_weight,
    build_lpips,
    distillation_loss,
    hinge_d_loss,
    hinge_g_loss,
    lecam_loss,
)
from tokenizer.model import VQRAE
from train import common, loop
from train.common import (
    DebugConfig,
    DeepSpeedConfig,
    OptimConfig,
    RunConfig,
)

log = logging.getLogger("vqrae")
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "tokenizer"


@dataclass
class ModelSection:
    """Args:
    preset: a name in tokenizer.config.PRESETS (stage 1). changes: nested partial VQRAEConfig merged into it.
    encoder_path: local pretrained vision tower (stage 1; empty = random encoder, e.g. the CPU default).
    init_from: stage 2: a stage-1 export (config.json + model.safetensors) or a stage-1 run folder.
    gradient_checkpointing: recompute transformer layers in the backward pass.
    """

    preset: str = "tiny"
    changes: dict = field(default_factory=dict)
    encoder_path: str = ""
    init_from: str = ""
    gradient_checkpointing: bool = False


@dataclass
class LossConfig:
    """Weights and schedule of the tokenizer loss (defaults: the VGT recipe; see specs/recipes.md)."""

    l2_weight: float = 1.0
    lpips_weight: float = 1.1
    lpips_vgg_path: str = ""
    allow_random_lpips: bool = False
    gan_weight: float = 0.1
    adaptive_gan: bool = True
    adaptive_max: float = 1e4
    disc_start: int = 30000
    gan_start: int = 30000
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    distill_weight: float = 0.1


@dataclass
class WorldConfig:
    """The procedural shapes world written on first use to data.train / data.eval (paths ending in /shards)."""

    train_samples: int = 0
    eval_samples: int = 0
    train_seed: int = 0
    eval_seed: int = 1


@dataclass
class DataConfig:
    """Args: train / eval: dataset paths (image folder, jsonl, tar shards); crop: "random" | "center" | "resize";
    hflip: random flips; samples: images shown in the periodic reconstruction grid."""

    train: str = ""
    eval: str = ""
    crop: str = "random"
    hflip: bool = False
    samples: int = 8
    world: WorldConfig = field(default_factory=WorldConfig)


@dataclass
class TokenizerTrainConfig:
    """Everything `train/tokenizer.py` reads (yaml sections and `key=value` paths follow the field names).

    Args:
        stage: 1 (encoder frozen) or 2 (encoder trained at lr * encoder_lr_scale, distilled to a frozen copy).
        encoder_lr_scale: the encoder's learning-rate multiplier in stage 2.
        ema_decay: EMA decay of the quantizer + decoder weights (exports use the EMA).
    """

    stage: int = 1
    encoder_lr_scale: float = 0.5
    ema_decay: float = 0.999
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def resolve_init(init_from: str) -> Path:
    """A stage-1 export directory from `model.init_from` (an export, or a run folder holding export/)."""
    path = Path(init_from)
    for candidate in (path, path / "export"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise FileNotFoundError(f"model.init_from={init_from}: no tokenizer export (config.json + model.safetensors) "
                            "there or in its export/ folder")


def build_model(cfg: TokenizerTrainConfig) -> VQRAE:
    """Stage 1: the preset (+ changes), encoder from encoder_path if given. Stage 2: the stage-1 export."""
    if cfg.stage == 2:
        if not cfg.model.init_from:
            raise ConfigError("stage 2 starts from a stage-1 tokenizer: set model.init_from")
        return VQRAE.from_pretrained(resolve_init(cfg.model.init_from))
    merged = common.merge_dicts(to_dict(get_preset(cfg.model.preset)), cfg.model.changes)
    vqrae_cfg = from_dict(VQRAEConfig, merged, prefix="model.changes.")
    if cfg.model.encoder_path:
        return VQRAE.from_pretrained_encoder(vqrae_cfg, cfg.model.encoder_path)
    log.warning("model.encoder_path is empty: the encoder is RANDOMLY initialised (fine for the CPU demo only)")
    return VQRAE(vqrae_cfg)


def param_groups(model: VQRAE, cfg: TokenizerTrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only; the encoder (stage 2) at lr * encoder_lr_scale."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (name.startswith("encoder."), p.ndim >= 2 and "pos_embed" not in name)
            groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": cfg.optim.weight_decay if decay else 0.0,
             "lr": cfg.optim.lr * (cfg.encoder_lr_scale if is_encoder else 1.0)}
            for (is_encoder, decay), ps in groups.items()]


def ensure_world(path: str, samples: int, image_size: int, seed: int, info: common.DistInfo) -> None:
    """Write the shapes world to `path` (which must end in /shards) unless it is already there (rank 0)."""
    if samples <= 0 or Path(path).exists():
        return
    if Path(path).name != "shards":
        raise ConfigError(f"data.world writes tar shards: the data path must end in /shards, got {path}")
    if info.is_main:
        from data.shapes import export_world

        log.info("writing %d shapes-world images (seed %d) to %s", samples, seed, path)
        export_world(Path(path).parent, samples, image_size=image_size, seed=seed, fmt="shards")
    common.barrier()


def sample_batch(cfg: TokenizerTrainConfig, image_size: int) -> torch.Tensor:
    """The fixed images of the periodic reconstruction grid (eval set if given, else train set)."""
    dataset = build_image_dataset(cfg.data.eval or cfg.data.train, ImageTransform(image_size, "center"))
    samples = [dataset[i] for i in range(min(cfg.data.samples, len(dataset)))]
    return collate_images(samples)["pixel_values"]


class DiscriminatorState:
    """LeCAM running means of the discriminator's real / fake logits."""

    def __init__(self, real: float = 0.0, fake: float = 0.0):
        self.real, self.fake = real, fake

    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, decay: float) -> None:
        self.real = decay * self.real + (1 - decay) * logits_real.float().mean().item()
        self.fake = decay * self.fake + (1 - decay) * logits_fake.float().mean().item()


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step


def generator_loss(cfg: TokenizerTrainConfig, out, x, step, lpips, teacher, disc, patch: int
                   ) -> tuple[torch.Tensor, dict]:
    """The full generator-side loss and its parts (pure wiring of tokenizer.losses). `disc` is the discriminator
    module (not its engine: no engine backward hooks), None without GAN; `patch` is the decoder's output patch size
    (for the adaptive GAN weight)."""
    rec = out.reconstruction
    parts = {"l2": F.mse_loss(rec.float(), x.float())}
    rec_loss = cfg.loss.l2_weight * parts["l2"]
    if cfg.loss.lpips_weight > 0:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.deepspeed.bf16):
            parts["lpips"] = lpips(rec.float(), x.float()).float().mean()
        rec_loss = rec_loss + cfg.loss.lpips_weight * parts["lpips"]
    loss = rec_loss + out.vq_loss
    parts["vq"] = out.vq_loss
    if teacher is not None:
        with torch.no_grad():
            target = teacher(x)
        parts["distill"] = distillation_loss(out.features, target)
        loss = loss + cfg.loss.distill_weight * parts["distill"]
    if cfg.loss.gan_weight > 0 and step >= cfg.loss.gan_start:
        parts["g_adv"] = hinge_g_loss(disc(rec))
        weight = torch.tensor(1.0, device=x.device)
        if cfg.loss.adaptive_gan:
            weight = adaptive_gan_weight(rec_loss, parts["g_adv"], rec, out.decoder_states, patch,
                                         cfg.loss.adaptive_max)
        parts["gan_weight"] = weight
        loss = loss + cfg.loss.gan_weight * weight * parts["g_adv"]
    return loss, parts


def discriminator_loss(cfg: TokenizerTrainConfig, disc, x, rec, state: DiscriminatorState) -> tuple[torch.Tensor,
                                                                                                     dict]:
    """Hinge loss of the discriminator on real images and detached reconstructions, plus LeCAM against the running
    means in `state` (updated here); returns (loss, logged parts)."""
    logits_real, logits_fake = disc(x), disc(rec.detach())
    loss = hinge_d_loss(logits_real, logits_fake)
    parts = {"d_loss": loss.detach(), "logits_real": logits_real.float().mean().detach(),
             "logits_fake": logits_fake.float().mean().detach()}
    if cfg.loss.lecam_weight > 0:
        ema_real, ema_fake = (torch.tensor(v, device=x.device) for v in (state.real, state.fake))
        loss = loss + cfg.loss.lecam_weight * lecam_loss(logits_real, logits_fake, ema_real, ema_fake)
        state.update(logits_real, logits_fake, cfg.loss.lecam_decay)
    return loss, parts


# ----------------------------------------------------------------------------------------------------------------


class TokenizerTrainer(loop.TrainLoop):
    """Stage 1 / stage 2 tokenizer training: one engine for VQRAE, one for the discriminator."""

    def __init__(self, cfg: TokenizerTrainConfig, info: common.DistInfo):
        super().__init__(cfg.run, cfg.debug, cfg.deepspeed.grad_accum_steps, info)
        self.cfg = cfg
        model = build_model(cfg)
        self.image_size = model.config.encoder.image_size
        self.patch = model.config.output_patch_size
        ensure_world(cfg.data.train, cfg.data.world.train_samples, self.image_size, cfg.data.world.train_seed, info)
        if cfg.data.eval:
            ensure_world(cfg.data.eval, cfg.data.world.eval_samples, self.image_size, cfg.data.world.eval_seed, info)
        self.dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
        self.teacher = None
        if cfg.stage == 1:
            model.encoder.requires_grad_(False)
        else:  # T: a frozen copy of the encoder as it is at the start of stage 2
            self.teacher = copy.deepcopy(model.encoder).requires_grad_(False).eval().to(info.device, self.dtype)
        model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
        self.lpips = None
        if cfg.loss.lpips_weight > 0:
            self.lpips = build_lpips(cfg.loss.lpips_vgg_path or None, cfg.loss.allow_random_lpips).to(info.device)
        self.vqrae_config = to_dict(model.config)
        self.ema = loop.EMA({n: p for n, p in model.named_parameters() if not n.startswith("encoder.")},
                            cfg.ema_decay)
        ds_json = common.deepspeed_json(cfg.deepspeed, cfg.optim, info.world_size)
        self.engine = loop.build_engine(model, param_groups(model, cfg), cfg.optim, cfg.run.steps, ds_json,
                                        cfg.deepspeed.compile)
        if self.teacher is not None and cfg.deepspeed.compile:
            self.teacher.compile()
        self.ema.zero3 = cfg.deepspeed.zero_stage == 3
        self.engines = {"model": self.engine}
        self.disc = None
        if cfg.loss.gan_weight > 0:
            # The discriminator runs at ZeRO <= 2: it is small, and replicated parameters let the generator's
            # backward pass run through it outside its own engine (a ZeRO-3 partition would be released by then).
            d = PatchDiscriminator(cfg.disc)
            d_json = common.merge_dicts(ds_json, {"zero_optimization": {"stage": min(cfg.deepspeed.zero_stage, 2)}})
            self.disc = loop.build_engine(d, [{"params": list(d.parameters()), "weight_decay": 0.0}], cfg.optim,
                                          cfg.run.steps, d_json)
            self.engines["disc"] = self.disc
        self.d_state = DiscriminatorState()
        self.resume()
        dataset = build_image_dataset(cfg.data.train, ImageTransform(self.image_size, cfg.data.crop, cfg.data.hflip),
                                      seed=cfg.run.seed)
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
        loss, parts = generator_loss(self.cfg, self.out, x, self.state["step"], self.lpips, self.teacher,
                                     self.disc.module if self.disc is not None else None, self.patch)
        return loss, parts | self.out.metrics

    def after_backward(self, batch: dict, metrics: dict) -> None:
        if self.disc is None or self.state["step"] < self.cfg.loss.disc_start:
            return
        self.disc.module.requires_grad_(True)
        # self.x: this micro-batch, already on the device (micro_step moved it)
        d_loss, d_parts = discriminator_loss(self.cfg, self.disc, self.x, self.out.reconstruction, self.d_state)
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
        return {"ema.safetensors": lambda p: save_file(self.ema.state_dict(), str(p)),
                "vqrae_config.json": lambda p: p.write_text(json.dumps(self.vqrae_config, indent=2))}

    def load_checkpoint_files(self, path: Path) -> None:
        self.ema.load_state_dict(load_file(str(path / "ema.safetensors")))
        self.d_state = DiscriminatorState(*self.state.get("lecam", (0.0, 0.0)))

    def extra_state(self) -> dict:
        return {"lecam": [self.d_state.real, self.d_state.fake], "stage": self.cfg.stage}

    def finish(self, checkpoint: Path) -> None:
        if self.info.is_main:
            export(checkpoint, self.out_dir / "export", weights="ema")
            log.info("exported %s", self.out_dir / "export")


def main(argv: list[str] | None = None) -> None:
    cfg = common.parse_config(TokenizerTrainConfig, argv, CONFIG_DIR / "tiny-stage1.yaml", __doc__)
    if cfg.stage not in (1, 2):
        raise ConfigError(f"stage must be 1 or 2, got {cfg.stage}")
    info = common.init_distributed()
    common.setup_logging(info)
    common.prepare_run_dir(cfg, Path(cfg.run.output_dir), info)
    torch.manual_seed(cfg.run.seed)
    TokenizerTrainer(cfg, info).fit(cfg.run.steps, cfg)


def export(checkpoint: Path, directory: Path, weights: str = "ema") -> None:
    """Write a `VQRAE.from_pretrained` directory from a training checkpoint (any ZeRO stage, no GPU needed).

    Args:
        checkpoint: a checkpoints/step_* folder. directory: the export folder (written atomically).
        weights: "ema" (EMA of quantizer + decoder, trained encoder) or "raw".
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    config = from_dict(VQRAEConfig, json.loads((checkpoint / "vqrae_config.json").read_text()))
    with torch.device("meta"):
        model = VQRAE(config)
    state = loop.consolidated_state_dict(checkpoint, tag="model")
    if weights == "ema":
        state.update(load_file(str(checkpoint / "ema.safetensors")))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    model.save_pretrained(directory)


if __name__ == "__main__":
    common.run_entry_point(main)
