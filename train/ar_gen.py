"""Autoregressive text-to-image training: a causal LM (Qwen3) with its vocabulary expanded by the VQRAE codes learns
next-token prediction of an image's codes after its caption, under DeepSpeed ZeRO.

    deepspeed train/ar_gen.py                        # CPU default: tiny Qwen3 on codes of the shapes world
    deepspeed --num_gpus 8 train/ar_gen.py --config train/configs/ar_gen/qwen3-0.6b.yaml \
        lm.pretrained=/ckpt/Qwen3-0.6B data.tokenizer=runs/siglip2-stage2/export data.codes=/data/codes

The CPU default needs the tokenizer of `deepspeed train/tokenizer.py` and its stage 2 (train/configs/tokenizer/
tiny-stage2.yaml); the codes are extracted from the shapes world on first use. Loss: cross-entropy on the code
tokens and <|image_end|> only; ~10% of captions are dropped to the unconditional prompt for classifier-free
guidance. Every run.sample_every steps a PNG grid of sampled prompts is written; the run ends with an export
(train/ar_gen.py's `export`) that `scripts/generate.py` and `eval/geneval.py` read.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from data.codes import CodeDataset, ensure_manifest, extract_codes
from data.images import build_image_dataset
from data.sequences import CaptionCodeSequences, collate_sequences
from data.transforms import ImageTransform, make_grid_png
from llm.pipeline import FORMAT_FILE, VQRAE_DIR, write_sequence_format
from llm.sampler import Engine, SamplingConfig
from llm.text_tokenizer import shapes_world_tokenizer
from llm.vocab import ImageVocab, build_prompt_ids, build_tiny_qwen3, expand_vocabulary, unconditional_prompt_ids
from tokenizer import VQRAE
from tokenizer.config import ConfigError
from tokenizer.encoder import resolve_attn_implementation
from train import common, loop
from train.common import DebugConfig, DeepSpeedConfig, OptimConfig, RunConfig

log = logging.getLogger("vqrae")
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "ar_gen"


@dataclass
class LMConfig:
    """Args:
    pretrained: local causal-LM directory (e.g. Qwen3-0.6B); empty -> a tiny random Qwen3 with the shapes-world
        tokenizer (CPU default). tiny: overrides of llm.vocab.build_tiny_qwen3 (e.g. num_hidden_layers).
    init: new embedding rows from the "mean" of the text rows or from the "codebook" (projected).
    template: prompt format "plain" | "chat". uncond: unconditional prompt "pad" (Janus) | "empty".
    """

    pretrained: str = ""
    tiny: dict = field(default_factory=dict)
    init: str = "mean"
    template: str = "plain"
    uncond: str = "pad"
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"


@dataclass
class GenDataConfig:
    """Args: codes: a directory of extracted codes; tokenizer: the VQRAE export they came from; images: when `codes`
    does not exist yet, extract it from these images first; caption_dropout: probability of the unconditional
    prompt."""

    codes: str = ""
    tokenizer: str = ""
    images: str = ""
    caption_dropout: float = 0.1
    extract_batch_size: int = 64


@dataclass
class SampleSection:
    """Prompts sampled into a PNG grid every run.sample_every steps, with these explicit settings."""

    prompts: tuple[str, ...] = ("a photo of a red circle", "a photo of two squares",
                                "a photo of a triangle left of a circle", "a photo of a blue square and a yellow "
                                                                          "circle")
    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


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


def build_lm(cfg: ARGenTrainConfig, vqrae: VQRAE, work_dir: Path):
    """(model, tokenizer, vocab): the LM with its vocabulary expanded by the tokenizer's codes. Without lm.pretrained
    the shapes-world tokenizer is trained and written to work_dir by rank 0 alone, then loaded by every rank."""
    attn = resolve_attn_implementation(cfg.lm.attn_implementation)
    if cfg.lm.pretrained:
        path = Path(cfg.lm.pretrained)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"lm.pretrained={path}: no config.json (a local causal-LM directory)")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    else:
        log.warning("lm.pretrained is empty: a tiny RANDOM Qwen3 with the shapes-world tokenizer (CPU demo)")
        if common.is_rank_zero():
            shapes_world_tokenizer(work_dir / "text_tokenizer")
        common.barrier()  # two ranks replacing one folder at once would race
        tokenizer = AutoTokenizer.from_pretrained(work_dir / "text_tokenizer")
        model = build_tiny_qwen3(tokenizer, seed=cfg.run.seed, **cfg.lm.tiny)
        model.config._attn_implementation = attn
    codebook = vqrae.quantizer.effective_codebook().detach() if cfg.lm.init == "codebook" else None
    vocab = expand_vocabulary(model, tokenizer, vqrae.config.quantizer.codebook_size, init=cfg.lm.init,
                              codebook=codebook, seed=cfg.run.seed)
    return model.train(), tokenizer, vocab


def ensure_codes(cfg: ARGenTrainConfig, vqrae: VQRAE, info: common.DistInfo) -> Path:
    """The code directory; with data.images set, its missing chunks are extracted first (every rank takes its share;
    complete chunks are kept, so an interrupted extraction resumes)."""
    codes = Path(cfg.data.codes)
    if not cfg.data.images:
        return codes
    dataset = build_image_dataset(cfg.data.images, ImageTransform(vqrae.config.encoder.image_size, "center"))
    chunk_size = 5000
    if info.is_main:
        codes.mkdir(parents=True, exist_ok=True)
        ensure_manifest(codes, cfg.data.tokenizer, vqrae.config, cfg.data.images, len(dataset), chunk_size)
    common.barrier()
    counts = extract_codes(vqrae.to(info.device).eval(), dataset, codes, chunk_size=chunk_size,
                           batch_size=cfg.data.extract_batch_size, rank=info.rank, world=info.world_size,
                           progress=info.is_main)
    common.barrier()
    log.info("extracted codes of %d images to %s (%d unreadable skipped, this rank)", counts["images"], codes,
             counts["skipped"])
    return codes


class ARGenTrainer(loop.TrainLoop):
    """Next-code prediction of a causal LM with an expanded vocabulary on caption + code sequences."""

    def __init__(self, cfg: ARGenTrainConfig, info: common.DistInfo):
        super().__init__(cfg.run, cfg.debug, cfg.deepspeed.grad_accum_steps, info)
        self.cfg = cfg
        if not cfg.data.tokenizer:
            raise ConfigError("data.tokenizer must name the VQRAE export whose codes the LM learns")
        self.vqrae = VQRAE.from_pretrained(cfg.data.tokenizer).eval()
        codes = CodeDataset(ensure_codes(cfg, self.vqrae, info))
        model, self.tokenizer, self.vocab = build_lm(cfg, self.vqrae, self.out_dir)
        if cfg.lm.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.hf_config = model.config.to_dict()
        self.sequences = CaptionCodeSequences(codes, self.tokenizer, self.vocab, cfg.lm.template, cfg.lm.uncond,
                                              cfg.data.caption_dropout, cfg.run.seed)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
        groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        ds_json = common.deepspeed_json(cfg.deepspeed, cfg.optim, info.world_size)
        self.engine = loop.build_engine(model, groups, cfg.optim, cfg.run.steps, ds_json, cfg.deepspeed.compile)
        self.engines = {"model": self.engine}
        self.resume()
        self.loader = self.make_loader(self.sequences, functools.partial(collate_sequences, pad_id=self.vocab.pad_id),
                                       cfg.deepspeed.micro_batch_size)
        self.sampler_engine = None
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

    def sampling(self) -> SamplingConfig:
        s = self.cfg.sample
        return SamplingConfig(cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                              seed=s.seed)

    @torch.no_grad()
    def write_samples(self, step: int) -> None:
        """Every rank samples (ZeRO-3 gathers the weights collectively); rank 0 decodes and writes the grid."""
        import contextlib

        import deepspeed

        model = self.engine.module
        gather = deepspeed.zero.GatheredParameters(list(model.parameters())) \
            if self.cfg.deepspeed.zero_stage == 3 else contextlib.nullcontext()
        model.eval()
        with gather:
            if self.sampler_engine is None:
                self.sampler_engine = Engine(model, self.vocab)
            prompts = list(self.cfg.sample.prompts)
            cond = [build_prompt_ids(self.tokenizer, p, self.cfg.lm.template) for p in prompts]
            uncond = [unconditional_prompt_ids(self.tokenizer, c, self.vocab, self.cfg.lm.uncond,
                                               self.cfg.lm.template) for c in cond]
            codes = self.sampler_engine.generate(cond, self.vqrae.config.num_tokens, self.sampling(), uncond)
        model.train()
        if self.info.is_main:
            images = self.vqrae.decode(codes.cpu()).clamp(-1, 1)
            make_grid_png([images], self.out_dir / "samples" / f"step_{step:08d}.png", min_cell=128)

    def checkpoint_files(self) -> dict:
        def tokenizer_files(path: Path) -> None:
            self.tokenizer.save_pretrained(path)
            self.vocab.save(path)
            write_sequence_format(path, self.cfg.lm.template, self.cfg.lm.uncond)

        meta = {"hf_config": self.hf_config, "vqrae": str(Path(self.cfg.data.tokenizer).resolve())}
        return {"generator.json": lambda p: p.write_text(json.dumps(meta, indent=2)), "text_tokenizer": tokenizer_files}

    def finish(self, checkpoint: Path) -> None:
        if self.info.is_main:
            export(checkpoint, self.out_dir / "export")
            log.info("exported %s", self.out_dir / "export")


def export(checkpoint: Path, directory: Path) -> None:
    """Write a generator directory (see llm/pipeline.py) from a training checkpoint, any ZeRO stage, on CPU."""
    from data.atomic import atomic_directory

    meta = json.loads((checkpoint / "generator.json").read_text())
    config = AutoConfig.for_model(**meta["hf_config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = loop.consolidated_state_dict(checkpoint, tag="model")
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks weights for {missing[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "text_tokenizer")
    vocab = ImageVocab.load(checkpoint / "text_tokenizer")
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        vocab.save(tmp)
        shutil.copy(checkpoint / "text_tokenizer" / FORMAT_FILE, tmp / FORMAT_FILE)
        shutil.copytree(meta["vqrae"], tmp / VQRAE_DIR)


def main(argv: list[str] | None = None) -> None:
    cfg = common.parse_config(ARGenTrainConfig, argv, CONFIG_DIR / "tiny.yaml", __doc__)
    info = common.init_distributed()
    common.setup_logging(info)
    common.prepare_run_dir(cfg, Path(cfg.run.output_dir), info)
    torch.manual_seed(cfg.run.seed)
    ARGenTrainer(cfg, info).fit(cfg.run.steps, cfg)


if __name__ == "__main__":
    common.run_entry_point(main)
