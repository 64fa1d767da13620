"""What `train/tokenizer.py` reads: its config dataclasses (yaml sections and `key=value` paths follow the field
names), the resolution of the model sections from a preset (stage 1) or the stage-1 export (stage 2), and where a
stage-1 export is found. Importable without the trainer (e.g. by scripts/ablate_codebook.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.config import ConfigError, from_dict, merge_dicts, to_dict
from data.shard_cache import ShardOptions
from tokenizer.config import DecoderConfig, EncoderConfig, QuantizerConfig, VQRAEConfig, get_preset
from tokenizer.discriminator import DiscriminatorConfig
from tokenizer.model import is_vqrae_export, read_config_dict
from tokenizer.objective import LossConfig
from train.config import DebugConfig, RunConfig
from train.engine import DeepSpeedConfig, OptimConfig
from train.exports import find_export

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "tokenizer"
MODEL_SECTIONS = ("encoder", "quantizer", "decoder")


@dataclass
class ModelSection:
    """Args:
    preset: a name in tokenizer.config.PRESETS: the starting values of encoder / quantizer / decoder in stage 1.
    encoder_path: local pretrained vision tower (stage 1; SigLIP2 on a cluster, the world's SigLIP on the CPU
        default); the tower's own config then replaces encoder.tower. Empty: a randomly initialised encoder (an
        ablation: the paper's point is that the encoder is pretrained).
    init_from: stage 2: a stage-1 export (config.json + model.safetensors) or a stage-1 run folder; its config is
        the model's, and encoder / quantizer / decoder values that differ from it are refused.
    gradient_checkpointing: recompute transformer layers in the backward pass.
    encoder, quantizer, decoder: the VQRAE config (`model.quantizer.codebook_size=32768` overrides the preset's).
    """

    preset: str = "tiny"
    encoder_path: str = ""
    init_from: str = ""
    gradient_checkpointing: bool = False
    encoder: EncoderConfig = field(default_factory=lambda: get_preset("tiny").encoder)
    quantizer: QuantizerConfig = field(default_factory=lambda: get_preset("tiny").quantizer)
    decoder: DecoderConfig = field(default_factory=lambda: get_preset("tiny").decoder)

    @property
    def vqrae(self) -> VQRAEConfig:
        return VQRAEConfig(encoder=self.encoder, quantizer=self.quantizer, decoder=self.decoder)


@dataclass
class DataConfig:
    """Args: train / eval: dataset paths (image folder, jsonl, local tar shards, or indexed shards: a URL, brace
    pattern or shardindex.json); crop: "random" | "center" | "resize"; hflip: random flips; samples: images shown in
    the periodic reconstruction grid; shards: fetching, caching and ordering of indexed shards."""

    train: str = ""
    eval: str = ""
    crop: str = "random"
    hflip: bool = False
    samples: int = 8
    shards: ShardOptions = field(default_factory=ShardOptions)


@dataclass
class TokenizerTrainConfig:
    """Everything `train/tokenizer.py` reads (yaml sections and `key=value` paths follow the field names).

    Args:
        stage: 1 (encoder frozen) or 2 (encoder trained at lr * encoder_lr_scale, distilled to a frozen copy).
        encoder_lr_scale: the encoder's learning-rate multiplier in stage 2.
        ema_decay: EMA decay of every trained tensor (exports use the EMA).
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

    @classmethod
    def resolve_raw(cls, data: dict) -> dict:
        """Fill model.encoder / quantizer / decoder from the preset (stage 1) or the stage-1 export (stage 2), the
        values the user gave merged on top; in stage 2 they must equal the export's."""
        stage = data.get("stage", 1)
        if stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {stage!r}")
        model = data.setdefault("model", {})
        if not isinstance(model, dict):
            raise ConfigError(f"config section 'model' must be a mapping, got {model!r}")
        given = {k: model.pop(k) for k in MODEL_SECTIONS if k in model}
        if stage == 2:
            if not model.get("init_from"):
                raise ConfigError("stage 2 starts from a stage-1 tokenizer: set model.init_from")
            base = read_config_dict(resolve_init(model["init_from"]))
        else:
            base = to_dict(get_preset(model.get("preset", ModelSection.preset)))
        merged = merge_dicts(base, given)
        if stage == 2 and merged != base:
            key, ours, theirs = _first_difference(base, merged)
            raise ConfigError(f"stage 2 continues the tokenizer of model.init_from, whose model.{key} is {ours!r}: "
                              f"it cannot become {theirs!r}")
        from_dict(VQRAEConfig, merged, prefix="model.")  # consistent as a whole
        model.update(merged)
        return data


def _first_difference(a: dict, b: dict, prefix: str = "") -> tuple[str, object, object]:
    """(dotted key, value in a, value in b) of the first key where two nested dicts differ."""
    for k in sorted(a.keys() | b.keys()):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            if va != vb:
                return _first_difference(va, vb, f"{prefix}{k}.")
        elif va != vb:
            return f"{prefix}{k}", va, vb
    raise ValueError("the dicts are equal")


def resolve_init(init_from: str) -> Path:
    """A stage-1 export directory from `model.init_from` (an export, or a run folder holding export/)."""
    return find_export(init_from, is_vqrae_export, "model.init_from", "tokenizer export (config.json + "
                       "model.safetensors)")
