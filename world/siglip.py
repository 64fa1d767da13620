"""The world's vision foundation model: a tiny SigLIP (transformers' `SiglipModel`: a vision and a text tower, the
sigmoid loss with its learned temperature and bias) pretrained on the world's images and captions, and saved as a
SigLIP checkpoint folder (config.json, model.safetensors, processor_config.json (the image processor inside it),
spiece.model, tokenizer_config.json) that `SiglipModel.from_pretrained` / `AutoProcessor.from_pretrained` read, and
that VQRAE's encoder loads through `model.encoder_path`, the path a real SigLIP2 checkpoint takes.

Each step shows every image of the batch with one of its captions, of a kind drawn per image (world/captions.py:
the GenEval prompt, counts, colours, the full description), so the features must hold all four. SigLIP's loss
scores every (caption, image) pair of the batch with label +1 or -1, the pair's own or not; here a caption is +1
for every image it is true of ("a photo of a circle" fits every image of one lone circle), the world's exact truth
(`world.captions.truth_matrix`), and -1 otherwise. With distinct captions that is SigLIP's loss exactly.

    pretrain_siglip("runs/world/train", "runs/world/siglip", SiglipPretrainConfig())
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor, SiglipTokenizer

from common.files import atomic_directory
from data.images import build_image_dataset
from data.transforms import ImageTransform
from world.captions import CAPTION_KINDS, caption_facts, caption_kinds, fact_matrix, image_facts, truth_matrix
from world.pretrain import RECORD, PretrainConfig, pretrain


@dataclass
class SiglipPretrainConfig:
    """Args:
    vision: SiglipVisionConfig fields (image_size is the world's). text: SiglipTextConfig fields (its
        projection_size is the vision width, as SigLIP's towers meet in the vision width).
    vocab_size: the caption tokenizer's (sentencepiece BPE) vocabulary. max_length: caption tokens, padded to it
        ("max_length" padding, as SigLIP is trained: its text embedding is the last token's).
    logit_scale, logit_bias: SigLIP's initial log-temperature (log 10) and bias (-10).
    run: steps, batch, seed, schedule.
    """

    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    vocab_size: int = 128
    max_length: int = 20
    logit_scale: float = math.log(10.0)
    logit_bias: float = -10.0
    run: PretrainConfig = field(default_factory=PretrainConfig)


def train_caption_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> SiglipTokenizer:
    """A `SiglipTokenizer` on a sentencepiece BPE model trained on `texts` (deterministic for the same texts), saved
    in `out_dir`. Pieces: <pad> 0, </s> 1 (SigLIP's pad and end), <unk> 2."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "spiece"), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", num_threads=1, minloglevel=2)
    corpus.unlink()
    (out_dir / "spiece.vocab").unlink()
    return SiglipTokenizer(vocab_file=str(out_dir / "spiece.model"))


def build_siglip(cfg: SiglipPretrainConfig, tokenizer: SiglipTokenizer, image_size: int, seed: int) -> SiglipModel:
    """A freshly initialised SiglipModel for the world (fp32), deterministic for a seed."""
    width = cfg.vision["hidden_size"]
    config = SiglipConfig(
        text_config={**cfg.text, "vocab_size": len(tokenizer), "max_position_embeddings": cfg.max_length,
                     "projection_size": width, "pad_token_id": tokenizer.pad_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None},
        vision_config={**cfg.vision, "image_size": image_size})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(cfg.logit_scale)
        model.logit_bias.fill_(cfg.logit_bias)
    return model


def sigmoid_loss(logits_per_text: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: -sum over pairs of log sigmoid(label * logit), label +1 where `truth` (captions, images) holds
    and -1 elsewhere, averaged over captions (transformers' `SiglipModel` loss when `truth` is the identity)."""
    labels = truth.to(logits_per_text.dtype) * 2 - 1
    return -torch.nn.functional.logsigmoid(labels * logits_per_text).sum(-1).mean()


class CaptionedImages:
    """A split of the world on disk (its captions.jsonl) in memory: pixels, every caption kind's token ids, and the
    fact rows of images and captions that decide which caption is true of which image."""

    def __init__(self, split: Path, tokenizer: SiglipTokenizer, max_length: int, image_size: int,
                 progress: bool = True):
        dataset = build_image_dataset(str(split / "captions.jsonl"), ImageTransform(image_size, "center"))
        items = [dataset[i] for i in tqdm(range(len(dataset)), desc="read images", disable=not progress)]
        self.pixels = torch.stack([item["pixel_values"] for item in items])  # (N, 3, H, W) in [-1, 1]
        flat = [caption_kinds(item["meta"])[k] for item in items for k in CAPTION_KINDS]
        ids = tokenizer(flat, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
        self.ids = torch.tensor(ids).view(len(items), len(CAPTION_KINDS), max_length)
        self.image_facts = fact_matrix([image_facts(item["meta"]["objects"]) for item in items])
        self.caption_facts = fact_matrix([caption_facts(c) for c in flat]).view(len(items), len(CAPTION_KINDS), -1)

    def __len__(self) -> int:
        return len(self.pixels)

    def batch(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        """`size` images drawn with replacement, one caption of a drawn kind each, and the (captions, images) truth."""
        index = torch.randint(0, len(self), (size,), generator=generator)
        kind = torch.randint(0, len(CAPTION_KINDS), (size,), generator=generator)
        truth = truth_matrix(self.image_facts[index], self.caption_facts[index, kind]).T  # (captions, images)
        return {"pixel_values": self.pixels[index], "input_ids": self.ids[index, kind], "truth": truth}


def pretrain_siglip(split: str | Path, out_dir: str | Path, cfg: SiglipPretrainConfig, image_size: int,
                    work_dir: str | Path, record: dict, progress: bool = True) -> Path:
    """Train the world's SigLIP on a split of the world on disk and save it as a SigLIP checkpoint folder
    (atomically, with `record` in its pretraining.json); resumes from `work_dir`. Returns `out_dir`."""
    split, out_dir, work_dir = Path(split), Path(out_dir), Path(work_dir)
    if len(caption_texts := _tokenizer_corpus(split)) == 0:
        raise FileNotFoundError(f"{split}/captions.jsonl holds no captions")
    tokenizer = train_caption_tokenizer(caption_texts, work_dir / "tokenizer", cfg.vocab_size)
    data = CaptionedImages(split, tokenizer, cfg.max_length, image_size, progress)
    model = build_siglip(cfg, tokenizer, image_size, cfg.run.seed)

    def loss_fn(generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        batch = data.batch(generator, cfg.run.batch_size)
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
        loss = sigmoid_loss(out.logits_per_text, batch["truth"])
        return loss, {"temperature": model.logit_scale.exp().item(), "bias": model.logit_bias.item()}

    pretrain(model, loss_fn, cfg.run, work_dir, "siglip pretraining", progress)
    processor = SiglipProcessor(image_processor=SiglipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def _tokenizer_corpus(split: Path) -> list[str]:
    """Every caption kind of the split's first 2000 images, in file order: the caption tokenizer's corpus."""
    texts = []
    with open(split / "captions.jsonl", encoding="utf-8") as f:
        for line, _ in zip(f, range(2000)):
            texts += caption_kinds(json.loads(line)).values()
    return texts
