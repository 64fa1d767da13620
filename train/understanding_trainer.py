"""The understanding model's trainer and its config (`UnderstandingTrainer`, `UnderstandingTrainConfig`), LLaVA-1.5
style on VQRAE's continuous features: what train/understanding.py runs (its docstring states both stages), and
what the unified trainer extends."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.config import ConfigError
from common.distributed import DistInfo
from common.weights import load_exactly
from data.llava import SKIP_REASONS, ConversationDataset, ShardConversationDataset, collate_llava, read_conversations
from data.shard_cache import ShardOptions
from llm.lm import causal_lm
from llm.understanding import build_llava, is_llava_export, load_llava, lora_config
from llm.vocab import IGNORE_INDEX
from tokenizer import VQRAE
from train.config import DebugConfig, RunConfig, require_paths
from train.engine import DeepSpeedConfig, OptimConfig, build_engine, deepspeed_json
from train.exports import (
    LLAVA_CONFIG,
    LORA_CONFIG,
    PROCESSOR_DIR,
    PROJECTOR_FILE,
    export_understanding,
    find_export,
)
from train.loop import TrainLoop
from train.run_folder import prepare_run_dir

log = logging.getLogger("vqrae")
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "understanding"


@dataclass
class UnderstandingModelConfig:
    """Args:
    vqrae: the VQRAE export whose encoder is the vision tower (stage 1, and stage 2 from a projector file).
    lm_pretrained: local causal-LM directory (Qwen3-1.7B; the CPU default: the world's Qwen3, runs/world/qwen3).
    init_from: stage 2: a stage-1 run folder or its export. projector: stage 2 instead: a stage-1
        projector.safetensors, loaded into a model built from vqrae + lm_pretrained.
    chat_format: "auto" (ChatML for a tokenizer with its markers, e.g. Qwen's; else LLaVA's vicuna_v1, e.g. Vicuna's
        sentencepiece tokenizer), "chatml" or "vicuna_v1" (llm.understanding.CHAT_FORMATS); a stage-2 run from a
        stage-1 export keeps the export's.
    train_tower: train the vision tower too (stage 2) at lr * tower_lr_scale.
    gradient_checkpointing: recompute the LM's and tower's layers in the backward pass.
    """

    vqrae: str = ""
    lm_pretrained: str = ""
    attn_implementation: str = "auto"
    init_from: str = ""
    projector: str = ""
    chat_format: str = "auto"
    train_tower: bool = False
    tower_lr_scale: float = 0.1
    gradient_checkpointing: bool = False


@dataclass
class LoraSection:
    """LoRA adapters on the LLM in stage 2 (LLaVA-1.5's LoRA recipe: r 128, alpha 256, lr 2e-4, projector 2e-5).

    Args:
        enabled: train adapters instead of the whole LLM. target_modules: the LLM's linear layers that get one.
        projector_lr: the projector's learning rate (trained fully). merge_on_export: merge the adapters into the
            exported LLM (else the export holds the base LLM and the adapter beside it, in adapter/).
    """

    enabled: bool = False
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    projector_lr: float = 2e-5
    merge_on_export: bool = True


@dataclass
class UnderstandingDataConfig:
    """Args: conversations: a LLaVA json file; image_root: the folder its image paths are relative to; train:
    instead of those two, LLaVA samples in indexed shards (`scripts/llava_to_shards.py` writes them: an index file,
    a folder holding shardindex.json, or a shard URL / brace pattern; local, https:// or any fsspec store), read
    shard-locally with `shards`; when set it replaces conversations / image_root; template: "plain" | "chat"
    (default: plain in stage 1, chat in stage 2); max_length: longest sequence kept."""

    conversations: str = ""
    image_root: str = ""
    train: str = ""
    shards: ShardOptions = field(default_factory=ShardOptions)
    template: str = ""
    max_length: int = 2048


@dataclass
class UnderstandingTrainConfig:
    """Everything `train/understanding.py` reads (yaml sections and `key=value` paths follow the field names)."""

    stage: int = 1
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    model: UnderstandingModelConfig = field(default_factory=UnderstandingModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: UnderstandingDataConfig = field(default_factory=UnderstandingDataConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {self.stage}")
        if self.stage == 1 and (self.lora.enabled or self.model.train_tower):
            raise ConfigError("stage 1 trains the projector alone: lora.enabled and model.train_tower are stage 2's")
        if self.stage == 2 and bool(self.model.init_from) == bool(self.model.projector):
            raise ConfigError("stage 2 starts from model.init_from (a stage-1 export) or model.projector (a stage-1 "
                              "projector.safetensors): set exactly one")

    @property
    def template(self) -> str:
        return self.data.template or ("plain" if self.stage == 1 else "chat")


# ----------------------------------------------------------------------------------------------------------------


def build_model(cfg: UnderstandingTrainConfig):
    """(LlavaForConditionalGeneration in fp32, processor): from a stage-1 export, or built from the VQRAE tower and
    the LM (with the stage-1 projector file loaded in stage 2)."""
    if cfg.model.init_from:
        return load_llava(find_export(cfg.model.init_from, is_llava_export, "model.init_from", "understanding export"))
    vqrae = VQRAE.from_pretrained(cfg.model.vqrae)
    lm, tokenizer = causal_lm(cfg.model.lm_pretrained, cfg.deepspeed.dtype, cfg.model.attn_implementation,
                              key="model.lm_pretrained")
    model, processor = build_llava(vqrae, lm, tokenizer, cfg.model.chat_format)
    if cfg.model.projector:  # before DeepSpeed partitions anything (the ZeRO-3 projector-loading failure)
        path = Path(cfg.model.projector)
        if not path.is_file():
            raise FileNotFoundError(f"model.projector={path} not found (a stage-1 {PROJECTOR_FILE})")
        load_exactly(model.model.multi_modal_projector, load_file(str(path)), f"model.projector={path}")
    return model, processor


def freeze(model, cfg: UnderstandingTrainConfig, trainable_tokens: list[int] | None = None):
    """Set requires_grad for the stage; with LoRA, wrap the LLM's linear layers (peft), the embedding (and head) rows
    of `trainable_tokens` training too. Returns (the model to train, the LlavaForConditionalGeneration inside it)."""
    model.requires_grad_(False)
    if cfg.stage == 2 and cfg.lora.enabled:
        from peft import get_peft_model

        lora = lora_config(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, trainable_tokens,
                           model.config.tie_word_embeddings)
        model = get_peft_model(model, lora)  # only the adapters train
    elif cfg.stage == 2:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    llava = model.get_base_model() if cfg.lora.enabled and cfg.stage == 2 else model
    llava.model.multi_modal_projector.requires_grad_(True)
    if cfg.model.train_tower:
        llava.model.vision_tower.requires_grad_(True)
    return model, llava


def param_groups(model, cfg: UnderstandingTrainConfig) -> list[dict]:
    """AdamW groups named for the logged lrs: the LLM (or its adapters) at lr ("base"), the projector at lr (or
    lora.projector_lr with LoRA), the tower at lr * tower_lr_scale; weight decay on matrices only."""
    lrs = {"base": cfg.optim.lr, "projector": cfg.lora.projector_lr if cfg.lora.enabled else cfg.optim.lr,
           "tower": cfg.optim.lr * cfg.model.tower_lr_scale}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "projector" if "multi_modal_projector" in name else "tower" if "vision_tower" in name else "base"
        groups.setdefault((part, p.ndim >= 2), []).append(p)
    return [{"params": ps, "lr": lrs[part], "weight_decay": cfg.optim.weight_decay if decay else 0.0,
             "name": part} for (part, decay), ps in sorted(groups.items())]


def with_blank_image(inputs: dict[str, torch.Tensor], image_token_id: int, num_tokens: int, pad_id: int, size: int,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A text-only batch plus one row holding an image's tokens alone, attended but never supervised, and its pixels
    (zeros: the mean colour): the forward runs the tower as a batch with images does, the loss is unchanged."""
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    length = max(ids.shape[1], num_tokens)
    widened = []
    for tensor, fill in ((ids, pad_id), (mask, 0), (labels, IGNORE_INDEX)):
        grown = tensor.new_full((tensor.shape[0] + 1, length), fill)
        grown[: tensor.shape[0], : tensor.shape[1]] = tensor
        widened.append(grown)
    widened[0][-1, :num_tokens] = image_token_id
    widened[1][-1, :num_tokens] = 1
    pixels = torch.zeros(1, 3, size, size, device=ids.device, dtype=dtype)
    return {"input_ids": widened[0], "attention_mask": widened[1], "labels": widened[2], "pixel_values": pixels}


class UnderstandingTrainer(TrainLoop):
    """Stage 1 / stage 2 training of a LlavaForConditionalGeneration on LLaVA-format conversations."""

    def __init__(self, cfg: UnderstandingTrainConfig, info: DistInfo):
        super().__init__(cfg.run, cfg.debug, cfg.deepspeed.grad_accum_steps, info)
        self.cfg = cfg
        require_paths(self.input_paths())
        prepare_run_dir(cfg, self.out_dir, info)
        llava, self.processor = self.build_model()
        if cfg.model.gradient_checkpointing:
            llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.llava_config = llava.config.to_dict()
        model, self.llava = self.freeze(llava)
        self.llava.train()
        if not cfg.model.train_tower:
            self.llava.model.vision_tower.eval()
        self.trained = {n for n, p in model.named_parameters() if p.requires_grad}
        self.dtype = cfg.deepspeed.dtype
        ds_json = deepspeed_json(cfg.deepspeed, cfg.optim, info.world_size)
        self.engine = build_engine(model, param_groups(model, cfg), cfg.optim, cfg.run.steps, ds_json,
                                   cfg.deepspeed.compile)
        self.engines = {"model": self.engine}
        self.reasons = dict.fromkeys(SKIP_REASONS, 0)
        self.resume()
        self.dataset, source = self.build_dataset()
        self.loader = self.make_loader(self.dataset, self.collate_fn(), cfg.deepspeed.micro_batch_size)
        log.info("%s (%s template): %s, %d trained tensors, step %d of %d", self.describe(), cfg.template, source,
                 len(self.trained), self.state["step"], cfg.run.steps)

    def describe(self) -> str:
        return f"understanding stage {self.cfg.stage}"

    def input_paths(self) -> dict[str, str]:
        """The local inputs this run reads, by config key (checked to exist before anything is built; a stage-1
        export in model.init_from is checked where it is found)."""
        cfg = self.cfg
        models = {} if cfg.model.init_from else {"model.vqrae": cfg.model.vqrae,
                                                 "model.lm_pretrained": cfg.model.lm_pretrained,
                                                 "model.projector": cfg.model.projector}
        data = {"data.train": cfg.data.train} if cfg.data.train else {
            "data.conversations": cfg.data.conversations, "data.image_root": cfg.data.image_root}
        return data | models

    def freeze(self, llava):
        """(the model to train, the LlavaForConditionalGeneration inside it): `freeze` for this run."""
        return freeze(llava, self.cfg, self.trainable_token_ids())

    def trainable_token_ids(self) -> list[int] | None:
        """Token ids whose embedding and head rows train beside LoRA adapters (none: the vocabulary is LLaVA's)."""
        return None

    def build_model(self):
        """(LlavaForConditionalGeneration in fp32, processor) this run starts from."""
        return build_model(self.cfg)

    def build_dataset(self) -> tuple[torch.utils.data.Dataset, str]:
        """The training items and a line describing them."""
        cfg = self.cfg
        length = self.llava.config.image_seq_length
        if cfg.data.train:
            dataset = ShardConversationDataset(cfg.data.train, self.processor, length, cfg.template,
                                               cfg.data.max_length, cfg.data.shards)
            return dataset, f"{len(dataset)} conversations in {len(dataset.shard_lengths)} shards ({cfg.data.train})"
        samples = read_conversations(cfg.data.conversations)
        dataset = ConversationDataset(samples, cfg.data.image_root, self.processor, length, cfg.template,
                                      cfg.data.max_length)
        return dataset, f"{len(samples)} conversations ({cfg.data.conversations})"

    def collate_fn(self) -> Callable[[list], dict]:
        """The loader's collate function (picklable, for worker processes)."""
        return functools.partial(collate_llava, pad_id=self.processor.tokenizer.pad_token_id)

    def count_skips(self, batch: dict) -> None:
        for reason, n in batch["skip_reasons"].items():
            self.reasons[reason] += n

    def model_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The batch on the device: input_ids, attention_mask, labels, and pixel_values (model dtype) when any. Under
        ZeRO-3 a batch without images gains one blank-image row with nothing supervised (`with_blank_image`): every
        rank's forward must gather the same parameters in the same order, the tower's included. A micro-batch whose
        every sample was skipped is that row alone: every rank runs a forward and a backward in every step."""
        device = self.info.device
        empty = batch["input_ids"] is None
        names = ("input_ids", "attention_mask", "labels")
        inputs = {k: torch.zeros(0, 0, dtype=torch.long, device=device) if empty else
                  batch[k].to(device, non_blocking=True) for k in names}
        if batch["pixel_values"] is not None:
            inputs["pixel_values"] = batch["pixel_values"].to(device, self.dtype, non_blocking=True)
        elif empty or (self.cfg.deepspeed.zero_stage == 3 and self.tower_runs()):
            size = self.processor.image_processor.size["height"]
            inputs = with_blank_image(inputs, self.processor.image_token_id, self.llava.config.image_seq_length,
                                      self.processor.tokenizer.pad_token_id, size, self.dtype)
        return inputs

    def tower_runs(self) -> bool:
        """Whether images reach the vision tower (a unified model given codes never runs it)."""
        return True

    def micro_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        self.count_skips(batch)
        inputs = self.model_inputs(batch)
        out = self.engine(**inputs)
        tokens = (inputs["labels"][:, 1:] != -100).sum()
        # a micro-batch whose every sample was skipped: the placeholder row's zero loss (no gradient, every
        # collective of the step taken part in)
        loss = out.loss if batch["input_ids"] is not None else out.logits.sum() * 0.0
        return loss, {"examples": batch["examples"], "answer_tokens": tokens}

    def checkpoint_files(self) -> dict:
        projector = self._projector_state()  # on every rank (collective under ZeRO-3); rank 0 writes it
        files = {PROCESSOR_DIR: self.processor.save_pretrained,
                 LLAVA_CONFIG: lambda p: p.write_text(json.dumps(self.llava_config, indent=2)),
                 PROJECTOR_FILE: lambda p: save_file(projector, str(p))}
        if self.cfg.stage == 2 and self.cfg.lora.enabled:
            lora = {"r": self.cfg.lora.r, "alpha": self.cfg.lora.alpha, "dropout": self.cfg.lora.dropout,
                    "target_modules": list(self.cfg.lora.target_modules), "merge": self.cfg.lora.merge_on_export,
                    "trainable_tokens": self.trainable_token_ids()}
            files[LORA_CONFIG] = lambda p: p.write_text(json.dumps(lora, indent=2))
        return files

    def _projector_state(self) -> dict[str, torch.Tensor]:
        """The projector's fp32 weights (collective under ZeRO-3: every rank calls it, as checkpointing does)."""
        from train.ema import master_weight

        projector = self.llava.model.multi_modal_projector
        return {k: master_weight(p).detach().cpu().contiguous() for k, p in projector.named_parameters()}

    def skip_counts(self) -> dict[str, int]:
        return {**super().skip_counts(), **{f"skipped_{r}": n for r, n in self.reasons.items()}}

    def summed_reasons(self) -> dict[str, int]:
        """Skipped samples by reason, summed over the ranks (collective)."""
        summed = self.summed_skip_counts()
        return {r: summed[f"skipped_{r}"] for r in self.reasons}

    def extra_state(self) -> dict:
        return {"skip_reasons": self.summed_reasons()}

    def load_checkpoint_files(self, path: Path) -> None:
        saved = self.state.get("skip_reasons", {}) if self.info.is_main else {}  # sums: rank 0 carries them on
        self.reasons = {**dict.fromkeys(SKIP_REASONS, 0), **saved}

    def finish(self, checkpoint: Path) -> None:
        reasons = self.summed_reasons()
        if self.info.is_main:
            export_understanding(checkpoint, self.out_dir / "export")
            log.info("exported %s (skipped samples by reason, all ranks: %s)", self.out_dir / "export", reasons)
