"""The unified model's trainer and its config (`UnifiedTrainer`, `UnifiedTrainConfig`): one LLaVA export trained on
understanding and generation together, what train/unified.py runs (its docstring states the recipe)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.config import ConfigError
from common.weights import load_exactly
from data.codes import CodeDataset
from data.mix import ShardTaskMix, TaskMix
from data.sequences import CaptionCodeSequences
from llm.generator import FORMAT_FILE, IMAGE_INPUTS, VQRAE_DIR, SequenceFormat, load_generator
from llm.sampler import recommended_settings
from llm.understanding import build_llava, is_llava_export, load_llava
from llm.unified import expand_llava, fit_vocab, images_as_codes, language_model_view
from llm.vocab import IGNORE_INDEX, INITS
from tokenizer import VQRAE
from train.exports import PROJECTOR_FILE, UNIFIED_META, export_unified, find_export
from train.samples import SampleGrid, SampleSection
from train.understanding_trainer import UnderstandingTrainConfig, UnderstandingTrainer

log = logging.getLogger("vqrae")
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "unified"
LOSSES = ("task_mean", "token_mean")


@dataclass
class GenerationSection:
    """The drawing task.

    Args:
        codes: a code directory (scripts/extract_codes.py, or the generator trainer's) of the model's VQRAE.
        ratio: the share of caption -> codes sequences among the samples, in (0, 1).
        caption_dropout: probability of the unconditional prompt.
        generator: start from this generator export (its LM, text side and VQRAE) with model.projector, instead of
            model.init_from.
        template, uncond: the sequence format ("plain" | "chat", "pad" | "empty") of a vocabulary expanded here;
            a generator start keeps the generator's (a different value is refused).
        init: new code embedding rows from the "mean" of the text rows or the "codebook" (llm/vocab.py).
        loss: "task_mean" (each task's mean over its supervised tokens, summed: each task learns at the scale its
            specialist does, however many tokens it has) or "token_mean" (one mean over every supervised token: a
            caption -> codes sequence, with its hundreds of code tokens, outweighs an answer of a few).
    """

    codes: str = ""
    ratio: float = 0.5
    caption_dropout: float = 0.1
    generator: str = ""
    template: str = ""
    uncond: str = ""
    init: str = "mean"
    loss: str = "task_mean"


@dataclass
class UnifiedTrainConfig(UnderstandingTrainConfig):
    """The understanding trainer's sections (stage 2) plus `generation`, and image_input: how images enter the
    conversations, "features" (continuous, through the projector) or "codes" (their code tokens in the image tokens'
    places; the projector unused and frozen). With generation.ratio 0 the model learns understanding alone on the
    expanded vocabulary: the continuous-vs-discrete comparison."""

    stage: int = 2
    generation: GenerationSection = field(default_factory=GenerationSection)
    sample: SampleSection = field(default_factory=SampleSection)
    image_input: str = "features"

    def __post_init__(self) -> None:
        gen = self.generation
        if self.stage != 2:
            raise ConfigError("the unified model trains its LM: stage must be 2")
        if bool(self.model.init_from) == bool(gen.generator):
            raise ConfigError("start from model.init_from (an understanding export) or generation.generator (a "
                              "generator export, with model.projector): set exactly one")
        if gen.generator and not self.model.projector:
            raise ConfigError("generation.generator needs model.projector (a stage-1 projector.safetensors)")
        if self.model.init_from and self.model.projector:
            raise ConfigError("model.projector goes with generation.generator; an understanding export has its own")
        if not 0 <= gen.ratio < 1:
            raise ConfigError(f"generation.ratio must be in [0, 1), got {gen.ratio}")
        if gen.ratio > 0 and not gen.codes:
            raise ConfigError("generation.codes must name a code directory of the model's VQRAE")
        if gen.loss not in LOSSES:
            raise ConfigError(f"generation.loss must be one of {LOSSES}, got {gen.loss!r}")
        if self.image_input not in IMAGE_INPUTS:
            raise ConfigError(f"image_input must be one of {IMAGE_INPUTS}, got {self.image_input!r}")
        if self.image_input == "codes" and self.model.train_tower:
            raise ConfigError("model.train_tower=true with image_input=codes: the tower never runs on codes, so it "
                              "would get no gradient (only weight decay)")
        if gen.init not in INITS:
            raise ConfigError(f"generation.init must be one of {INITS}, got {gen.init!r}")
        if gen.generator and (Path(gen.generator) / FORMAT_FILE).is_file():  # before the run folder is written
            fmt = SequenceFormat.load(Path(gen.generator))
            for name, value in (("template", gen.template), ("uncond", gen.uncond)):
                if value and value != getattr(fmt, name):
                    raise ConfigError(f"generation.{name}={value!r}, but {gen.generator} was trained with "
                                      f"{getattr(fmt, name)!r}")
        if self.model.init_from:  # the parent's checks (stage 2 from init_from or projector) hold then
            super().__post_init__()


class UnifiedTrainer(UnderstandingTrainer):
    """Understanding and drawing in one LLaVA model on mixed batches."""

    cfg: UnifiedTrainConfig

    def describe(self) -> str:
        return (f"unified model ({self.vocab.codebook_size} codes, generation share {self.cfg.generation.ratio}, "
                f"images as {self.cfg.image_input})")

    def input_paths(self) -> dict[str, str]:
        gen, paths = self.cfg.generation, super().input_paths()
        if gen.generator:
            paths = {k: v for k, v in paths.items() if k not in ("model.vqrae", "model.lm_pretrained")}
            paths["generation.generator"] = gen.generator
        else:
            paths["model.vqrae"] = self.cfg.model.vqrae
        return paths | {"generation.codes": gen.codes}

    def build_model(self):
        cfg, gen = self.cfg, self.cfg.generation
        if gen.generator:
            lm, tokenizer, vocab, fmt, vqrae = load_generator(gen.generator)
            fmt = fmt.pinned(tokenizer.chat_template)  # before build_llava gives the tokenizer LLaVA's template
            llava, processor = build_llava(vqrae, lm.train(), tokenizer, cfg.model.chat_format)
            vocab = fit_vocab(vocab, llava)
            path = Path(cfg.model.projector)
            if not path.is_file():
                raise FileNotFoundError(f"model.projector={path} not found (a stage-1 {PROJECTOR_FILE})")
            load_exactly(llava.model.multi_modal_projector, load_file(str(path)), f"model.projector={path}")
            self.vqrae_dir = str(Path(gen.generator).resolve() / VQRAE_DIR)
        else:
            llava, processor = load_llava(find_export(cfg.model.init_from, is_llava_export, "model.init_from",
                                                      "understanding export"))
            vqrae = VQRAE.from_pretrained(cfg.model.vqrae)
            check_tower(llava, vqrae, cfg.model.vqrae)
            vocab = expand_llava(llava, processor, vqrae, gen.init, cfg.run.seed)
            fmt = SequenceFormat(gen.template or "plain", gen.uncond or "pad").pinned(processor.chat_template)
            self.vqrae_dir = str(Path(cfg.model.vqrae).resolve())
        self.vocab, self.num_tokens = vocab, vqrae.config.num_tokens
        self.fmt = dataclasses.replace(fmt, image_input=cfg.image_input)
        self.vqrae = vqrae.to(self.info.device).eval().requires_grad_(False) if cfg.image_input == "codes" else None
        self.samples: SampleGrid | None = None
        return llava, processor

    def freeze(self, llava):
        model, inner = super().freeze(llava)
        if self.cfg.image_input == "codes":  # the images come in as code tokens: the projector is never used
            inner.model.multi_modal_projector.requires_grad_(False)
        return model, inner

    def build_dataset(self) -> tuple[torch.utils.data.Dataset, str]:
        gen = self.cfg.generation
        conversations, described = super().build_dataset()
        if gen.ratio == 0:
            return conversations, f"{described}, understanding alone"
        codes = CodeDataset(gen.codes)
        if codes.num_tokens != self.num_tokens:
            raise ConfigError(f"generation.codes={gen.codes} holds {codes.num_tokens} codes per image, the model's "
                              f"VQRAE makes {self.num_tokens}")
        sequences = CaptionCodeSequences(codes, self.processor.tokenizer, self.vocab, self.fmt, gen.caption_dropout,
                                         self.cfg.run.seed)
        mixed = ShardTaskMix if hasattr(conversations, "shard_lengths") else TaskMix  # shards: mixed shard by shard
        mix = mixed(conversations, sequences, gen.ratio)
        return mix, (f"{described} and {len(codes)} caption -> codes sequences ({gen.codes}), mixed "
                     f"{mix.counts['und']} + {mix.counts['gen']} a pass")

    def write_samples(self, step: int) -> None:
        if self.samples is None:
            self.samples = SampleGrid(self.cfg.sample, self.processor.tokenizer, self.vocab, self.fmt,
                                      VQRAE.from_pretrained(self.vqrae_dir).eval())
        path = self.out_dir / "samples" / f"step_{step:08d}.png" if self.info.is_main else None
        self.samples.write(language_model_view(self.llava), path, self.cfg.deepspeed.zero_stage == 3)

    def tower_runs(self) -> bool:
        return self.cfg.image_input == "features"

    def trainable_token_ids(self) -> list[int]:
        start, stop = self.vocab.code_range
        return [self.vocab.image_start_id, self.vocab.image_end_id, *range(start, stop)]

    def micro_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        self.count_skips(batch)
        inputs = self.model_inputs(batch)  # every sample skipped: a placeholder row, nothing supervised, loss 0
        if self.vqrae is not None:
            inputs = images_as_codes(inputs, self.vqrae, self.processor, self.vocab)
        extra = inputs["input_ids"].shape[0] - len(batch["tasks"])  # a blank-image row may follow (ZeRO-3)
        is_gen = torch.tensor([t == "gen" for t in batch["tasks"]] + [False] * extra,
                              device=inputs["input_ids"].device)
        metrics, sums, counts = {"examples": batch["examples"]}, {}, {}
        correct = total = 0
        for rows in self.forward_groups(is_gen):
            group = task_rows(inputs, rows, self.processor.image_token_id)
            labels = group.pop("labels")
            logits = self.engine(**group).logits
            losses, targets = per_token_losses(logits, labels)
            supervised = targets != IGNORE_INDEX
            for task, mine in (("und", ~is_gen[rows]), ("gen", is_gen[rows])):
                mask = supervised & mine[:, None]
                sums[task] = sums.get(task, 0) + losses[mask].sum()
                counts[task] = counts.get(task, 0) + mask.sum()
            with torch.no_grad():
                codes = supervised & is_gen[rows][:, None] & self.vocab.is_code(targets)
                correct = correct + (logits[:, :-1].argmax(-1)[codes] == targets[codes]).sum()
                total = total + codes.sum()
        means = []
        for task in ("und", "gen"):
            metrics[f"tokens_{task}"] = counts[task]
            if counts[task] > 0:
                means.append(sums[task] / counts[task])
                metrics[f"loss_{task}"] = means[-1].detach()
        if self.cfg.generation.loss == "task_mean" and means:
            loss = torch.stack(means).sum()
        else:
            loss = (sums["und"] + sums["gen"]) / (counts["und"] + counts["gen"]).clamp_min(1)
        if total > 0:
            metrics["code_accuracy"] = correct.float() / total
        return loss, metrics

    def forward_groups(self, is_gen: torch.Tensor) -> list[torch.Tensor]:
        """The row indices of each forward pass: one per task present, each padded only to its own longest row
        (a conversation with its image tokens is several caption -> codes sequences long); under ZeRO-3 one pass
        for all, since every rank must run the same number of forwards (its parameters are gathered
        collectively)."""
        if self.cfg.deepspeed.zero_stage == 3:
            return [torch.arange(len(is_gen), device=is_gen.device)]
        return [rows for rows in (torch.nonzero(~is_gen)[:, 0], torch.nonzero(is_gen)[:, 0]) if len(rows)]

    def checkpoint_files(self) -> dict:
        meta = {"vocab": asdict(self.vocab), "format": asdict(self.fmt), "vqrae": self.vqrae_dir,
                "sampling": recommended_settings(self.cfg.sample.sampling)}
        return {**super().checkpoint_files(), UNIFIED_META: lambda p: p.write_text(json.dumps(meta, indent=2))}

    def finish(self, checkpoint: Path) -> None:
        reasons = self.summed_reasons()
        if self.info.is_main:
            export_unified(checkpoint, self.out_dir / "export")
            log.info("exported %s (skipped samples by reason, all ranks: %s)", self.out_dir / "export", reasons)


def task_rows(inputs: dict[str, torch.Tensor], rows: torch.Tensor, image_token_id: int) -> dict[str, torch.Tensor]:
    """The model inputs of some rows, cut to their longest row (right padding). pixel_values go with the rows that
    hold image tokens: they are the batch's conversations, so those rows hold all its images, in order."""
    length = int(inputs["attention_mask"][rows].sum(1).max())
    group = {k: inputs[k][rows, :length] for k in ("input_ids", "attention_mask", "labels")}
    if "pixel_values" in inputs and bool((group["input_ids"] == image_token_id).any()):
        group["pixel_values"] = inputs["pixel_values"]
    return group


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy (fp32) at every position: (losses (B, L-1), the shifted targets (B, L-1)), 0 where
    the target is IGNORE_INDEX. Summed over the supervised positions and divided by their count it is transformers'
    causal-LM loss."""
    targets = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                               ignore_index=IGNORE_INDEX, reduction="none")
    return losses, targets


def check_tower(llava, vqrae: VQRAE, key: str) -> None:
    """Refuse a VQRAE whose encoder cannot be the understanding model's tower (another width or token count)."""
    mine = (llava.config.vision_config.hidden_size, llava.config.image_seq_length)
    theirs = (vqrae.encoder.tower.config.hidden_size, vqrae.config.num_tokens)
    if mine != theirs:
        raise ConfigError(f"model.vqrae={key}: its encoder (width, tokens per image) {theirs} is not the "
                          f"understanding model's tower {mine}")
